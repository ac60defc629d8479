"""The notifier's own tables: channel settings, templates, consent, suppressions, policy,
the messages with their status history, and each shop's link-signing secret.

Every key starts with the shop. A message's id is derived from the shop and the request's
idempotency key (`message_id_of`), so a repeated request finds its message; its status
history is a table of its own (one row per change), and each change is also emitted as
`notification.status` through the outbox.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from libs.common.db.types import UtcDateTime

metadata = MetaData()

channels = Table(
    "notifier_channels",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("channel", String(8), primary_key=True),
    Column("provider", String(16), nullable=False),
    Column("settings", Text, nullable=False),
    # The provider's settings as JSON, credentials included (never shown again).
    Column("fallback_provider", String(16)),
    Column("fallback_settings", Text),
    Column("updated_at", UtcDateTime, nullable=False),
)

templates = Table(
    "notifier_templates",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("channel", String(8), nullable=False),
    Column("definition", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

consents = Table(
    "notifier_consents",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("customer_id", String(200), primary_key=True),
    Column("sms", Boolean),
    Column("email", Boolean),
    # None: never asked (marketing then needs an explicit yes).
    Column("updated_at", UtcDateTime, nullable=False),
)

suppressions = Table(
    "notifier_suppressions",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("channel", String(8), primary_key=True),
    Column("address", String(320), primary_key=True),
    Column("reason", String(32), nullable=False),
    # opt_out (a reply, a provider's opt-out report), unsubscribe (the link),
    # bounce, complaint.
    Column("created_at", UtcDateTime, nullable=False),
)

policies = Table(
    "notifier_policies",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("definition", Text, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

messages = Table(
    "notifier_messages",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("message_id", String(40), primary_key=True),
    Column("idempotency_key", String(200), nullable=False),
    Column("customer_id", String(200), nullable=False),
    Column("journey_id", String(64)),
    Column("channel", String(8), nullable=False),
    Column("category", String(16), nullable=False),
    Column("template", String(64), nullable=False),
    Column("locale", String(8)),
    Column("provider", String(16)),
    Column("fallback_used", Boolean, nullable=False, default=False),
    Column("recipient", String(320)),
    Column("subject", Text),
    Column("body", Text),
    Column("html", Text),
    Column("provider_template", Text),
    # JSON `{provider: {"id", "params"}}`: each provider's approved template, rendered.
    Column("status", String(16), nullable=False),
    Column("reason", String(300)),
    Column("provider_message_id", String(120)),
    Column("attempts", Integer, nullable=False, default=0),
    # Calls made on the current provider (reset on failover).
    Column("sending_since", UtcDateTime),
    # When the current call started: set (committed) before the provider is called.
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Index("ix_notifier_messages_key", "shop_id", "idempotency_key", unique=True),
    Index("ix_notifier_messages_customer", "shop_id", "customer_id"),
    Index("ix_notifier_messages_created", "shop_id", "created_at"),
    Index("ix_notifier_messages_provider_id", "provider", "provider_message_id"),
)

history = Table(
    "notifier_message_history",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("message_id", String(40), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("reason", String(300)),
    Column("at", UtcDateTime, nullable=False),
)

rate_buckets = Table(
    "notifier_rate_buckets",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("provider", String(16), primary_key=True),
    Column("tokens", Float, nullable=False),
    Column("refilled_at", Float, nullable=False),
    # Epoch seconds of the last refill (the bucket holds across workers: it is a row).
)

secrets = Table(
    "notifier_shop_secrets",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("secret", String(64), nullable=False),
    # Keys the HMAC of the shop's unsubscribe links and provider callback URLs; made on
    # first use, shared by every notifier worker (it is a row, not a process's setting).
    Column("created_at", UtcDateTime, nullable=False),
)


def message_id_of(shop_id: str, idempotency_key: str) -> str:
    """The message's id: the same request always names the same message."""
    return hashlib.sha256(f"{shop_id}\x00{idempotency_key}".encode()).hexdigest()[:32]

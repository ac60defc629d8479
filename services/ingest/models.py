"""Tables the ingest service owns: the shops registry, webhook secrets and API keys.

`shops` and `api_keys` have the shared shape of `libs.common.db.tables` (the other
services keep projections of them); here they are the source of truth.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Index, MetaData, String, Table, Text

from libs.common.db.tables import EVENT_KEY_LENGTH, api_keys, shops
from libs.common.db.types import UtcDateTime

metadata = MetaData()

webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("platform", String(32), primary_key=True),
    Column("secret_id", String(32), primary_key=True),
    Column("secret", Text, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=True),
    Index("ix_webhook_secrets_shop_platform", "shop_id", "platform"),
)
"""Write-only secrets per shop and platform; a rotated-out secret keeps working until
`expires_at` (the grace period) so deliveries signed before the rotation still verify."""

ingest_ledger = Table(
    "ingest_ledger",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("dedupe_key", String(EVENT_KEY_LENGTH), primary_key=True),
    Column("expires_at", UtcDateTime(), nullable=False),
    Index("ix_ingest_ledger_expires_at", "expires_at"),
)
"""Canonical events published recently (CloudEvents source + id), kept for the senders'
retry horizon so a redelivered webhook produces no second event. Rows expire; this is
an idempotency ledger, not per-event business state."""

console_sessions = Table(
    "console_sessions",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("shop_id", String(64), nullable=False),
    Column("is_admin", Boolean, nullable=False),
    Column("key_sealed", String(1024), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    Index("ix_console_sessions_expires_at", "expires_at"),
)
"""The operator console's sessions (`console.sessions`): the token's hash, the shop, the
operator's key sealed with AES-GCM, the CSRF token, the expiry."""

__all__ = ["api_keys", "console_sessions", "ingest_ledger", "shops", "webhook_secrets"]

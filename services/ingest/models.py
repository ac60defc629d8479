"""Tables the ingest service owns: the shops registry, webhook secrets and API keys.

`shops` and `api_keys` have the shared shape of `libs.common.db.tables` (the other
services keep projections of them); here they are the source of truth.
"""

from __future__ import annotations

from sqlalchemy import Column, Index, MetaData, String, Table, Text

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

__all__ = ["api_keys", "ingest_ledger", "shops", "webhook_secrets"]

"""The idempotency ledger of recently published events."""

from alembic.operations import Operations
from sqlalchemy import Column, String

from libs.common.db.types import UtcDateTime


def upgrade(op: Operations) -> None:
    op.create_table(
        "ingest_ledger",
        Column("shop_id", String(64), primary_key=True),
        Column("dedupe_key", String(420), primary_key=True),
        Column("expires_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_ingest_ledger_expires_at", "ingest_ledger", ["expires_at"])

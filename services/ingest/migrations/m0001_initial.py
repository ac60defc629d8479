"""Shops registry, webhook secrets, API keys and the shared plumbing tables."""

from alembic.operations import Operations
from sqlalchemy import Column, String, Text

from libs.common.db.tables import create_common_tables
from libs.common.db.types import UtcDateTime


def upgrade(op: Operations) -> None:
    create_common_tables(op)
    op.create_table(
        "webhook_secrets",
        Column("shop_id", String(64), primary_key=True),
        Column("platform", String(32), primary_key=True),
        Column("secret_id", String(32), primary_key=True),
        Column("secret", Text, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
        Column("expires_at", UtcDateTime(), nullable=True),
    )
    op.create_index("ix_webhook_secrets_shop_platform", "webhook_secrets", ["shop_id", "platform"])

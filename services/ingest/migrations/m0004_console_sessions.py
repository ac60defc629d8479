"""The operator console's sessions (services/ingest/console/sessions.py)."""

from alembic.operations import Operations
from sqlalchemy import Boolean, Column, String

from libs.common.db.types import UtcDateTime


def upgrade(op: Operations) -> None:
    op.create_table(
        "console_sessions",
        Column("token_hash", String(64), primary_key=True),
        Column("shop_id", String(64), nullable=False),
        Column("is_admin", Boolean, nullable=False),
        Column("key_sealed", String(1024), nullable=False),
        Column("csrf", String(64), nullable=False),
        Column("expires_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_console_sessions_expires_at", "console_sessions", ["expires_at"])

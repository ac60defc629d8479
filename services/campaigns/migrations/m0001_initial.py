"""The shared plumbing tables (processed events, outbox, timers, shops and key projection)."""

from alembic.operations import Operations

from libs.common.db.tables import create_common_tables


def upgrade(op: Operations) -> None:
    create_common_tables(op)

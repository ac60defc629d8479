"""Timers claimed by lane (one kind per lane: transactional waits apart from marketing
ones) use an index on (kind, due_at)."""

from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_index("ix_timers_kind_due", "timers", ["kind", "due_at"])

"""Columns as long as the event fields stored in them.

`customers.source` holds the first segment of the envelope's `source`, which the schema
allows up to 200 characters; at 64 a longer one failed the insert on PostgreSQL and the
event was dead-lettered after ingest had answered 2xx. Every other column that stores an
event field is already as long as the field's schema limit (the mapping is in
`libs.common.events`, checked by `tests/ingest/test_bounds.py`).

SQLite does not enforce VARCHAR lengths (and would have to copy the whole table to change
one), so only PostgreSQL is altered; there widening a VARCHAR rewrites nothing.
"""

from alembic.operations import Operations
from sqlalchemy import String


def upgrade(op: Operations) -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.alter_column("customers", "source", type_=String(200), existing_type=String(64))

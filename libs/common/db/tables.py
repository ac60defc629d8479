"""Tables every service has in its own database: processed events, outbox, timers, keys.

They are plumbing shared by shape, not data shared between services: each service gets
its own copy in its own database (or PostgreSQL schema) through its first migration.
"""

from __future__ import annotations

from alembic.operations import Operations
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from libs.common.db.types import UtcDateTime

metadata = MetaData()

BigId = BigInteger().with_variant(Integer(), "sqlite")
"""SQLite only autoincrements an INTEGER PRIMARY KEY."""

EVENT_KEY_LENGTH = 600
"""Room for an event's dedupe key `shop_id|source|id` (64 + 200 + 200 and separators)."""

processed_events = Table(
    "processed_events",
    metadata,
    Column("consumer", String(100), primary_key=True),
    Column("event_id", String(EVENT_KEY_LENGTH), primary_key=True),
    Column("processed_at", UtcDateTime(), nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("topic", String(200), nullable=False),
    Column("key", String(400), nullable=False),
    Column("value", LargeBinary, nullable=False),
    Column("headers", Text, nullable=False, server_default="{}"),
    Column("created_at", UtcDateTime(), nullable=False),
)

timers = Table(
    "timers",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("kind", String(100), nullable=False),
    Column("shop_id", String(64), nullable=False),
    Column("due_at", UtcDateTime(), nullable=False),
    Column("payload", Text, nullable=False, server_default="{}"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Index("ix_timers_due_at", "due_at"),
)

dead_timers = Table(
    "dead_timers",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("kind", String(100), nullable=False),
    Column("shop_id", String(64), nullable=False),
    Column("due_at", UtcDateTime(), nullable=False),
    Column("payload", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("died_at", UtcDateTime(), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("key_id", String(64), nullable=False),
    Column("shop_id", String(64), nullable=False),
    Column("revoked", Boolean, nullable=False, server_default="0"),
    Column("created_at", UtcDateTime(), nullable=False),
)

shops = Table(
    "shops",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)
"""Every service keeps the shops it knows (ingest owns them; the others project them)."""


def create_common_tables(op: Operations) -> None:
    """Migration step that creates the shared-shape tables in a service's database."""
    for table in metadata.sorted_tables:
        op.create_table(table.name, *[col._copy() for col in table.columns])
        for index in table.indexes:
            assert index.name is not None
            op.create_index(index.name, table.name, [c.name for c in index.columns])


def widen_event_keys(op: Operations) -> None:
    """Migration step: processed-event ids became `shop_id|source|id` (one shop's events
    can no longer hide another's), longer than the column first made for them."""
    with op.batch_alter_table("processed_events") as batch:
        batch.alter_column("event_id", type_=String(EVENT_KEY_LENGTH))

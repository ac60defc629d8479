"""Apply a service's schema migrations, in order, each in its own transaction.

A service's `migrations` package holds modules named `m0001_<what>.py`, each with
`upgrade(op)` written against Alembic's operations API (dialect-neutral DDL). Applied
versions are recorded in the service's `schema_migrations` table, so running migrations
again is a no-op and several processes racing at start-up apply each version once
(PostgreSQL takes an advisory lock; SQLite's write lock serialises them).
"""

from __future__ import annotations

import importlib
import pkgutil
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from types import ModuleType

from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, MetaData, String, Table, insert, select, text
from sqlalchemy.engine import Connection

from libs.common.db.engine import Database
from libs.common.db.types import UtcDateTime

_meta = MetaData()
schema_migrations = Table(
    "schema_migrations",
    _meta,
    Column("version", String(100), primary_key=True),
    Column("applied_at", UtcDateTime(), nullable=False),
)


def discover(package: ModuleType) -> list[tuple[str, Callable[[Operations], None]]]:
    """The (version, upgrade) pairs of a migrations package, sorted by version."""
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("m") and info.name[1:5].isdigit():
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            found.append((info.name, module.upgrade))
    return sorted(found)


async def migrate(db: Database, package: ModuleType) -> list[str]:
    """Apply pending migrations of `package` to `db`; returns the versions applied."""
    await db.ensure_schema()
    steps = discover(package)
    applied: list[str] = []
    async with db.begin() as conn:
        if db.is_postgres:
            lock = zlib.crc32(f"migrate:{db.schema}".encode())
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock})
        applied = await conn.run_sync(_apply, steps)
    return applied


def _apply(conn: Connection, steps: list[tuple[str, Callable[[Operations], None]]]) -> list[str]:
    _meta.create_all(conn, checkfirst=True)
    done = set(conn.execute(select(schema_migrations.c.version)).scalars())
    op = Operations(MigrationContext.configure(conn))
    applied = []
    for version, upgrade in steps:
        if version in done:
            continue
        upgrade(op)
        conn.execute(
            insert(schema_migrations).values(version=version, applied_at=datetime.now(UTC))
        )
        applied.append(version)
    return applied

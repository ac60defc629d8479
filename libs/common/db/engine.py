"""Engines and transactions for a service's own database.

Each service owns its database: in embedded mode a SQLite file of its own under the data
folder (so the services never contend for one write lock), in PostgreSQL a schema of its
own named after the service (selected with `search_path`, so table names stay unqualified
and one code path serves both dialects).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


class Database:
    """A service's engine plus its dialect; `begin()` is the unit of work."""

    def __init__(self, url: str, schema: str, *, pool_size: int = 10) -> None:
        self.url = make_url(url)
        self.schema = schema
        self.is_postgres = self.url.get_backend_name() == "postgresql"
        self.engine: AsyncEngine = self._create_engine(pool_size)

    def _create_engine(self, pool_size: int) -> AsyncEngine:
        if self.is_postgres:
            return create_async_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
                connect_args={"server_settings": {"search_path": self.schema}},
            )
        if self.url.database:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(self.url, connect_args={"timeout": 60})
        _sqlite_transactions(engine)
        return engine

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads: one snapshot for the whole block, taking no write lock.

        SQLite's deferred transaction is a snapshot from its first read. PostgreSQL's
        default, READ COMMITTED, takes a new snapshot per statement, so a view read in two
        statements (a customer's row, then its orders) could mix states before and after a
        consumer's commit; REPEATABLE READ makes the block one snapshot (a reader never
        fails to serialise)."""
        async with self.engine.connect() as conn:
            if self.is_postgres:
                await conn.execution_options(isolation_level="REPEATABLE READ")
            await conn.execution_options(huitou_read_only=True)
            yield conn

    async def ensure_schema(self) -> None:
        """Create the service's PostgreSQL schema (SQLite needs nothing)."""
        if self.is_postgres:
            async with self.engine.begin() as conn:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def _sqlite_transactions(engine: AsyncEngine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE so writers queue instead of deadlocking."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get("huitou_read_only", False)
        conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")

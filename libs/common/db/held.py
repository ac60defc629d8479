"""A connection held open for one hot loop's reads.

A read through `Database.connect()` costs PostgreSQL six round trips: the pool's
pre-ping, BEGIN, `SET LOCAL plan_cache_mode` on and off (`keysets.planned_per_execution`),
the statement, ROLLBACK. In a busy process each round trip also waits its turn in the
event loop, so ingest's ledger lookup of a round's keys took 9.6 ms (bench/README.md,
finding 21). A `HeldReads` keeps one connection in autocommit with the planner setting
made once for its session, so a read is the statement alone.

For one task at a time (a loop's successive reads), serialised by a lock. After an error
the connection is dropped and the next read opens a new one, so a restarted database
costs one failed read, as the pre-ping's reconnect would have. SQLite has no round
trips to save: there it reads through `Database.connect()` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.engine import Database


class HeldReads:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: AsyncConnection | None = None
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """The held connection (PostgreSQL), or a fresh read connection (SQLite)."""
        if not self.db.is_postgres:
            async with self.db.connect() as conn:
                yield conn
            return
        async with self._lock:
            try:
                if self._conn is None:
                    self._conn = await self._open()
                yield self._conn
            except BaseException:
                await self.close()
                raise

    async def _open(self) -> AsyncConnection:
        conn = await self.db.engine.connect()
        try:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            # Plans made for each execution's keys: see `keysets.planned_per_execution`.
            await conn.execute(text("SET plan_cache_mode = force_custom_plan"))
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Close the connection for good (never back to the pool: its session setting
        stays with it, and after an error its state is unknown)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            await conn.invalidate()
        with contextlib.suppress(Exception):
            await conn.close()

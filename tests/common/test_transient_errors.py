"""Lock conflicts are transient: a real PostgreSQL deadlock (SQLSTATE 40P01) or
serialization failure (40001) in a handler is retried until it goes through, and never
counts towards the dead-letter topic or `dead_timers` — even with one attempt allowed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus import Message, Received, create_bus
from libs.common.bus.base import dead_letter_topic
from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.db.tables import dead_timers, timers
from libs.common.timers import Timer, TimerWorker, schedule
from tests.common import plumbing_migrations
from tests.conftest import eventually, make_settings
from tests.servers import asyncpg_kwargs, fresh_database


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[tuple[Database, str]]:
    url = await fresh_database(pg_url)
    db = Database(url, "plumbing")
    await migrate(db, plumbing_migrations)
    async with db.begin() as conn:
        await conn.execute(text("CREATE TABLE locks (id int PRIMARY KEY, n int NOT NULL)"))
        await conn.execute(text("INSERT INTO locks VALUES (1, 0), (2, 0)"))
        await conn.execute(text("CREATE TABLE applied (value text PRIMARY KEY)"))
    yield db, url
    await db.dispose()


class Rival:
    """Another transaction on its own connection that makes the handler's transaction
    lose a real race: a deadlock (the handler is the one PostgreSQL aborts: its
    deadlock_timeout is the shorter) or, under REPEATABLE READ, a serialization failure."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.pending: asyncio.Task[None] | None = None
        self.sqlstates: list[str] = []

    @classmethod
    async def connect(cls, url: str) -> Rival:
        conn = await asyncpg.connect(
            **asyncpg_kwargs(url), server_settings={"search_path": "plumbing"}
        )
        await conn.execute("SET deadlock_timeout = '30s'")
        return cls(conn)

    async def settle(self) -> None:
        """Wait until the rival transaction of the previous race has committed."""
        if self.pending is not None:
            await self.pending
            self.pending = None

    async def deadlock(self, conn: AsyncConnection) -> None:
        await self.settle()
        await self.conn.execute("BEGIN")
        await self.conn.execute("UPDATE locks SET n = n + 1 WHERE id = 2")
        await conn.execute(text("SET LOCAL deadlock_timeout = '20ms'"))
        await conn.execute(text("UPDATE locks SET n = n + 1 WHERE id = 1"))
        pid = self.conn.get_server_pid()
        blocked = asyncio.create_task(self.conn.execute("UPDATE locks SET n = n + 1 WHERE id = 1"))
        waiting = text("SELECT count(*) > 0 FROM pg_locks WHERE pid = :pid AND NOT granted")

        async def rival_waits() -> bool:
            return bool(await conn.scalar(waiting, {"pid": pid}))

        await eventually(rival_waits, every=0.01)
        assert await rival_waits(), "the rival never waited for the handler's row"

        async def finish() -> None:
            await blocked  # goes through once the handler's transaction is rolled back
            await self.conn.execute("COMMIT")

        self.pending = asyncio.create_task(finish())
        await self._expect_failure(conn, "UPDATE locks SET n = n + 1 WHERE id = 2")

    async def serialization_failure(self, conn: AsyncConnection) -> None:
        """`conn` must be at the start of its transaction."""
        await self.settle()
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        await conn.scalar(text("SELECT n FROM locks WHERE id = 1"))
        await self.conn.execute("UPDATE locks SET n = n + 1 WHERE id = 1")
        await self._expect_failure(conn, "UPDATE locks SET n = n + 1 WHERE id = 1")

    async def _expect_failure(self, conn: AsyncConnection, statement: str) -> None:
        try:
            await conn.execute(text(statement))
        except Exception as exc:
            self.sqlstates.append(getattr(getattr(exc, "orig", None), "sqlstate", "?"))
            raise
        raise AssertionError("the race was not lost")

    async def close(self) -> None:
        await self.settle()
        await self.conn.close()


async def applied(db: Database) -> set[str]:
    async with db.connect() as conn:
        return set((await conn.execute(text("SELECT value FROM applied"))).scalars())


@pytest.mark.parametrize("race", ["deadlock", "serialization_failure"])
async def test_a_lost_lock_race_in_a_consumer_is_retried_not_dead_lettered(
    pg: tuple[Database, str], tmp_path: Path, race: str
) -> None:
    db, url = pg
    rival = await Rival.connect(url)
    lose = getattr(rival, race)
    losses = [3]

    async def handler(batch: list[Received]) -> None:
        await rival.settle()
        async with db.begin() as conn:
            if losses[0] > 0:
                losses[0] -= 1
                await lose(conn)
            for record in batch:
                await conn.execute(
                    text("INSERT INTO applied VALUES (:v)"), {"v": record.value.decode()}
                )

    settings = make_settings("embedded", tmp_path, consumer_max_attempts=1)
    bus = create_bus(settings)
    await bus.start()
    dead: list[bytes] = []

    async def collect(batch: list[Received]) -> None:
        dead.extend(r.value for r in batch)

    consumer = bus.consumer("contended", ["t"], handler)
    dlt = bus.consumer("contended-dlt", [dead_letter_topic("t")], collect)
    try:
        await bus.publish([Message("t", "shop:cust", f"m{i}".encode()) for i in range(3)])
        await consumer.start()
        await dlt.start()
        await eventually(lambda: _done(applied(db), 3), within=60)
        await consumer.stop()
        await bus.publish([Message(dead_letter_topic("t"), "shop:cust", b"marker")])
        await eventually(lambda: _true(b"marker" in dead))
    finally:
        await consumer.stop()
        await dlt.stop()
        await bus.stop()
        await rival.close()
    expected = {"deadlock": "40P01", "serialization_failure": "40001"}[race]
    assert rival.sqlstates == [expected] * 3
    assert await applied(db) == {"m0", "m1", "m2"}
    assert dead == [b"marker"], "nothing was dead-lettered"


async def test_a_deadlock_in_a_timer_handler_is_retried_not_a_dead_timer(
    pg: tuple[Database, str],
) -> None:
    db, url = pg
    rival = await Rival.connect(url)
    losses = [3]

    async def handler(conn: AsyncConnection, fired: list[Timer]) -> None:
        if losses[0] > 0:
            losses[0] -= 1
            await rival.deadlock(conn)
        for timer in fired:
            await conn.execute(text("INSERT INTO applied VALUES (:v)"), {"v": timer.key})

    now = datetime.now(UTC)
    async with db.begin() as conn:
        await schedule(
            conn,
            [Timer(f"shop|t{i}", "remind", "shop", now - timedelta(seconds=1)) for i in range(3)],
        )
    worker = TimerWorker(db, "plumbing", {"remind": handler}, max_attempts=1, poll_interval=0.05)
    await worker.start()
    try:
        await eventually(lambda: _done(applied(db), 3), within=60)
    finally:
        await worker.stop()
        await rival.close()
    assert rival.sqlstates == ["40P01"] * 3
    assert await applied(db) == {"shop|t0", "shop|t1", "shop|t2"}
    async with db.connect() as conn:
        assert (await conn.execute(dead_timers.select())).all() == []
        assert (await conn.execute(timers.select())).all() == []


async def _done(values: Any, n: int) -> bool:
    return len(await values) >= n


async def _true(value: bool) -> bool:
    return value

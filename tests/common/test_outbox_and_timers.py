"""The transactional outbox and the durable timers, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus import Bus, BusUnavailable, Message, Received, create_bus
from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.db.tables import dead_timers, outbox, processed_events, timers
from libs.common.inbox import claim_new, pruner
from libs.common.outbox import OutboxRelay, enqueue
from libs.common.settings import Settings
from libs.common.timers import Recurring, Timer, TimerWorker, cancel, schedule
from tests.common import plumbing_migrations
from tests.conftest import eventually

NOW = datetime(2026, 11, 11, tzinfo=UTC)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(settings.database_url_for("plumbing"), "plumbing")
    assert await migrate(database, plumbing_migrations) == ["m0001_plumbing"]
    assert await migrate(database, plumbing_migrations) == []
    yield database
    await database.dispose()


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = create_bus(settings)
    await b.start()
    yield b
    await b.stop()


async def count(db: Database, table: object) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]


async def test_outbox_publishes_only_what_committed_once_each(
    db: Database, bus: Bus, settings: Settings
) -> None:
    t = f"{settings.topic_namespace}outbox"
    await bus.ensure_topics([t])
    with pytest.raises(RuntimeError):
        async with db.begin() as conn:
            await enqueue(conn, [Message(t, "k", b"rolled-back")])
            raise RuntimeError("the change failed")
    async with db.begin() as conn:
        await enqueue(conn, [Message(t, f"k{i}", f"m{i}".encode()) for i in range(25)])

    seen: list[Received] = []

    async def collect(batch: list[Received]) -> None:
        seen.extend(batch)

    consumer = bus.consumer("outbox-reader", [t], collect)
    await consumer.start()
    relay = OutboxRelay(db, bus, "plumbing", batch_size=10)
    await relay.start()
    relay.notify()
    await eventually(lambda: _true(len(seen) >= 25))
    await asyncio.sleep(0.5)
    await relay.stop()
    await consumer.stop()
    assert sorted(r.value for r in seen) == sorted(f"m{i}".encode() for i in range(25))
    assert await count(db, outbox) == 0


async def test_outbox_keeps_rows_while_the_bus_is_down(db: Database, settings: Settings) -> None:
    down = create_bus(settings)
    await down.start()
    await down.stop()
    async with db.begin() as conn:
        await enqueue(conn, [Message(f"{settings.topic_namespace}x", "k", b"kept")])
    relay = OutboxRelay(db, down, "plumbing")
    with pytest.raises(BusUnavailable):
        await relay.relay_once()
    assert await count(db, outbox) == 1


async def test_duplicate_event_ids_are_claimed_once(db: Database) -> None:
    async with db.begin() as conn:
        assert await claim_new(conn, "c", ["a", "b", "a"]) == {"a", "b"}
    async with db.begin() as conn:
        assert await claim_new(conn, "c", ["a", "c"]) == {"c"}
        assert await claim_new(conn, "other", ["a"]) == {"a"}
    assert await count(db, processed_events) == 4


class Recorder:
    """A timer handler that writes its effect (an inbox row) in the firing transaction."""

    def __init__(self, fail_keys: set[str] | None = None) -> None:
        self.fired: list[Timer] = []
        self.fail_keys = fail_keys or set()

    async def __call__(self, conn: AsyncConnection, batch: list[Timer]) -> None:
        if any(t.key in self.fail_keys for t in batch):
            raise ValueError("handler failed")
        await claim_new(conn, "timer-effect", [t.key for t in batch])
        self.fired.extend(batch)


def worker(db: Database, handler: Recorder, now: datetime, **kw: int) -> TimerWorker:
    return TimerWorker(db, "plumbing", {"remind": handler}, clock=lambda: now, **kw)


async def test_only_due_timers_fire_and_their_effect_commits_with_them(db: Database) -> None:
    async with db.begin() as conn:
        await schedule(
            conn,
            [
                Timer("a", "remind", "shop", NOW - timedelta(seconds=5), {"n": 1}),
                Timer("b", "remind", "shop", NOW, {"n": 2}),
                Timer("later", "remind", "shop", NOW + timedelta(hours=1)),
            ],
        )
    handler = Recorder()
    assert await worker(db, handler, NOW).fire_due() == 2
    assert sorted(t.key for t in handler.fired) == ["a", "b"]
    assert {t.key: t.payload for t in handler.fired} == {"a": {"n": 1}, "b": {"n": 2}}
    assert all(t.due_at.tzinfo is not None for t in handler.fired)
    assert await count(db, timers) == 1
    assert await count(db, processed_events) == 2
    assert await worker(db, handler, NOW).fire_due() == 0


async def test_rescheduling_a_key_replaces_it_and_cancel_removes_it(db: Database) -> None:
    async with db.begin() as conn:
        await schedule(conn, [Timer("cust-1", "remind", "shop", NOW)])
        await schedule(conn, [Timer("cust-1", "remind", "shop", NOW + timedelta(days=1))])
        await schedule(conn, [Timer("cust-2", "remind", "shop", NOW)])
    assert await count(db, timers) == 2
    async with db.begin() as conn:
        assert await cancel(conn, ["cust-2", "never-scheduled"]) == 1
    handler = Recorder()
    assert await worker(db, handler, NOW).fire_due() == 0
    assert await worker(db, handler, NOW + timedelta(days=1)).fire_due() == 1
    assert [t.key for t in handler.fired] == ["cust-1"]


async def test_a_failing_timer_is_retried_then_dead_without_blocking_others(
    db: Database,
) -> None:
    async with db.begin() as conn:
        await schedule(conn, [Timer(f"t{i}", "remind", "shop", NOW) for i in range(5)])
    handler = Recorder(fail_keys={"t2"})
    w = worker(db, handler, NOW + timedelta(days=1), max_attempts=2)
    await w.fire_due()
    assert sorted(t.key for t in handler.fired) == ["t0", "t1", "t3", "t4"]
    async with db.connect() as conn:
        row = (await conn.execute(select(timers))).one()
    assert (row.key, row.attempts) == ("t2", 1)
    assert "handler failed" in row.last_error
    await worker(db, handler, NOW + timedelta(days=2), max_attempts=2).fire_due()
    assert await count(db, timers) == 0
    assert await count(db, dead_timers) == 1


async def test_concurrent_workers_fire_each_timer_once(db: Database) -> None:
    async with db.begin() as conn:
        await schedule(conn, [Timer(f"t{i}", "remind", "shop", NOW) for i in range(1000)])
    handler = Recorder()
    workers = [worker(db, handler, NOW, batch_size=50) for _ in range(3)]

    async def drain(w: TimerWorker) -> None:
        while await w.fire_due():
            pass

    await asyncio.gather(*(drain(w) for w in workers))
    keys = [t.key for t in handler.fired]
    assert len(keys) == 1000
    assert len(set(keys)) == 1000


async def _true(value: bool) -> bool:
    return value


async def test_recurring_job_runs_once_per_period_and_prunes_old_ids(db: Database) -> None:
    prune = Recurring("inbox.prune", timedelta(hours=1), pruner(timedelta(days=14)))
    async with db.begin() as conn:
        await prune.ensure(conn)
        await prune.ensure(conn)
        await conn.execute(
            processed_events.insert(),
            [
                {
                    "consumer": "c",
                    "event_id": "old",
                    "processed_at": datetime.now(UTC) - timedelta(days=30),
                },
                {"consumer": "c", "event_id": "recent", "processed_at": datetime.now(UTC)},
            ],
        )
    assert await count(db, timers) == 1
    soon = TimerWorker(
        db,
        "plumbing",
        {prune.kind: prune.handler},
        clock=lambda: datetime.now(UTC) + timedelta(minutes=59),
    )
    assert await soon.fire_due() == 0
    later = TimerWorker(
        db,
        "plumbing",
        {prune.kind: prune.handler},
        clock=lambda: datetime.now(UTC) + timedelta(minutes=61),
    )
    assert await later.fire_due() == 1
    async with db.connect() as conn:
        kept = list((await conn.execute(select(processed_events.c.event_id))).scalars())
        [due] = list((await conn.execute(select(timers.c.due_at))).scalars())
    assert kept == ["recent"]
    assert due > datetime.now(UTC) + timedelta(minutes=55), "it rescheduled itself"

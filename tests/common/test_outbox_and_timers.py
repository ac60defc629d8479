"""The transactional outbox and the durable timers, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
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
from libs.common.timers import (
    Recurring,
    Timer,
    TimerHandler,
    TimerWorker,
    after_commit,
    cancel,
    retry_dead_timers,
    schedule,
)
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

    async def relayed() -> bool:
        return await count(db, outbox) == 0

    await eventually(relayed)
    await relay.stop()
    # Whatever the relay published lies before these on the partition of its key: once
    # every marker is seen, a repeat of any message would have been seen too.
    await bus.publish([Message(t, f"k{i}", b"marker") for i in range(25)])
    await eventually(lambda: _true(sum(r.value == b"marker" for r in seen) == 25))
    await consumer.stop()
    assert sorted(r.value for r in seen if r.value != b"marker") == sorted(
        f"m{i}".encode() for i in range(25)
    )
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


def worker(
    db: Database, handler: Recorder, now: datetime, *, batch_size: int = 500, max_attempts: int = 10
) -> TimerWorker:
    return TimerWorker(
        db,
        "plumbing",
        {"remind": handler},
        clock=lambda: now,
        batch_size=batch_size,
        max_attempts=max_attempts,
    )


async def test_only_due_timers_fire_and_their_effect_commits_with_them(db: Database) -> None:
    async with db.begin() as conn:
        await schedule(
            conn,
            [
                Timer("shop|a", "remind", "shop", NOW - timedelta(seconds=5), {"n": 1}),
                Timer("shop|b", "remind", "shop", NOW, {"n": 2}),
                Timer("shop|later", "remind", "shop", NOW + timedelta(hours=1)),
            ],
        )
    handler = Recorder()
    assert await worker(db, handler, NOW).fire_due() == 2
    assert sorted(t.key for t in handler.fired) == ["shop|a", "shop|b"]
    assert {t.key: t.payload for t in handler.fired} == {"shop|a": {"n": 1}, "shop|b": {"n": 2}}
    assert all(t.due_at.tzinfo is not None for t in handler.fired)
    assert await count(db, timers) == 1
    assert await count(db, processed_events) == 2
    assert await worker(db, handler, NOW).fire_due() == 0


async def test_after_commit_jobs_run_only_once_their_round_committed(db: Database) -> None:
    """The hook for work that must not happen inside the claim (a provider call): it runs
    after the round committed, and never for a round that rolled back."""
    async with db.begin() as conn:
        await schedule(
            conn, [Timer("shop|ok", "ok", "shop", NOW), Timer("shop|bad", "bad", "shop", NOW)]
        )
    ran: list[tuple[str, int]] = []

    def handler(fail: bool) -> TimerHandler:
        async def fire(conn: AsyncConnection, batch: list[Timer]) -> None:
            for t in batch:

                async def job(key: str = t.key) -> None:
                    # Committed: another connection sees the claim (the timer row gone).
                    ran.append((key, await count(db, timers)))

                after_commit(conn, job)
            if fail:
                raise RuntimeError("handler failed after registering its job")

        return fire

    w = TimerWorker(
        db,
        "plumbing",
        {"ok": handler(False), "bad": handler(True)},
        clock=lambda: NOW,
        lanes=[["ok"], ["bad"]],
        max_attempts=1,
    )
    await w.fire_due()
    # "bad" rolled back (then was retried alone and died): its jobs never ran.
    # (The "ok" lane committed first: only the "bad" timer was left when its job ran.)
    assert ran == [("shop|ok", 1)]
    assert await count(db, dead_timers) == 1


async def test_a_stop_lets_the_round_in_hand_commit(db: Database) -> None:
    """A stop during a round waits for it: its timers are fired and their effect committed
    (a cancel would roll the round back), and the database is free for a writer after."""
    async with db.begin() as conn:
        await schedule(conn, [Timer(f"shop|{n}", "remind", "shop", NOW) for n in range(3)])
    entered, release = asyncio.Event(), asyncio.Event()
    recorder = Recorder()

    async def slow(conn: AsyncConnection, batch: list[Timer]) -> None:
        await recorder(conn, batch)
        entered.set()
        await release.wait()

    w = TimerWorker(db, "plumbing", {"remind": slow}, clock=lambda: NOW)
    await w.start()
    await asyncio.wait_for(entered.wait(), 30)
    stopping = asyncio.create_task(w.stop())
    await asyncio.sleep(0)  # the stop is under way, waiting for the round
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 30)
    assert await count(db, timers) == 0
    assert await count(db, processed_events) == 3
    async with db.begin() as conn:  # nothing holds the write lock
        await schedule(conn, [Timer("shop|after", "remind", "shop", NOW)])
    assert await count(db, timers) == 1


async def test_rescheduling_a_key_replaces_it_and_cancel_removes_it(db: Database) -> None:
    async with db.begin() as conn:
        await schedule(conn, [Timer("shop|cust-1", "remind", "shop", NOW)])
        await schedule(conn, [Timer("shop|cust-1", "remind", "shop", NOW + timedelta(days=1))])
        await schedule(conn, [Timer("shop|cust-2", "remind", "shop", NOW)])
    assert await count(db, timers) == 2
    async with db.begin() as conn:
        assert await cancel(conn, ["shop|cust-2", "shop|never-scheduled"]) == 1
    handler = Recorder()
    assert await worker(db, handler, NOW).fire_due() == 0
    assert await worker(db, handler, NOW + timedelta(days=1)).fire_due() == 1
    assert [t.key for t in handler.fired] == ["shop|cust-1"]


async def test_a_failing_timer_is_retried_then_dead_without_blocking_others(
    db: Database,
) -> None:
    async with db.begin() as conn:
        await schedule(conn, [Timer(f"shop|t{i}", "remind", "shop", NOW) for i in range(5)])
    handler = Recorder(fail_keys={"shop|t2"})
    w = worker(db, handler, NOW + timedelta(days=1), max_attempts=2)
    await w.fire_due()
    assert sorted(t.key for t in handler.fired) == ["shop|t0", "shop|t1", "shop|t3", "shop|t4"]
    async with db.connect() as conn:
        row = (await conn.execute(select(timers))).one()
    assert (row.key, row.attempts) == ("shop|t2", 1)
    assert "handler failed" in row.last_error
    await worker(db, handler, NOW + timedelta(days=2), max_attempts=2).fire_due()
    assert await count(db, timers) == 0
    assert await count(db, dead_timers) == 1


async def test_dead_timers_are_made_due_again_and_fire(db: Database) -> None:
    async with db.begin() as conn:
        await schedule(conn, [Timer(f"shop|t{i}", "remind", "shop", NOW) for i in range(3)])
    failing = Recorder(fail_keys={"shop|t1"})
    await worker(db, failing, NOW, max_attempts=1).fire_due()
    assert await count(db, dead_timers) == 1
    later = NOW + timedelta(days=1)
    assert await retry_dead_timers(db, now=later) == (1, 0)
    assert await count(db, dead_timers) == 0
    assert await retry_dead_timers(db, now=later) == (0, 0)
    fixed = Recorder()
    assert await worker(db, fixed, later - timedelta(seconds=1)).fire_due() == 0
    assert await worker(db, fixed, later).fire_due() == 1
    assert [t.key for t in fixed.fired] == ["shop|t1"]
    assert fixed.fired[0].attempts == 0


async def test_concurrent_workers_fire_each_timer_once(db: Database) -> None:
    """Counted by committed effects, not by handler calls: the handler adds an outbox row
    per timer in the firing transaction (not idempotent), so a fire whose transaction
    rolled back leaves nothing and a timer fired twice leaves two rows."""
    keys = [f"shop|t{i}" for i in range(1000)]
    async with db.begin() as conn:
        await schedule(conn, [Timer(k, "remind", "shop", NOW) for k in keys])

    def effect_of(number: int) -> TimerHandler:
        async def record(conn: AsyncConnection, batch: list[Timer]) -> None:
            await enqueue(conn, [Message("fired", t.key, str(number).encode()) for t in batch])

        return record

    workers = [
        TimerWorker(db, "plumbing", {"remind": effect_of(w)}, clock=lambda: NOW, batch_size=50)
        for w in range(3)
    ]

    async def drain(w: TimerWorker) -> None:
        while await w.fire_due():
            pass

    await asyncio.gather(*(drain(w) for w in workers))
    async with db.connect() as conn:
        rows = (await conn.execute(select(outbox.c.key, outbox.c.value))).all()
    fired = Counter(key for key, _ in rows)
    assert {k: n for k, n in fired.items() if n != 1} == {}, "timers fired more than once"
    assert set(fired) == set(keys)
    if db.engine.dialect.name == "postgresql":
        # With SKIP LOCKED the others claim the rows one holds; without it they would wait,
        # find those rows gone and stop, leaving every timer to one worker. (SQLite has
        # one writer at a time: which worker's claims win there is the scheduler's call.)
        assert len({worker for _, worker in rows}) > 1, "the workers shared the timers"
    assert await count(db, timers) == 0


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


async def test_lanes_keep_a_flood_of_one_kind_from_delaying_another(db: Database) -> None:
    """A broadcast's thousand due timers, due first, and one reminder: with lanes the
    reminder fires in the first round; claimed by due time alone it would wait behind
    every batch of the broadcast (the control)."""
    async with db.begin() as conn:
        await schedule(
            conn,
            [
                Timer(f"shop|b{n}", "broadcast", "shop", NOW - timedelta(hours=1, seconds=n))
                for n in range(1000)
            ]
            + [Timer("shop|reminder", "reminder", "shop", NOW)],
        )
    fired: dict[str, list[str]] = {"broadcast": [], "reminder": []}

    def recorder(kind: str) -> TimerHandler:
        async def handle(_conn: AsyncConnection, batch: list[Timer]) -> None:
            fired[kind] += [t.key for t in batch]

        return handle

    handlers = {kind: recorder(kind) for kind in fired}
    by_due = TimerWorker(db, "plumbing", handlers, clock=lambda: NOW, batch_size=100)
    assert await by_due.fire_due() == 100
    assert fired["reminder"] == []  # the control: behind 900 broadcast timers
    laned = TimerWorker(
        db, "plumbing", handlers, clock=lambda: NOW, batch_size=100, lanes=[["reminder"]]
    )
    assert await laned.fire_due() == 101
    assert fired["reminder"] == ["shop|reminder"]
    assert len(fired["broadcast"]) == 200

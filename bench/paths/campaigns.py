"""Journeys (`services/campaigns`), in process on the mode's database, no HTTP and no bus:
what the engine itself costs.

1. enroll: `timers_backlog` `order.created` events of distinct orders, 500 per
   transaction, through the consumer's own unit of work (inbox claim, projection,
   triggers, first step, timers, counters) into an active `unpaid_reminder`; against
   writing the same rows (processed ids, enrollments, timers) with the same batching and
   no logic.
2. fire: `timers_pending` enrollments waiting a day out, then `timers_backlog` reminders
   made due; the `TimerWorker`s of a campaigns process (`HUITOU_TIMER_WORKERS` on
   PostgreSQL, one on SQLite) with the service's handler and lanes fire them, each
   requesting its message (send row, `notification.requested` in the outbox, the
   enrollment moved on, counters) in the fire's transaction; against the raw
   claim-and-delete loop on the same table. Checked: one send row per reminder.
3. fair: a broadcast's `timers_backlog` marketing waits of one shop all due, and one
   unpaid reminder of another shop due now: the reminder's lateness with the lanes
   (the product) and without them (claimed by due time alone, the control).
The Celery comparison (`celery` path) prints this fire rate beside Celery's.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import REGISTRY
from sqlalchemy import func, insert, select

from bench.core import Measurement, Run, Stack
from bench.stats import Stat
from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.db.tables import processed_events, shops, timers
from libs.common.events import OrderData, new_event
from libs.common.inbox import claim_new
from libs.common.settings import Settings
from libs.common.timers import TimerWorker, timer_key
from services.campaigns import migrations
from services.campaigns.consuming import apply_events
from services.campaigns.engine import TIMER_KINDS
from services.campaigns.firing import fire_timers
from services.campaigns.models import (
    enrollments,
    journey_versions,
    journeys,
    sends,
    watermarks,
)
from services.campaigns.playbooks import make

BATCH = 500
SHOP = "bench-shop"
OTHER = "bench-other"


async def measure(run: Run, stack: Stack) -> None:
    if stack.embedded:
        path: Path = stack.dir("campaigns") / "campaigns.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        fresh = await stack.database()
        assert fresh is not None
        url = fresh
    db = Database(url, "campaigns")
    try:
        await db.ensure_schema()
        await migrate(db, migrations)
        journey = await _setup(db)
        await _enroll(run, db, stack.mode)
        await _fire(run, db, stack.mode, journey)
        await _fair(run, db, stack.mode, journey)
    finally:
        await db.dispose()


async def _setup(db: Database) -> str:
    now = datetime.now(UTC)
    definition = make("unpaid_reminder", {"delay": "P1D"})
    journey = "j_bench"
    async with db.begin() as conn:
        for shop in (SHOP, OTHER):
            await conn.execute(
                insert(shops).values(
                    shop_id=shop,
                    name=shop,
                    timezone="Asia/Shanghai",
                    currency="CNY",
                    created_at=now,
                )
            )
            await conn.execute(
                insert(journeys).values(
                    shop_id=shop,
                    journey_id=journey,
                    name="bench",
                    category="transactional",
                    status="active",
                    version=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(
                insert(journey_versions).values(
                    shop_id=shop,
                    journey_id=journey,
                    version=1,
                    definition=orjson.dumps(definition).decode(),
                    created_at=now,
                    active_since=now - timedelta(days=1),
                )
            )
        # The pipeline is caught up (no consumer runs here): gated waits fire when due.
        await conn.execute(
            insert(watermarks).values(
                consumer="campaigns",
                topic="bench",
                partition=0,
                through=time.time() + 86400 * 30,
                updated_at=time.time(),
            )
        )
    return journey


def _orders(count: int, prefix: str) -> list[Any]:
    now = datetime.now(UTC)
    return [
        new_event(
            type="order.created",
            shop_id=SHOP,
            source="bench",
            data=OrderData.model_validate(
                {
                    "order_id": f"{prefix}-{i}",
                    "customer": {"id": f"c-{i}", "phone": "+8613800138000"},
                    "status": "created",
                    "total": {"amount_minor": 25900, "currency": "CNY"},
                }
            ),
            subject=f"c-{i}",
            id=f"{prefix}-{i}",
            time=now,
        )
        for i in range(count)
    ]


async def _enroll(run: Run, db: Database, mode: str) -> None:
    count = run.size.timers_backlog
    ours, raw = Stat(), Stat()
    for repeat in range(run.size.repeats):
        events = _orders(count, f"e{repeat}")
        started = time.perf_counter()
        for i in range(0, count, BATCH):
            batch = events[i : i + BATCH]
            async with db.begin() as conn:
                fresh = await claim_new(conn, "campaigns", [e.dedupe_key for e in batch])
                await apply_events(conn, [e for e in batch if e.dedupe_key in fresh])
        ours.add(count / (time.perf_counter() - started))
        raw.add(await _raw_enroll(db, count, f"r{repeat}"))
    async with db.connect() as conn:
        made = (await conn.execute(select(func.count()).select_from(enrollments))).scalar_one()
    run.add(
        Measurement(
            path="campaigns.enroll",
            mode=mode,
            unit="events/s",
            ours=ours,
            raw=raw,
            raw_label="the same rows, same batches, no logic",
            note=(
                f"order.created → unpaid_reminder, {BATCH} per transaction; "
                f"{made:,} enrollment rows in the table (ours and the raw copy's)"
            ),
        )
    )


async def _raw_enroll(db: Database, count: int, prefix: str) -> float:
    now = datetime.now(UTC)
    context = orjson.dumps({"facts": {}, "vars": {}, "trigger": "x"}).decode()
    started = time.perf_counter()
    for i in range(0, count, BATCH):
        ids = range(i, min(count, i + BATCH))
        async with db.begin() as conn:
            await conn.execute(
                insert(processed_events),
                [
                    {"consumer": "raw", "event_id": f"{prefix}-{n}", "processed_at": now}
                    for n in ids
                ],
            )
            await conn.execute(
                insert(enrollments), [_enrollment(f"{prefix}-{n}", now, context) for n in ids]
            )
            await conn.execute(
                insert(timers),
                [_timer(f"{prefix}-{n}", now + timedelta(days=1), "transactional") for n in ids],
            )
    return count / (time.perf_counter() - started)


def _enrollment(eid: str, due: datetime, context: str, shop: str = SHOP) -> dict[str, Any]:
    return {
        "shop_id": shop,
        "enrollment_id": eid,
        "journey_id": "j_bench",
        "version": 1,
        "customer_id": f"c-{eid}",
        "order_id": f"o-{eid}",
        "status": "waiting",
        "step_id": "wait",
        "due_at": due,
        "held_out": False,
        "context": context,
        "entered_at": due - timedelta(days=1),
        "updated_at": due,
        "messaged": False,
    }


def _timer(eid: str, due: datetime, category: str, shop: str = SHOP) -> dict[str, Any]:
    return {
        "key": timer_key(shop, "enr", eid),
        "kind": TIMER_KINDS[category],
        "shop_id": shop,
        "due_at": due,
        "payload": orjson.dumps({"e": eid, "s": "wait", "m": "wait", "g": True}).decode(),
        "attempts": 0,
    }


async def _waiting(db: Database, prefix: str, count: int, due: datetime, **kw: str) -> None:
    context = orjson.dumps({"facts": {}, "vars": {"order": {"id": "x"}}, "trigger": "x"}).decode()
    category = kw.pop("category", "transactional")
    for i in range(0, count, 5_000):
        ids = [f"{prefix}-{n}" for n in range(i, min(count, i + 5_000))]
        async with db.begin() as conn:
            await conn.execute(
                insert(enrollments), [_enrollment(e, due, context, **kw) for e in ids]
            )
            await conn.execute(insert(timers), [_timer(e, due, category, **kw) for e in ids])


async def _sent(db: Database, prefix: str) -> int:
    async with db.connect() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count())
                    .select_from(sends)
                    .where(sends.c.enrollment_id.like(f"{prefix}-%"))
                )
            ).scalar_one()
        )


def _worker(db: Database, lanes: bool) -> TimerWorker:
    async def fire(conn: Any, fired: list[Any]) -> None:
        await fire_timers(conn, fired)

    return TimerWorker(
        db,
        "campaigns",
        dict.fromkeys(TIMER_KINDS.values(), fire),
        lanes=[[k] for k in TIMER_KINDS.values()] if lanes else (),
    )


async def _fire(run: Run, db: Database, mode: str, journey: str) -> None:
    pending, backlog = run.size.timers_pending, run.size.timers_backlog
    run.log(f"  {pending:,} enrollments waiting a day out")
    await _waiting(db, "pending", pending, datetime.now(UTC) + timedelta(days=1))
    ours, raw = Stat(), Stat()
    checked = []
    for repeat in range(run.size.repeats):
        prefix = f"due{repeat}"
        await _waiting(db, prefix, backlog, datetime.now(UTC) - timedelta(seconds=1))
        # As many workers as a campaigns process runs (`HUITOU_TIMER_WORKERS` on
        # PostgreSQL, one on SQLite).
        workers = [_worker(db, lanes=True) for _ in range(_workers(db))]
        before = _fired()
        started = time.perf_counter()
        for worker in workers:
            await worker.start()
        while _fired() - before < backlog:
            if time.perf_counter() - started > backlog / 100 + 120:
                raise TimeoutError("reminders did not all fire")
            await _pause()
        for worker in workers:
            await worker.stop()  # the round in hand commits first
        ours.add(backlog / (time.perf_counter() - started))
        checked.append(await _sent(db, prefix))
        raw.add(await _raw_fire(db, f"raw{repeat}", backlog))
    run.add(
        Measurement(
            path="campaigns.fire",
            mode=mode,
            unit="fires/s",
            ours=ours,
            raw=raw,
            raw_label="claim-and-delete loop, same table",
            note=(
                f"reminders fired with the send requested by {_workers(db)} "
                f"worker{'s' if _workers(db) > 1 else ''}, {pending:,} pending; "
                f"send rows per run: {checked} of {backlog:,} each"
            ),
        )
    )


def _workers(db: Database) -> int:
    return Settings().timer_workers if db.is_postgres else 1


def _fired() -> float:
    """Reminders the worker in this process has fired (its `huitou_timers_fired_total`),
    read without touching the database. Counting rows instead (the send rows, or the due
    timers) every 20 ms took database time from the very firing it measured: on SQLite
    1 s in 101 polls at 20,000 reminders, on PostgreSQL 2.9 s in 156 polls (an index count
    over deleted, not yet vacuumed, timers), against 1.6–4.8 s for the firing's own
    statements."""
    return sum(
        REGISTRY.get_sample_value(
            "huitou_timers_fired_total", {"service": "campaigns", "kind": kind}
        )
        or 0.0
        for kind in TIMER_KINDS.values()
    )


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.02)


async def _raw_fire(db: Database, prefix: str, count: int) -> float:
    await _waiting(db, prefix, count, datetime.now(UTC) - timedelta(seconds=1))
    claim = (
        "DELETE FROM timers WHERE key IN (SELECT key FROM timers WHERE due_at <= {now} "
        "ORDER BY due_at LIMIT 500{lock}) RETURNING key"
    )
    postgres = db.is_postgres
    statement = claim.format(
        now="$1" if postgres else "?", lock=" FOR UPDATE SKIP LOCKED" if postgres else ""
    )
    fired = 0
    started = time.perf_counter()
    while fired < count:
        async with db.begin() as conn:
            now: Any = datetime.now(UTC)
            if not postgres:
                now = now.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
            rows = (await conn.exec_driver_sql(statement, (now,))).all()
        if not rows:
            break
        fired += len(rows)
    return fired / (time.perf_counter() - started)


async def _fair(run: Run, db: Database, mode: str, journey: str) -> None:
    flood = run.size.timers_backlog
    lateness: dict[str, float] = {}
    for lanes in (True, False):
        prefix = f"flood{int(lanes)}-{uuid.uuid4().hex[:4]}"
        await _waiting(
            db, prefix, flood, datetime.now(UTC) - timedelta(hours=1), category="marketing"
        )
        reminder = f"rem{int(lanes)}-{uuid.uuid4().hex[:4]}"
        due = datetime.now(UTC)
        await _waiting(db, reminder, 1, due, shop=OTHER)
        worker = _worker(db, lanes=lanes)
        await worker.start()
        while await _sent_of(db, reminder) is None:
            await _pause()
        requested = await _sent_of(db, reminder)
        assert requested is not None
        lateness["lanes" if lanes else "by_due"] = (requested - due).total_seconds()
        while await _sent(db, prefix) < flood:
            await _pause()
        await worker.stop()
    run.add(
        Measurement(
            path="campaigns.fair",
            mode=mode,
            unit="ms late",
            ours=Stat([lateness["lanes"] * 1000]),
            note=(
                f"another shop's reminder due now behind a {flood:,}-wait broadcast: "
                f"{lateness['lanes'] * 1000:,.0f} ms late with lanes, "
                f"{lateness['by_due'] * 1000:,.0f} ms by due time alone"
            ),
            extra={"by_due_ms": lateness["by_due"] * 1000},
            higher_is_better=False,
        )
    )


async def _sent_of(db: Database, prefix: str) -> datetime | None:
    async with db.connect() as conn:
        value = (
            await conn.execute(
                select(sends.c.requested_at).where(sends.c.enrollment_id.like(f"{prefix}-%"))
            )
        ).scalar()
    return value

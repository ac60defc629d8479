"""The timer path of the journey engine: waits that came due, in the claiming transaction.

Each fired wait re-checks its enrollment (locked; a goal that committed first wins), holds
it while its journey is paused, holds a wait an event could cancel until the consumers
have handled every partition up to its due time (the event-time watermark, at most
`journey_watermark_max_hold_s`), and walks on. `count_waits` keeps the waits-pending
gauge."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter, Gauge
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.keysets import by_shop, planned_per_execution
from libs.common.db.tables import timers
from libs.common.timers import Timer
from services.campaigns import projection
from services.campaigns.engine import (
    CONSUMER,
    TIMER_KINDS,
    Enrollment,
    Run,
    from_row,
    load_journeys,
    resume,
    select_rows,
)
from services.campaigns.models import enrollments, watermarks

WATERMARK_LAG = Gauge(
    "huitou_campaigns_watermark_lag_seconds",
    "How far the consumed-everything-before instant trails the clock",
)
WATERMARK_HOLDS = Counter(
    "huitou_campaigns_watermark_holds_total",
    "Cancellable waits held back because the pipeline had not caught up",
    ["outcome"],
)
WAITS_PENDING = Gauge(
    "huitou_campaigns_waits_pending",
    "Enrollments waiting on a timer, by category (counted every 30 s by whichever "
    "campaigns process runs the count: take the max across processes)",
    ["category"],
)


async def count_waits(conn: AsyncConnection, _now: datetime) -> None:
    """Set `huitou_campaigns_waits_pending` (a recurring job: an index-only count)."""
    rows = await conn.execute(
        select(timers.c.kind, func.count())
        .where(timers.c.kind.in_(list(TIMER_KINDS.values())))
        .group_by(timers.c.kind)
    )
    found: dict[str, int] = {str(kind): int(n) for kind, n in rows}
    for category, kind in TIMER_KINDS.items():
        WAITS_PENDING.labels(category).set(int(found.get(kind, 0)))


async def watermark(conn: AsyncConnection) -> float | None:
    """The instant (epoch seconds) before which every message of every partition campaigns
    consumes has been handled; None until the consumers reported."""
    value = (
        await conn.execute(
            select(watermarks.c.through)
            .where(watermarks.c.consumer == CONSUMER)
            .order_by(watermarks.c.through)
            .limit(1)
        )
    ).scalar()
    return None if value is None else float(value)


async def fire_timers(
    conn: AsyncConnection,
    fired: Sequence[Timer],
    *,
    namespace: str = "",
    max_hold: float = 60.0,
    now: datetime | None = None,
) -> None:
    """Waits that came due: re-check each enrollment (a goal may have ended it), hold it
    while its journey is paused, hold cancellable waits until the pipeline caught up, and
    walk on."""
    run = Run(conn, now or datetime.now(UTC), namespace=namespace)
    run.claimed = {t.key for t in fired}
    by_key = {(t.shop_id, str(t.payload["e"])): t for t in fired}
    async with planned_per_execution(conn):  # as the consumer's reads (`consuming`)
        e = enrollments.c
        loaded: list[Enrollment] = []
        for where in by_shop(enrollments, "enrollment_id", by_key, chunk=1000):
            query = select_rows().where(where).order_by(e.shop_id, e.enrollment_id)
            if run.postgres:
                query = query.with_for_update()
            loaded += [from_row(row) for row in await conn.execute(query)]
        gated_any = any(t.payload.get("g") for t in fired)
        mark = await watermark(conn) if gated_any else None
        if mark is not None:
            WATERMARK_LAG.set(max(0.0, run.now.timestamp() - mark))
        await run.load_shops(en.shop_id for en in loaded)
        run.journeys = await load_journeys(conn, {en.shop_id for en in loaded})
        keys = [(en.shop_id, en.customer_id, en.order_id) for en in loaded]
        run.snap = await projection.load_state(conn, keys)
        await run.read_recent_sends({(en.shop_id, en.customer_id) for en in loaded})
    for enrollment in loaded:
        timer = by_key[enrollment.key]
        run.add(enrollment)
        if enrollment.status != "waiting" or enrollment.step_id != timer.payload["s"]:
            continue  # a goal or an event moved it on first
        journey = run.journeys.get((enrollment.shop_id, enrollment.journey_id))
        if journey is None or journey.status == "archived":
            continue
        if journey.status == "paused":
            enrollment.status = "held"
            enrollment.context["held_mode"] = timer.payload.get("m", "wait")
            run.touch(enrollment)
            continue
        if timer.payload.get("g"):
            # The wait's own due time (a held timer comes back later than it).
            due = (enrollment.due_at or timer.due_at).timestamp()
            if mark is None or mark < due:
                if run.now.timestamp() - due < max_hold:
                    WATERMARK_HOLDS.labels("held").inc()
                    run.schedule[enrollment.timer] = Timer(
                        timer.key,
                        timer.kind,
                        timer.shop_id,
                        run.now + timedelta(seconds=0.2),
                        timer.payload,
                    )
                    continue
                WATERMARK_HOLDS.labels("max_hold_reached").inc()
        await resume(run, journey, enrollment, timer.payload.get("m", "wait"))
    await run.flush()

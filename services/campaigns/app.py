"""The campaigns service: journeys that fire on time, once, and end the moment their goal
is met (`engine`), the shipped playbooks (`playbooks`) and the reports (`reports`).

It consumes every domain topic (orders, parcels, behaviour, lifecycle's customer changes)
and the notifier's statuses, fires waits on the durable timers (one lane per category, so
a marketing broadcast never delays a transactional reminder: `TimerWorker.lanes`), and requests
messages through its outbox on `notifications.requested`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import upsert
from libs.common.events import Envelope
from libs.common.service import ServiceContext, ServiceParts, ServiceSpec, Subscription
from libs.common.timers import Recurring, Timer
from services.campaigns import migrations
from services.campaigns.api import build_router
from services.campaigns.broadcasts import BROADCAST_KIND, fire_broadcasts
from services.campaigns.consuming import apply_events
from services.campaigns.engine import CONSUMER, TIMER_KINDS
from services.campaigns.firing import count_waits, fire_timers
from services.campaigns.models import watermarks
from services.campaigns.statuses import apply_statuses

GROUP = CONSUMER


def build(ctx: ServiceContext) -> ServiceParts:
    namespace = ctx.settings.topic_namespace
    max_hold = ctx.settings.journey_watermark_max_hold_s

    async def apply(conn: AsyncConnection, events: list[Envelope]) -> None:
        await apply_events(conn, events, namespace=namespace)

    async def statuses(conn: AsyncConnection, events: list[Envelope]) -> None:
        await apply_statuses(conn, events)

    async def fire(conn: AsyncConnection, fired: list[Timer]) -> None:
        await fire_timers(conn, fired, namespace=namespace, max_hold=max_hold)

    async def broadcast(conn: AsyncConnection, fired: list[Timer]) -> None:
        await fire_broadcasts(conn, fired, namespace=namespace)

    async def progress(through: dict[tuple[str, int], float]) -> None:
        """Keep this member's partition watermarks where every campaigns process's timer
        worker reads them (they only move forward)."""
        if not through:
            return
        now = time.time()
        async with ctx.db.begin() as conn:
            await conn.execute(
                upsert(
                    conn,
                    watermarks,
                    ["consumer", "topic", "partition"],
                    ["updated_at"],
                    merge=lambda excluded: {
                        "through": _greatest(conn, watermarks.c.through, excluded.through)
                    },
                ),
                [
                    {"consumer": GROUP, "topic": t, "partition": p, "through": v, "updated_at": now}
                    for (t, p), v in sorted(through.items())
                ],
            )

    topics = [ctx.topic(t) for t in ("orders", "logistics", "behavior", "customers")]
    return ServiceParts(
        router=build_router(ctx, clock=lambda: datetime.now(UTC)),
        subscriptions=[
            Subscription(GROUP, topics, ctx.events_handler(GROUP, apply), progress=progress),
            Subscription(
                f"{GROUP}.statuses",
                [ctx.topic("notifications.status")],
                ctx.events_handler(f"{GROUP}.statuses", statuses),
            ),
        ],
        timer_handlers={**dict.fromkeys(TIMER_KINDS.values(), fire), BROADCAST_KIND: broadcast},
        timer_lanes=[[kind] for kind in (*TIMER_KINDS.values(), BROADCAST_KIND)],
        recurring=[Recurring("campaigns.count_waits", timedelta(seconds=30), count_waits)],
    )


def _greatest(conn: AsyncConnection, a: object, b: object) -> object:
    from sqlalchemy import func

    if conn.dialect.name == "postgresql":
        return func.greatest(a, b)
    return func.max(a, b)  # SQLite's two-argument max() is the scalar greatest


SPEC = ServiceSpec(name="campaigns", migrations=migrations, build=build)

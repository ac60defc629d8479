"""Scheduled broadcasts and promotion dates: journeys whose trigger is a time, not an event.

Activating (or resuming, or editing while active) such a journey schedules one durable
timer for it, due at the broadcast time (a time without an offset is the shop's local
time; a promotion trigger is `offset` from the local day the promotion starts, at the local
time `at`). When it fires, it enrolls one page of the customers campaigns knows (ordered by
id, `PAGE` at a time) who match the audience, and schedules itself again, due at once, with
the page's last id: a million-customer broadcast is a few thousand short transactions in
its own timer lane, never one long one, and never in the way of transactional waits.
Re-entry and holdout rules apply as to any enrollment; the enrollment id is the journey's
version and the customer, so a page fired twice (a crash) enrolls nobody twice.

A paused journey's broadcast timer waits (rescheduled a day on, its page kept) and resume
makes it due at once; archive deletes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.tables import timers
from libs.common.problems import Problem
from libs.common.timers import Timer, schedule, timer_key
from services.campaigns import projection
from services.campaigns.conditions import evaluate
from services.campaigns.definitions import Definition
from services.campaigns.engine import Entry, Run, enroll, load_journeys
from services.campaigns.models import customers, promotions

BROADCAST_KIND = "journey.broadcast"
PAGE = 500
LATE_LIMIT = timedelta(hours=1)
"""A broadcast activated more than this after its time is refused (409), not sent late."""


def broadcast_key(shop: str, journey_id: str) -> str:
    return timer_key(shop, "broadcast", journey_id)


async def broadcast_time(
    conn: AsyncConnection, shop: str, definition: Definition, zone: ZoneInfo
) -> datetime:
    """When a scheduled journey's broadcast is due (UTC)."""
    trigger = definition.trigger
    if trigger.broadcast is not None:
        at = trigger.broadcast.at
        if at.tzinfo is None:
            at = at.replace(tzinfo=zone)
        return at.astimezone(UTC)
    assert trigger.promotion is not None
    row = (
        await conn.execute(
            select(promotions.c.starts_at).where(
                promotions.c.shop_id == shop,
                promotions.c.promotion_id == trigger.promotion.id,
            )
        )
    ).first()
    if row is None:
        raise Problem(
            422,
            f"no promotion {trigger.promotion.id!r}",
            errors=[
                {"field": "trigger.promotion.id", "message": "create it with POST /v1/promotions"}
            ],
        )
    day = row.starts_at.astimezone(zone).date()
    local = datetime.combine(day, trigger.promotion.at, tzinfo=zone) + trigger.promotion.offset
    return local.astimezone(UTC)


async def schedule_broadcast(
    conn: AsyncConnection,
    shop: str,
    journey_id: str,
    version: int,
    definition: Definition,
    zone: ZoneInfo,
    now: datetime,
) -> datetime:
    """Schedule (or move) the journey's broadcast timer; refuses a time long past."""
    due = await broadcast_time(conn, shop, definition, zone)
    if due < now - LATE_LIMIT:
        raise Problem(
            409,
            f"the broadcast time {due.isoformat()} has passed; give a later one "
            "(a broadcast is never sent more than an hour late)",
        )
    key = broadcast_key(shop, journey_id)
    payload = {"j": journey_id, "v": version, "at": due.isoformat()}
    await schedule(conn, [Timer(key, BROADCAST_KIND, shop, due, payload)])
    return due


async def release_broadcast(
    conn: AsyncConnection, shop: str, journey_id: str, now: datetime
) -> None:
    """Resume: a broadcast timer held while paused is due at once, its page kept."""
    key = broadcast_key(shop, journey_id)
    row = (await conn.execute(select(timers.c.payload).where(timers.c.key == key))).first()
    if row is not None:
        payload = orjson.loads(row.payload)
        await schedule(conn, [Timer(key, BROADCAST_KIND, shop, now, payload)])


async def fire_broadcasts(
    conn: AsyncConnection,
    fired: Sequence[Timer],
    *,
    namespace: str = "",
    now: datetime | None = None,
) -> None:
    run = Run(conn, now or datetime.now(UTC), namespace=namespace)
    shop_ids = {t.shop_id for t in fired}
    await run.load_shops(shop_ids)
    run.journeys = await load_journeys(conn, shop_ids)
    for timer in fired:
        journey = run.journeys.get((timer.shop_id, str(timer.payload["j"])))
        if journey is None or journey.status == "archived":
            continue
        if journey.version != int(timer.payload["v"]):
            continue  # an edit rescheduled the broadcast for its new version
        if journey.status == "paused":
            held = Timer(
                timer.key, timer.kind, timer.shop_id, run.now + timedelta(days=1), timer.payload
            )
            run.schedule[timer.key] = held
            continue
        await _page(run, timer, journey.definition(journey.version))
    await run.flush()


async def _page(run: Run, timer: Timer, definition: Definition) -> None:
    shop = timer.shop_id
    journey = run.journeys[(shop, str(timer.payload["j"]))]
    after = str(timer.payload.get("after", ""))
    c = customers.c
    rows = [
        projection.customer_row(row)
        for row in (
            await run.conn.execute(
                select(customers)
                .where(c.shop_id == shop, c.merged_into.is_(None), c.customer_id > after)
                .order_by(c.customer_id)
                .limit(PAGE)
            )
        ).mappings()
    ]
    trigger = definition.trigger
    audience = trigger.broadcast.audience if trigger.broadcast else None
    if trigger.promotion is not None:
        audience = trigger.promotion.audience
    variables: dict[str, Any] = {}
    if trigger.promotion is not None:
        name = (
            await run.conn.execute(
                select(promotions.c.name).where(
                    promotions.c.shop_id == shop, promotions.c.promotion_id == trigger.promotion.id
                )
            )
        ).scalar()
        variables["promotion"] = {"name": name}
    await run.read_recent_sends((shop, row["customer_id"]) for row in rows)
    for row in rows:
        run.snap.customers[(shop, row["customer_id"])] = row
        facts = projection.state_facts(row, None, run.now)
        if audience is not None and not evaluate(audience, facts):
            continue
        entry = Entry(
            customer_id=row["customer_id"],
            order_id=None,
            at=datetime.fromisoformat(str(timer.payload["at"])),
            trigger=f"broadcast:v{journey.version}:{row['customer_id']}",
            facts={},
            variables={**variables, "customer": {"name": row["name"]}},
        )
        await enroll(run, journey, definition, entry)
    if len(rows) == PAGE:
        payload = {**timer.payload, "after": rows[-1]["customer_id"]}
        run.schedule[timer.key] = Timer(timer.key, timer.kind, shop, run.now, payload)

"""The consumer path of the journey engine: a consumed batch of domain events, in one
transaction. The projection first (whom and which order each event is about; carrier
updates naming a waybill no order named yet are parked), then, event by event in order:
merges move enrollments, goals end live enrollments at once (their timers deleted),
awaited events move enrollments on, payments convert, and triggers enroll.

Live enrollments the batch may touch are locked timer row first, enrollment row second
(`Run.lock_live`), the order every path uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.keysets import by_shop, planned_per_execution
from libs.common.events import Envelope
from services.campaigns import projection
from services.campaigns.conditions import evaluate
from services.campaigns.engine import (
    LIVE,
    Enrollment,
    Run,
    enroll,
    entry_of,
    from_row,
    load_journeys,
    select_rows,
)
from services.campaigns.models import enrollments, entries


def _matches(
    enrollment: Enrollment, match: str, order_id: str | None, customer: str | None
) -> bool:
    if match == "order":
        return order_id is not None and enrollment.order_id == order_id
    return customer is not None and enrollment.customer_id == customer


async def apply_events(
    conn: AsyncConnection,
    events: Sequence[Envelope],
    *,
    namespace: str = "",
    now: datetime | None = None,
) -> None:
    """Apply a consumed batch: projection, goals, waits for events, conversions, triggers."""
    run = Run(conn, now or datetime.now(UTC), namespace=namespace)
    shop_ids = {e.shop_id for e in events}
    # The reads join the batch's keys: planned for their parameters each time (a generic
    # plan made while the tables were small scanned them whole for every batch).
    async with planned_per_execution(conn):
        run.snap = await projection.load(conn, events)
        await run.load_shops(shop_ids)
        run.journeys = await load_journeys(conn, shop_ids)
        # The projection is applied for the whole batch first (to know whom every event is
        # about and lock what it may touch); each `Resolved` keeps the order's statuses as of
        # its event, which is what the goal-met check at enrollment looks at. Carrier updates
        # naming a waybill no order named yet wait (parked) until an order names it.
        ready: list[tuple[Envelope, projection.Resolved]] = []
        waiting = _apply_projection(run.snap, events, ready)
        linked = projection.linked_parcels(run.snap)
        if linked:
            revived = [*waiting, *await projection.unpark(conn, linked)]
            waiting = _apply_projection(run.snap, revived, ready)
        await projection.park(conn, waiting, run.now)
        await _load_affected(run, [e for e, _ in ready], [w for _, w in ready])
        await _read_entries(run, ready)
        await run.read_recent_sends(
            {(e.shop_id, who.customer_id) for e, who in ready if who.customer_id is not None}
            | {(en.shop_id, en.customer_id) for en in run.live.values()}
        )
    for event, who in ready:
        await _on_event(run, event, who)
    await projection.save(conn, run.snap)
    await run.flush()


def _apply_projection(
    snap: projection.Snapshot,
    events: Sequence[Envelope],
    ready: list[tuple[Envelope, projection.Resolved]],
) -> list[Envelope]:
    """Apply `events` to the projection: each with its `Resolved` onto `ready`; returns
    those that wait for an order to name their waybill."""
    waiting: list[Envelope] = []
    for event in events:
        who = projection.apply(snap, event)
        if projection.waits_for_order(event, who):
            waiting.append(event)
        else:
            ready.append((event, who))
    return waiting


async def _read_entries(run: Run, ready: Sequence[tuple[Envelope, projection.Resolved]]) -> None:
    """Read ahead the re-entry ledger rows the batch's triggers will look up (one query
    per journey instead of one per event)."""
    wanted: dict[tuple[str, str], set[str]] = {}
    for event, who in ready:
        if who.customer_id is None:
            continue
        for journey in run.journeys.values():
            if journey.shop_id != event.shop_id or journey.status != "active":
                continue
            definition = journey.definition(journey.version)
            per = definition.reentry.per
            if definition.trigger.event != event.type or per == "always":
                continue
            key = f"o:{who.order_id}" if per == "order" else f"c:{who.customer_id}"
            wanted.setdefault((journey.shop_id, journey.journey_id), set()).add(key)
    c = entries.c
    for (shop, journey_id), keys in wanted.items():
        ordered = sorted(keys)
        for start in range(0, len(ordered), 1000):
            chunk = ordered[start : start + 1000]
            run.known_entries.update(dict.fromkeys(((shop, journey_id, k) for k in chunk), None))
            rows = await run.conn.execute(
                select(c.entry_key, c.last_entered_at).where(
                    c.shop_id == shop, c.journey_id == journey_id, c.entry_key.in_(chunk)
                )
            )
            for key, at in rows:
                run.known_entries[(shop, journey_id, key)] = at


async def _load_affected(
    run: Run, events: Sequence[Envelope], resolved: Sequence[projection.Resolved]
) -> None:
    """Lock the live enrollments the batch's events may end or move, and load the ones
    their payments may convert."""
    interesting: dict[str, set[str]] = {}
    for journey in run.journeys.values():
        for definition, _ in journey.versions.values():
            types = {g.event for g in definition.goals}
            types |= {s.wait_for.event for s in definition.steps if s.wait_for is not None}
            interesting.setdefault(journey.shop_id, set()).update(types)
    e = enrollments.c
    clauses = []
    converts = []
    for event, who in zip(events, resolved, strict=True):
        if event.type in interesting.get(event.shop_id, ()):
            if who.order_id is not None:
                clauses.append(and_(e.shop_id == event.shop_id, e.order_id == who.order_id))
            if who.customer_id is not None:
                clauses.append(and_(e.shop_id == event.shop_id, e.customer_id == who.customer_id))
        if event.type == "order.paid" and who.customer_id is not None:
            converts.append((event.shop_id, who.customer_id))
        if event.type == "customer.merged":
            merged = [str(m) for m in event.data.get("merged_ids") or ()]
            clauses.append(and_(e.shop_id == event.shop_id, e.customer_id.in_(merged)))
    for start in range(0, len(clauses), 200):
        await run.lock_live(or_(*clauses[start : start + 200]))
    if converts:
        horizon = run.now - timedelta(days=400)
        for where in by_shop(enrollments, "customer_id", converts):
            query = select_rows().where(where, e.converted_at.is_(None), e.entered_at >= horizon)
            for row in await run.conn.execute(query):
                run.add(from_row(row))


async def _on_event(run: Run, event: Envelope, who: projection.Resolved) -> None:
    shop = event.shop_id
    if event.type == "customer.merged":
        _follow_merge(run, event, who)
    live = run.about(shop, who.customer_id, who.order_id)
    facts: dict[str, Any] | None = None

    def event_facts() -> dict[str, Any]:
        nonlocal facts
        if facts is None:
            customer = run.snap.customer(shop, who.customer_id)
            order = run.snap.order(shop, who.order_id)
            facts = {
                **projection.event_facts(event, run.now),
                **projection.state_facts(customer, order, run.now),
            }
        return facts

    for enrollment in live:
        if enrollment.status not in LIVE:
            if event.type == "order.paid":
                _convert(run, enrollment, event, who)
            continue
        journey = run.journeys.get((shop, enrollment.journey_id))
        if journey is None:
            continue
        definition = journey.definition(enrollment.version)
        goal = next(
            (
                g
                for g in definition.goals
                if g.event == event.type
                and _matches(enrollment, g.match, who.order_id, who.customer_id)
                and (g.if_ is None or evaluate(g.if_, event_facts()))
            ),
            None,
        )
        if goal is not None:
            run.finish(enrollment, "exited", f"goal:{event.type}")
        elif enrollment.status == "waiting" and enrollment.step_id is not None:
            step = definition.steps[definition.step_index(enrollment.step_id)]
            wait_for = step.wait_for
            if (
                wait_for is not None
                and wait_for.event == event.type
                and _matches(enrollment, wait_for.match, who.order_id, who.customer_id)
                and (wait_for.if_ is None or evaluate(wait_for.if_, event_facts()))
                and journey.status == "active"
            ):
                run.cancel.add(enrollment.timer)
                run.schedule.pop(enrollment.timer, None)
                target = wait_for.then
                index = (
                    definition.step_index(target) if target else definition.step_index(step.id) + 1
                )
                enrollment.context.setdefault("facts", {}).update(
                    projection.event_facts(event, run.now)
                )
                await run.walk(enrollment, index, max(event.time, enrollment.entered_at))
        if event.type == "order.paid":
            _convert(run, enrollment, event, who)
    await _trigger(run, event, who, event_facts)


def _convert(run: Run, enrollment: Enrollment, event: Envelope, who: projection.Resolved) -> None:
    """An order paid within the journey's attribution window after the enrollment began
    converts it (once): counted for lift in both groups, and as a conversion with revenue
    when a message had been requested."""
    if enrollment.converted_at is not None or who.customer_id != enrollment.customer_id:
        return
    journey = run.journeys.get((enrollment.shop_id, enrollment.journey_id))
    if journey is None or enrollment.version not in journey.versions:
        return
    window = journey.definition(enrollment.version).attribution_window
    paid_at = event.time
    if not enrollment.entered_at <= paid_at <= enrollment.entered_at + window:
        return
    order = run.snap.order(enrollment.shop_id, who.order_id) or {}
    revenue = int(order.get("total_minor") or 0)
    enrollment.converted_at = paid_at
    enrollment.revenue_minor = revenue
    run.touch(enrollment)
    run.count(enrollment, "converted:held_out" if enrollment.held_out else "converted:treated")
    if enrollment.messaged:
        run.count(enrollment, "conversions")
        run.count(enrollment, "revenue", revenue)


def _follow_merge(run: Run, event: Envelope, who: projection.Resolved) -> None:
    """Enrollments of merged-away profiles continue as the surviving customer's."""
    merged = {str(m) for m in event.data.get("merged_ids") or ()}
    for enrollment in run.live.values():
        if enrollment.shop_id == event.shop_id and enrollment.customer_id in merged:
            enrollment.customer_id = who.customer_id or enrollment.customer_id
            enrollment.customer_moved = True
            run.touch(enrollment)


async def _trigger(
    run: Run,
    event: Envelope,
    who: projection.Resolved,
    facts: Callable[[], dict[str, Any]],
) -> None:
    shop = event.shop_id
    for journey in run.journeys.values():
        if journey.shop_id != shop or journey.status != "active":
            continue
        definition, active_since = journey.versions[journey.version]
        trigger = definition.trigger
        if trigger.event != event.type or who.customer_id is None:
            continue
        if active_since is None or event.time < active_since.replace(microsecond=0):
            # History is not a trigger: only what happened after activation, to the second
            # (platforms and carriers report whole seconds).
            continue
        if definition.key == "order" and who.order_id is None:
            continue
        if trigger.if_ is not None and not evaluate(trigger.if_, facts()):
            continue
        await enroll(run, journey, definition, entry_of(run, event, who, facts()))

"""Lifecycle's event handlers: the orders projection, RFM, stages and member levels.

Each consumed batch is applied in one transaction with bulk statements: customers and
orders are upserted with merge rules that make the result independent of arrival order
(per-status times keep the earliest seen, descriptive fields the newest event's, refunds
add up), then every touched customer's RFM is recomputed from its orders, so the
incremental figures always equal a full recomputation. Stage and level changes are
written to the outbox with their previous and new values, and each customer keeps one
timer for the moment time alone will move it to its next stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, bindparam, case, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus import Message
from libs.common.db.dialect import upsert
from libs.common.events import (
    BEHAVIOR_TYPES,
    ORDER_TYPES,
    BehaviorData,
    Customer,
    Envelope,
    LevelChangedData,
    OrderData,
    StageChangedData,
    new_event,
    topic_for,
)
from libs.common.outbox import enqueue
from libs.common.timers import Timer, cancel, schedule
from services.lifecycle.models import customers, orders
from services.lifecycle.stages import DEFAULT_POLICY, Facts, member_level, next_change_at, stage_of

SOURCE = "huitou/lifecycle"
RESTAGE_TIMER = "lifecycle.restage"
STATUS_TIMES = (
    "created_at",
    "paid_at",
    "shipped_at",
    "completed_at",
    "cancelled_at",
    "refunded_at",
)

CustomerKey = tuple[str, str]


def customer_id_of(event: Envelope, customer: Customer) -> str:
    """The platform's customer id, else the normalised phone, else the email."""
    return str(event.subject or customer.id or customer.phone or customer.email)


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


@dataclass
class _CustomerRow:
    shop_id: str
    customer_id: str
    seen_at: datetime
    name: str | None = None
    phone: str | None = None
    email: str | None = None
    interest_at: datetime | None = None

    def merge(self, customer: Customer, at: datetime) -> None:
        if at >= self.seen_at or self.name is None:
            self.name = customer.name or self.name
            self.phone = customer.phone or self.phone
            self.email = customer.email or self.email
        self.seen_at = min(self.seen_at, at)


def _order_row(event: Envelope, data: OrderData, customer_id: str) -> dict[str, Any]:
    status = event.type.split(".", 1)[1]
    times = {name: getattr(data, name) for name in STATUS_TIMES}
    # The event of a status is itself evidence of when the order reached it.
    times[f"{status}_at"] = times[f"{status}_at"] or event.time
    refunded = 0
    if status == "refunded":
        whole = data.total.amount_minor if data.total else 0
        refunded = data.refund.amount_minor if data.refund else whole
    return {
        "shop_id": event.shop_id,
        "order_id": data.order_id,
        "customer_id": customer_id,
        "status": status,
        "total_minor": data.total.amount_minor if data.total else None,
        "currency": data.total.currency if data.total else None,
        "refunded_minor": refunded,
        "item_count": sum(item.quantity for item in data.items),
        "shipping_province": data.shipping.province if data.shipping else None,
        "shipping_city": data.shipping.city if data.shipping else None,
        **times,
        "data_time": event.time,
    }


def _merge_order_rows(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    newer, older = (b, a) if b["data_time"] >= a["data_time"] else (a, b)
    merged = dict(newer)
    for name in ("total_minor", "currency"):
        if merged[name] is None:
            merged[name] = older[name]
    for name in STATUS_TIMES:
        merged[name] = _earliest(a[name], b[name])
    merged["refunded_minor"] = a["refunded_minor"] + b["refunded_minor"]
    merged["data_time"] = max(a["data_time"], b["data_time"])
    return merged


def order_status(row: Any) -> str:
    """The order's status from the times it reached each status (arrival order free)."""
    if row.refunded_at is not None and row.refunded_minor >= (row.total_minor or 0):
        return "refunded"
    if row.cancelled_at is not None and row.paid_at is None:
        return "cancelled"
    if row.completed_at is not None:
        return "completed"
    if row.shipped_at is not None:
        return "shipped"
    if row.paid_at is not None:
        return "paid"
    if row.cancelled_at is not None:
        return "cancelled"
    return "created"


def is_purchase(row: Any) -> bool:
    """An order counts as a purchase once paid, unless it was cancelled before payment."""
    return row.paid_at is not None


async def apply_events(
    conn: AsyncConnection,
    events: Sequence[Envelope],
    *,
    namespace: str,
    now: datetime | None = None,
) -> None:
    """Apply a batch of new (deduplicated) events in the caller's transaction."""
    now = now or datetime.now(UTC)
    people: dict[CustomerKey, _CustomerRow] = {}
    order_rows: dict[tuple[str, str], dict[str, Any]] = {}
    for event in events:
        if event.type in ORDER_TYPES:
            data = event.typed_data()
            assert isinstance(data, OrderData)
            cid = customer_id_of(event, data.customer)
            person = _person(people, event, cid)
            person.merge(data.customer, event.time)
            if event.type == "order.created":
                # Placing an order shows interest even if it is never paid.
                at = data.created_at or event.time
                person.interest_at = max(person.interest_at or at, at)
            row = _order_row(event, data, cid)
            key = (event.shop_id, data.order_id)
            order_rows[key] = _merge_order_rows(order_rows[key], row) if key in order_rows else row
        elif event.type in BEHAVIOR_TYPES:
            behaviour = event.typed_data()
            assert isinstance(behaviour, BehaviorData)
            cid = customer_id_of(event, behaviour.customer)
            person = _person(people, event, cid)
            person.merge(behaviour.customer, event.time)
            at = behaviour.occurred_at or event.time
            person.interest_at = max(person.interest_at or at, at)
    if not people:
        return
    await _upsert_customers(conn, list(people.values()))
    if order_rows:
        await _upsert_orders(conn, list(order_rows.values()))
    await restage(conn, list(people), now=now, namespace=namespace)


def _person(people: dict[CustomerKey, _CustomerRow], event: Envelope, cid: str) -> _CustomerRow:
    key = (event.shop_id, cid)
    if key not in people:
        people[key] = _CustomerRow(event.shop_id, cid, event.time)
    return people[key]


async def _upsert_customers(conn: AsyncConnection, rows: list[_CustomerRow]) -> None:
    c = customers.c

    def merge(excluded: Any) -> dict[str, Any]:
        return {
            "name": case((excluded.name.is_(None), c.name), else_=excluded.name),
            "phone": case((excluded.phone.is_(None), c.phone), else_=excluded.phone),
            "email": case((excluded.email.is_(None), c.email), else_=excluded.email),
            "first_seen_at": case(
                (excluded.first_seen_at < c.first_seen_at, excluded.first_seen_at),
                else_=c.first_seen_at,
            ),
            "last_interest_at": case(
                (c.last_interest_at.is_(None), excluded.last_interest_at),
                (excluded.last_interest_at > c.last_interest_at, excluded.last_interest_at),
                else_=c.last_interest_at,
            ),
        }

    await conn.execute(
        upsert(conn, customers, ["shop_id", "customer_id"], [], merge=merge),
        [
            {
                "shop_id": r.shop_id,
                "customer_id": r.customer_id,
                "name": r.name,
                "phone": r.phone,
                "email": r.email,
                "first_seen_at": r.seen_at,
                "last_interest_at": r.interest_at,
                "stage": "prospect",
            }
            for r in rows
        ],
    )


async def _upsert_orders(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    o = orders.c

    def merge(excluded: Any) -> dict[str, Any]:
        newer = excluded.data_time >= o.data_time
        set_: dict[str, Any] = {
            name: case((newer, excluded[name]), else_=o[name])
            for name in ("customer_id", "item_count", "shipping_province", "shipping_city")
        }
        for name in ("total_minor", "currency"):
            # A message without the total (a refund notice) keeps the known one.
            set_[name] = case(
                (excluded[name].is_(None), o[name]),
                (o[name].is_(None), excluded[name]),
                (newer, excluded[name]),
                else_=o[name],
            )
        for name in STATUS_TIMES:
            set_[name] = case(
                (o[name].is_(None), excluded[name]),
                (excluded[name].is_(None), o[name]),
                (excluded[name] < o[name], excluded[name]),
                else_=o[name],
            )
        set_["refunded_minor"] = o.refunded_minor + excluded.refunded_minor
        set_["data_time"] = case((newer, excluded.data_time), else_=o.data_time)
        return set_

    await conn.execute(upsert(conn, orders, ["shop_id", "order_id"], [], merge=merge), rows)


async def restage(
    conn: AsyncConnection, keys: Sequence[CustomerKey], *, now: datetime, namespace: str
) -> None:
    """Recompute RFM, status, stage and level of these customers from their orders, write
    what changed, emit change events and keep one restage timer per customer."""
    if not keys:
        return
    condition = or_(
        *[and_(customers.c.shop_id == s, customers.c.customer_id == c) for s, c in keys]
    )
    current = {
        (r.shop_id, r.customer_id): r
        for r in (await conn.execute(select(customers).where(condition))).all()
    }
    order_condition = or_(
        *[and_(orders.c.shop_id == s, orders.c.customer_id == c) for s, c in keys]
    )
    by_customer: dict[CustomerKey, list[Any]] = {}
    status_updates = []
    for row in (await conn.execute(select(orders).where(order_condition))).all():
        by_customer.setdefault((row.shop_id, row.customer_id), []).append(row)
        status = order_status(row)
        if status != row.status:
            status_updates.append({"s": row.shop_id, "o": row.order_id, "status": status})
    if status_updates:
        await conn.execute(
            update(orders)
            .where(orders.c.shop_id == bindparam("s"), orders.c.order_id == bindparam("o"))
            .values(status=bindparam("status")),
            status_updates,
        )

    customer_updates: list[dict[str, Any]] = []
    outgoing: list[Message] = []
    timers: list[Timer] = []
    no_timer: list[str] = []
    for key, before in current.items():
        purchases = [r for r in by_customer.get(key, []) if is_purchase(r)]
        placed = [r.created_at or r.paid_at for r in purchases]
        frequency = len(purchases)
        monetary = sum(max(0, (r.total_minor or 0) - r.refunded_minor) for r in purchases)
        first = min(placed) if placed else None
        last = max(placed) if placed else None
        currency = next((r.currency for r in purchases if r.currency), before.currency)
        facts = Facts(frequency, last, before.last_interest_at)
        stage = stage_of(facts, now)
        level = member_level(monetary)
        customer_updates.append(
            {
                "s": key[0],
                "c": key[1],
                "frequency": frequency,
                "monetary_minor": monetary,
                "first_order_at": first,
                "last_order_at": last,
                "currency": currency,
                "stage": stage,
                "is_returning": frequency > 1,
                "member_level": level,
                "stage_changed_at": now if stage != before.stage else before.stage_changed_at,
            }
        )
        if stage != before.stage:
            outgoing.append(
                _change_event(
                    "customer.stage_changed",
                    key,
                    now,
                    namespace,
                    StageChangedData(
                        customer_id=key[1],
                        previous=before.stage,
                        current=stage,
                        returning=frequency > 1,
                    ),
                )
            )
        if level != before.member_level:
            outgoing.append(
                _change_event(
                    "customer.level_changed",
                    key,
                    now,
                    namespace,
                    LevelChangedData(
                        customer_id=key[1], previous=before.member_level, current=level
                    ),
                )
            )
        timer_key = f"restage:{key[0]}:{key[1]}"
        due = next_change_at(facts, now, DEFAULT_POLICY)
        if due is None:
            no_timer.append(timer_key)
        else:
            timers.append(Timer(timer_key, RESTAGE_TIMER, key[0], due, {"customer_id": key[1]}))
    if customer_updates:
        c = customers.c
        await conn.execute(
            update(customers)
            .where(c.shop_id == bindparam("s"), c.customer_id == bindparam("c"))
            .values({name: bindparam(name) for name in customer_updates[0] if name not in "sc"}),
            customer_updates,
        )
    await schedule(conn, timers)
    await cancel(conn, no_timer)
    await enqueue(conn, outgoing)


def _change_event(
    type_: str,
    key: CustomerKey,
    now: datetime,
    namespace: str,
    data: StageChangedData | LevelChangedData,
) -> Message:
    current = getattr(data, "current", None)
    event = new_event(
        type=type_,
        shop_id=key[0],
        source=SOURCE,
        data=data,
        subject=key[1],
        id=f"{type_}:{key[0]}:{key[1]}:{current}:{now.isoformat()}",
        time=now,
    )
    return Message(
        topic_for(type_, namespace),
        event.key,
        event.to_bytes(),
        {"ce_id": event.id, "ce_type": event.type},
    )


async def on_restage_timers(
    conn: AsyncConnection, fired: list[Timer], *, namespace: str, now: datetime | None = None
) -> None:
    """Time alone moved these customers' stage boundary: recompute them."""
    await restage(
        conn,
        [(t.shop_id, str(t.payload["customer_id"])) for t in fired],
        now=now or datetime.now(UTC),
        namespace=namespace,
    )

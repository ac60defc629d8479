"""Reads behind the lifecycle API: customers, their timeline, segments and the overview."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from libs.common.events import Money
from libs.common.problems import Problem
from services.lifecycle.handlers import derive
from services.lifecycle.models import (
    customer_notes,
    customer_tags,
    customers,
    order_tracking,
    orders,
    stage_history,
)
from services.lifecycle.schemas import CustomerOut, Figures, OrderOut, Rfm, TimelineEntry
from services.lifecycle.stages import STAGES, StagePolicy

c = customers.c

SORTS: dict[str, tuple[Any, bool]] = {
    "customer_id": (c.customer_id, False),
    "monetary": (c.monetary_minor, False),
    "-monetary": (c.monetary_minor, True),
    "frequency": (c.frequency, False),
    "-frequency": (c.frequency, True),
    "aov": (c.aov_minor, False),
    "-aov": (c.aov_minor, True),
}


def _money(amount: int | None, currency: str | None) -> Money | None:
    if amount is None or currency is None:
        return None
    return Money(amount_minor=amount, currency=currency)


def customer_out(
    row: Any,
    now: datetime,
    tag_names: Sequence[str] = (),
    order_rows: Sequence[Any] = (),
    tracking: dict[str, list[dict[str, Any]]] | None = None,
) -> CustomerOut:
    recency = (now - row.last_order_at).days if row.last_order_at else None
    return CustomerOut(
        shop_id=row.shop_id,
        customer_id=row.customer_id,
        name=row.name,
        phone=row.phone,
        email=row.email,
        stage=row.stage,
        returning=row.is_returning,
        member_level=row.member_level,
        tags=sorted(tag_names),
        rfm=Rfm(
            first_order_at=row.first_order_at,
            last_order_at=row.last_order_at,
            recency_days=recency,
            frequency=row.frequency,
            monetary=_money(row.monetary_minor, row.currency),
            average_order_value=_money(row.aov_minor, row.currency) if row.frequency else None,
            item_count=row.item_count,
        ),
        province=row.province,
        city=row.city,
        source=row.source,
        orders=[order_out(o, (tracking or {}).get(o.order_id, [])) for o in order_rows],
    )


def order_out(row: Any, tracking: list[dict[str, Any]]) -> OrderOut:
    return OrderOut(
        order_id=row.order_id,
        status=row.status,
        total=_money(row.total_minor, row.currency),
        refunded=_money(row.refunded_minor, row.currency) if row.refunded_minor else None,
        item_count=row.item_count,
        shipping_province=row.shipping_province,
        shipping_city=row.shipping_city,
        tracking=tracking,
        created_at=row.created_at,
        paid_at=row.paid_at,
        shipped_at=row.shipped_at,
        completed_at=row.completed_at,
        cancelled_at=row.cancelled_at,
        refunded_at=row.refunded_at,
    )


async def _tags_of(conn: AsyncConnection, shop_id: str, ids: Sequence[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {cid: [] for cid in ids}
    for r in await conn.execute(
        select(customer_tags.c.customer_id, customer_tags.c.tag).where(
            customer_tags.c.shop_id == shop_id, customer_tags.c.customer_id.in_(ids)
        )
    ):
        found[r.customer_id].append(r.tag)
    return found


async def get_customer(
    conn: AsyncConnection, shop_id: str, customer_id: str, now: datetime
) -> CustomerOut | None:
    row = await _customer_row(conn, shop_id, customer_id)
    if row is None:
        return None
    order_rows = (
        await conn.execute(
            select(orders)
            .where(orders.c.shop_id == shop_id, orders.c.customer_id == row.customer_id)
            .order_by(orders.c.created_at.desc(), orders.c.order_id.desc())
        )
    ).all()
    tracking: dict[str, list[dict[str, Any]]] = {}
    t = order_tracking.c
    for r in await conn.execute(
        select(t.order_id, t.tracking_number, t.carrier, t.status).where(
            t.shop_id == shop_id, t.order_id.in_([o.order_id for o in order_rows])
        )
    ):
        tracking.setdefault(r.order_id, []).append(
            {"tracking_number": r.tracking_number, "carrier": r.carrier, "status": r.status}
        )
    tag_names = (await _tags_of(conn, shop_id, [row.customer_id]))[row.customer_id]
    return customer_out(row, now, tag_names, order_rows, tracking)


async def _customer_row(conn: AsyncConnection, shop_id: str, customer_id: str) -> Any:
    """The customer, following a merge to the profile it was folded into."""
    for _ in range(10):
        row = (
            await conn.execute(
                select(customers).where(c.shop_id == shop_id, c.customer_id == customer_id)
            )
        ).first()
        if row is None or row.merged_into is None:
            return row
        customer_id = row.merged_into
    return None


@dataclass(frozen=True)
class ListFilter:
    stage: str | None = None
    tag: str | None = None
    level: str | None = None
    city: str | None = None
    q: str | None = None
    min_frequency: int | None = None
    max_frequency: int | None = None
    min_monetary: int | None = None
    max_monetary: int | None = None
    min_recency_days: int | None = None
    max_recency_days: int | None = None

    def where(self, shop_id: str, now: datetime) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = [c.shop_id == shop_id, c.merged_into.is_(None)]
        if self.stage:
            conditions.append(c.stage == self.stage)
        if self.level:
            conditions.append(c.member_level == self.level)
        if self.city:
            conditions.append(c.city == self.city)
        if self.tag:
            conditions.append(
                select(customer_tags.c.tag)
                .where(
                    customer_tags.c.shop_id == c.shop_id,
                    customer_tags.c.customer_id == c.customer_id,
                    customer_tags.c.tag == self.tag,
                )
                .exists()
            )
        if self.q:
            like = f"%{self.q}%"
            conditions.append(
                or_(
                    c.name.ilike(like),
                    c.phone.like(like),
                    c.email.ilike(like),
                    c.customer_id == self.q,
                )
            )
        for column, low, high in (
            (c.frequency, self.min_frequency, self.max_frequency),
            (c.monetary_minor, self.min_monetary, self.max_monetary),
        ):
            if low is not None:
                conditions.append(column >= low)
            if high is not None:
                conditions.append(column <= high)
        if self.min_recency_days is not None:
            conditions.append(c.last_order_at <= now - timedelta(days=self.min_recency_days))
        if self.max_recency_days is not None:
            conditions.append(c.last_order_at > now - timedelta(days=self.max_recency_days + 1))
        return conditions


def _cursor_encode(value: Any, customer_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([value, customer_id])).decode()


def _cursor_decode(cursor: str) -> tuple[Any, str]:
    try:
        value, customer_id = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        return value, str(customer_id)
    except Exception:
        raise Problem(
            422,
            "invalid cursor",
            errors=[{"field": "cursor", "message": "use next_cursor as returned"}],
        ) from None


async def page(
    conn: AsyncConnection,
    query: Select[Any],
    shop_id: str,
    *,
    sort: str,
    cursor: str | None,
    limit: int,
    now: datetime,
) -> tuple[list[CustomerOut], str | None]:
    """A keyset-paginated page of `query` (a select of customers) in `sort` order."""
    column, descending = SORTS[sort]
    if cursor:
        value, after = _cursor_decode(cursor)
        if column is c.customer_id:
            query = query.where(c.customer_id > after)
        elif descending:
            query = query.where(or_(column < value, and_(column == value, c.customer_id > after)))
        else:
            query = query.where(or_(column > value, and_(column == value, c.customer_id > after)))
    order = column.desc() if descending else column.asc()
    ordering = [c.customer_id] if column is c.customer_id else [order, c.customer_id]
    rows = (await conn.execute(query.order_by(*ordering).limit(limit + 1))).all()
    shown = rows[:limit]
    tag_map = await _tags_of(conn, shop_id, [r.customer_id for r in shown])
    items = [customer_out(r, now, tag_map[r.customer_id]) for r in shown]
    next_cursor = None
    if len(rows) > limit:
        last = shown[-1]
        key = getattr(last, column.key)
        next_cursor = _cursor_encode(key, last.customer_id)
    return items, next_cursor


async def stream_rows(
    conn: AsyncConnection, conditions: Sequence[ColumnElement[bool]], batch: int = 1000
) -> AsyncIterator[Any]:
    """Every matching customer by id, fetched `batch` rows at a time (keyset), so an export
    of any size holds one batch in memory."""
    after = ""
    while True:
        rows = (
            await conn.execute(
                select(customers)
                .where(*conditions, c.customer_id > after)
                .order_by(c.customer_id)
                .limit(batch)
            )
        ).all()
        for row in rows:
            yield row
        if len(rows) < batch:
            return
        after = rows[-1].customer_id


async def count(conn: AsyncConnection, conditions: Sequence[ColumnElement[bool]]) -> int:
    return int((await conn.execute(select(func.count()).where(*conditions))).scalar_one())


async def timeline(conn: AsyncConnection, shop_id: str, customer_id: str) -> list[TimelineEntry]:
    """Orders (each status reached), stage changes, tags and notes, newest first."""
    entries: list[TimelineEntry] = []
    for o in await conn.execute(
        select(orders).where(orders.c.shop_id == shop_id, orders.c.customer_id == customer_id)
    ):
        for status in ("created", "paid", "shipped", "completed", "cancelled", "refunded"):
            at = getattr(o, f"{status}_at")
            if at is not None:
                entries.append(
                    TimelineEntry(
                        at=at,
                        kind="order",
                        detail={
                            "order_id": o.order_id,
                            "status": status,
                            "total": _money(o.total_minor, o.currency),
                        },
                    )
                )
    h = stage_history.c
    for change in await conn.execute(
        select(h.at, h.previous, h.current).where(
            h.shop_id == shop_id, h.customer_id == customer_id
        )
    ):
        entries.append(
            TimelineEntry(
                at=change.at,
                kind="stage",
                detail={"previous": change.previous, "current": change.current},
            )
        )
    for held in await conn.execute(
        select(customer_tags.c.tag, customer_tags.c.assigned_at).where(
            customer_tags.c.shop_id == shop_id, customer_tags.c.customer_id == customer_id
        )
    ):
        entries.append(TimelineEntry(at=held.assigned_at, kind="tag", detail={"tag": held.tag}))
    n = customer_notes.c
    for note in await conn.execute(
        select(n.id, n.at, n.text).where(n.shop_id == shop_id, n.customer_id == customer_id)
    ):
        entries.append(
            TimelineEntry(at=note.at, kind="note", detail={"id": note.id, "text": note.text})
        )
    return sorted(entries, key=lambda e: e.at, reverse=True)


async def repurchase_cycle(conn: AsyncConnection, shop_id: str) -> dict[str, float | int | None]:
    """The shop's repurchase cycle: percentiles of the days between a customer's
    consecutive purchases (nearest-rank), over every customer of the shop."""
    o = orders.c
    purchased = or_(
        o.paid_at.is_not(None),
        o.shipped_at.is_not(None),
        o.completed_at.is_not(None),
        o.refunded_at.is_not(None),
    )
    gaps: list[float] = []
    previous: tuple[str, datetime] | None = None
    result = await conn.stream(
        select(o.customer_id, o.created_at)
        .where(o.shop_id == shop_id, purchased, o.created_at.is_not(None))
        .order_by(o.customer_id, o.created_at)
    )
    async for customer_id, created_at in result:
        if previous is not None and previous[0] == customer_id:
            gaps.append((created_at - previous[1]).total_seconds() / 86400)
        previous = (customer_id, created_at)
    gaps.sort()

    def rank(q: float) -> float | None:
        if not gaps:
            return None
        return round(gaps[max(0, min(len(gaps) - 1, int(q * len(gaps) + 0.999999) - 1))], 2)

    return {
        "repeat_purchases": len(gaps),
        "p25": rank(0.25),
        "p50": rank(0.5),
        "p75": rank(0.75),
        "p90": rank(0.9),
    }


async def figures_now(conn: AsyncConnection, shop_id: str, now: datetime) -> Figures:
    """Headline figures from the live profiles."""
    rows = (
        await conn.execute(
            select(
                c.stage,
                c.frequency,
                c.monetary_minor,
                c.currency,
                c.member_level,
                c.first_order_at,
                c.last_order_at,
                c.last_interest_at,
            ).where(c.shop_id == shop_id, c.merged_into.is_(None))
        )
    ).all()
    return _figures(
        now,
        [
            _Person(
                r.stage,
                r.frequency,
                r.monetary_minor,
                r.currency,
                r.member_level,
                r.first_order_at,
                r.last_order_at,
                r.last_interest_at,
            )
            for r in rows
        ],
    )


async def figures_as_of(
    conn: AsyncConnection, shop_id: str, at: datetime, policy: StagePolicy
) -> Figures:
    """The same figures as they stood at `at`, recomputed from the orders placed by then
    (interest before `at` counts unpaid orders placed; carts are not kept per event)."""
    people: dict[str, list[Any]] = {}
    for o in await conn.execute(
        select(orders).where(orders.c.shop_id == shop_id, orders.c.created_at <= at)
    ):
        people.setdefault(o.customer_id, []).append(_as_of(o, at))
    merged = set(
        (
            await conn.execute(
                select(c.customer_id).where(c.shop_id == shop_id, c.merged_into.is_not(None))
            )
        ).scalars()
    )
    persons = []
    for cid, rows in people.items():
        if cid in merged:
            continue
        interest = max((r.created_at for r in rows if r.created_at), default=None)
        before = _Before(last_interest_at=interest, currency=None, province=None, city=None)
        d = derive(before, rows, policy, at)
        persons.append(
            _Person(
                d.stage,
                d.frequency,
                d.monetary,
                d.currency,
                d.level,
                d.first_order_at,
                d.last_order_at,
                interest,
            )
        )
    return _figures(at, persons)


@dataclass(frozen=True)
class _Before:
    last_interest_at: datetime | None
    currency: str | None
    province: str | None
    city: str | None


@dataclass(frozen=True)
class _OrderAsOf:
    order_id: str
    total_minor: int | None
    currency: str | None
    refunded_minor: int
    item_count: int
    shipping_province: str | None
    shipping_city: str | None
    created_at: datetime | None
    paid_at: datetime | None
    shipped_at: datetime | None
    completed_at: datetime | None
    refunded_at: datetime | None
    data_time: datetime


def _as_of(o: Any, at: datetime) -> _OrderAsOf:
    def known(value: datetime | None) -> datetime | None:
        return value if value is not None and value <= at else None

    refunded = o.refunded_minor if known(o.refunded_at) else 0
    return _OrderAsOf(
        o.order_id,
        o.total_minor,
        o.currency,
        refunded,
        o.item_count,
        o.shipping_province,
        o.shipping_city,
        o.created_at,
        known(o.paid_at),
        known(o.shipped_at),
        known(o.completed_at),
        known(o.refunded_at),
        o.data_time,
    )


@dataclass(frozen=True)
class _Person:
    stage: str
    frequency: int
    monetary: int
    currency: str | None
    level: str | None
    first_order_at: datetime | None
    last_order_at: datetime | None
    last_interest_at: datetime | None


def _figures(now: datetime, people: list[_Person]) -> Figures:
    stages = dict.fromkeys(STAGES, 0)
    for p in people:
        stages[p.stage] += 1
    buyers = [p for p in people if p.frequency > 0]
    returning = [p for p in buyers if p.frequency > 1]
    first_time = [p for p in buyers if p.frequency == 1]
    currency = next((p.currency for p in buyers if p.currency), None)

    def aov(group: list[_Person]) -> Money | None:
        orders_count = sum(p.frequency for p in group)
        if not orders_count or currency is None:
            return None
        return Money(amount_minor=sum(p.monetary for p in group) // orders_count, currency=currency)

    def rate(stage: str) -> float | None:
        in_stage = [p for p in people if p.stage == stage]
        if not in_stage:
            return None
        return round(sum(1 for p in in_stage if p.frequency > 1) / len(in_stage), 4)

    return Figures(
        as_of=now,
        interested_30d=sum(
            1
            for p in people
            if p.frequency == 0
            and p.last_interest_at is not None
            and p.last_interest_at > now - timedelta(days=30)
        ),
        buyers_365d=sum(
            1 for p in buyers if p.last_order_at and p.last_order_at > now - timedelta(days=365)
        ),
        members=sum(1 for p in people if p.level is not None),
        new_customers_7d=sum(
            1 for p in buyers if p.first_order_at and p.first_order_at > now - timedelta(days=7)
        ),
        stages=stages,
        returning_share=round(len(returning) / len(buyers), 4) if buyers else None,
        repurchase_rate_by_stage={stage: rate(stage) for stage in STAGES},
        aov_new=aov(first_time),
        aov_returning=aov(returning),
    )

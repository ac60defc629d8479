"""Reads behind the lifecycle API: customers, their timeline, segments and the overview."""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson
from sqlalchemy import (
    BigInteger,
    Float,
    Select,
    String,
    Subquery,
    and_,
    case,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from libs.common.db.dialect import microseconds_between
from libs.common.db.types import UtcDateTime
from libs.common.events import Money
from libs.common.problems import Problem
from services.lifecycle.models import (
    customer_notes,
    customer_tags,
    customers,
    order_tracking,
    orders,
    stage_history,
)
from services.lifecycle.rules import recency_between
from services.lifecycle.schemas import (
    CustomerOut,
    Figures,
    OrderOut,
    Prediction,
    Rfm,
    TimelineEntry,
)
from services.lifecycle.stages import STAGES, StagePolicy

c = customers.c


@dataclass(frozen=True)
class Sort:
    """An order of the customer list: by `column` (then by id), and what a cursor carries.

    `kind` `id`: the id alone; `int`: a NOT NULL integer column, the cursor's value a 64-bit
    integer; `float`: a nullable double column (a prediction), the cursor's value a finite
    number or null. Customers with a null value come last in both directions (by id), so
    a list sorted by a prediction shows the customers without one after all the others."""

    column: Any
    descending: bool
    kind: Literal["id", "int", "float"]


SORTS: dict[str, Sort] = {
    "customer_id": Sort(c.customer_id, False, "id"),
    "monetary": Sort(c.monetary_minor, False, "int"),
    "-monetary": Sort(c.monetary_minor, True, "int"),
    "frequency": Sort(c.frequency, False, "int"),
    "-frequency": Sort(c.frequency, True, "int"),
    "aov": Sort(c.aov_minor, False, "int"),
    "-aov": Sort(c.aov_minor, True, "int"),
    "p_alive": Sort(c.p_alive, False, "float"),
    "-p_alive": Sort(c.p_alive, True, "float"),
    "expected_purchases_90d": Sort(c.expected_purchases_90d, False, "float"),
    "-expected_purchases_90d": Sort(c.expected_purchases_90d, True, "float"),
}


def _money(amount: int | None, currency: str | None) -> Money | None:
    if amount is None or currency is None:
        return None
    return Money(amount_minor=amount, currency=currency)


def prediction_out(row: Any) -> Prediction | None:
    """The customer's figures under the shop's repurchase model, exactly as stored (so
    they agree with the list filters and rules that compare them); None without a model."""
    if row.p_alive is None or row.expected_purchases_90d is None:
        return None
    return Prediction(
        p_alive=row.p_alive,
        expected_purchases_90d=row.expected_purchases_90d,
        next_purchase_at=row.next_purchase_at,
    )


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
        prediction=prediction_out(row),
        orders=[order_out(o, (tracking or {}).get(o.order_id, [])) for o in order_rows],
    )


def order_out(row: Any, tracking: list[dict[str, Any]]) -> OrderOut:
    return OrderOut(
        order_id=row.order_id,
        status=row.status,
        total=_money(row.total_minor, row.currency),
        refunded=_money(row.refunded_minor, row.currency) if row.refunded_minor else None,
        item_count=row.item_count or 0,  # None: no event listed its items
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
    min_p_alive: float | None = None
    max_p_alive: float | None = None
    min_expected_purchases_90d: float | None = None
    max_expected_purchases_90d: float | None = None

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
            # `%` and `_` in q are plain characters (autoescape), not LIKE wildcards.
            conditions.append(
                or_(
                    c.name.icontains(self.q, autoescape=True),
                    c.phone.contains(self.q, autoescape=True),
                    c.email.icontains(self.q, autoescape=True),
                    c.customer_id == self.q,
                )
            )
        for column, low, high in (
            (c.frequency, self.min_frequency, self.max_frequency),
            (c.monetary_minor, self.min_monetary, self.max_monetary),
        ):
            # Bound as BIGINT: a bound past the int32 `frequency` column is no error.
            if low is not None:
                conditions.append(column >= literal(low, BigInteger()))
            if high is not None:
                conditions.append(column <= literal(high, BigInteger()))
        if self.min_recency_days is not None or self.max_recency_days is not None:
            conditions.append(recency_between(self.min_recency_days, self.max_recency_days, now))
        for column, low_f, high_f in (
            (c.p_alive, self.min_p_alive, self.max_p_alive),
            (
                c.expected_purchases_90d,
                self.min_expected_purchases_90d,
                self.max_expected_purchases_90d,
            ),
        ):
            # Compared as doubles, exactly as stored; a customer without a prediction (null)
            # matches no bound.
            if low_f is not None:
                conditions.append(column >= literal(float(low_f), Float()))
            if high_f is not None:
                conditions.append(column <= literal(float(high_f), Float()))
        return conditions


def _cursor_encode(value: Any, customer_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([value, customer_id])).decode()


def _cursor_decode(cursor: str, kind: Literal["id", "int", "float"]) -> tuple[Any, str]:
    """The sort value and customer id a cursor carries; 422 unless they are what
    `_cursor_encode` writes for this sort (a 64-bit integer for the integer sorts; a finite
    number, as a float, or null for the prediction sorts; an id the database can bind), so
    a forged cursor cannot reach the database as a bad value."""
    try:
        value, customer_id = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(customer_id, str) or "\x00" in customer_id:
            raise ValueError("customer id")
        if kind == "int" and (type(value) is not int or not -(2**63) <= value < 2**63):
            raise ValueError("sort value")
        if kind == "float" and value is not None:
            if type(value) not in (int, float):  # not a bool, string, list…
                raise ValueError("sort value")
            value = float(value)  # OverflowError past the doubles
            if not math.isfinite(value):
                raise ValueError("sort value")
        return value, customer_id
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
    """A keyset-paginated page of `query` (a select of customers) in `sort` order (then
    by id; for the prediction sorts, customers without one last, by id)."""
    by = SORTS[sort]
    column, descending = by.column, by.descending
    if cursor:
        value, after = _cursor_decode(cursor, by.kind)
        if by.kind == "id":
            query = query.where(c.customer_id > after)
        elif by.kind == "int":
            key = literal(value, BigInteger())  # any 64-bit value, even past int32 `frequency`
            beyond = column < key if descending else column > key
            query = query.where(or_(beyond, and_(column == key, c.customer_id > after)))
        elif value is None:  # past a customer without a value: the rest of those, by id
            query = query.where(column.is_(None), c.customer_id > after)
        else:  # past a value: the values beyond it, then every customer without one
            key = literal(value, Float())
            beyond = column < key if descending else column > key
            query = query.where(
                or_(beyond, and_(column == key, c.customer_id > after), column.is_(None))
            )
    order = column.desc() if descending else column.asc()
    if by.kind == "float":
        order = order.nulls_last()
    ordering = [c.customer_id] if by.kind == "id" else [order, c.customer_id]
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


PERCENTILES = {"p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9}


def _purchased(at: datetime | None = None) -> ColumnElement[bool]:
    """The order reached `paid` or a later status (by `at`, when given): a purchase."""
    o = orders.c
    times = (o.paid_at, o.shipped_at, o.completed_at, o.refunded_at)
    if at is None:
        return or_(*(t.is_not(None) for t in times))
    return or_(*(t <= _utc(at) for t in times))


def _utc(at: datetime) -> ColumnElement[datetime]:
    return literal(at, UtcDateTime())


async def repurchase_cycle(conn: AsyncConnection, shop_id: str) -> dict[str, float | int | None]:
    """The shop's repurchase cycle: percentiles of the days between a customer's
    consecutive purchases (nearest-rank), over every customer of the shop.

    Computed in the database, so memory stays flat however many orders the shop has: a
    window (`lag`) pairs each purchase with the customer's previous one, one count says how
    many gaps there are, and one ranking (`row_number` by the gap's exact length in
    microseconds) returns just the four gaps at the nearest ranks; their lengths in days
    are taken in Python from the two times, as exactly as before."""
    o = orders.c
    previous = func.lag(o.created_at, type_=UtcDateTime()).over(
        partition_by=o.customer_id, order_by=o.created_at
    )
    steps = (
        select(o.created_at.label("at"), previous.label("previous"))
        .where(o.shop_id == shop_id, _purchased(), o.created_at.is_not(None))
        .subquery("steps")
    )
    gaps = (
        select(
            steps.c.at,
            steps.c.previous,
            microseconds_between(conn, steps.c.at, steps.c.previous).label("length"),
        )
        .where(steps.c.previous.is_not(None))
        .subquery("gaps")
    )
    n = int((await conn.execute(select(func.count()).select_from(gaps))).scalar_one())
    cycle: dict[str, float | int | None] = {"repeat_purchases": n}
    if not n:
        return cycle | dict.fromkeys(PERCENTILES)
    # The nearest rank (1-based) of each percentile, as the sorted list was indexed before.
    ranks = {
        name: max(0, min(n - 1, int(q * n + 0.999999) - 1)) + 1 for name, q in PERCENTILES.items()
    }
    ranked = select(
        gaps.c.at, gaps.c.previous, func.row_number().over(order_by=gaps.c.length).label("rank")
    ).subquery("ranked")
    days = {
        r.rank: (r.at - r.previous).total_seconds() / 86400
        for r in await conn.execute(
            select(ranked.c.rank, ranked.c.at, ranked.c.previous).where(
                ranked.c.rank.in_(set(ranks.values()))
            )
        )
    }
    return cycle | {name: round(days[rank], 2) for name, rank in ranks.items()}


async def figures_now(conn: AsyncConnection, shop_id: str, now: datetime) -> Figures:
    """Headline figures from the live profiles, aggregated in the database."""
    people = (
        select(
            c.stage,
            c.frequency,
            c.monetary_minor.label("monetary"),
            c.currency,
            c.member_level,
            c.first_order_at,
            c.last_order_at,
            c.last_interest_at,
        )
        .where(c.shop_id == shop_id, c.merged_into.is_(None))
        .subquery("people")
    )
    return await _figures(conn, people, now)


async def figures_as_of(
    conn: AsyncConnection, shop_id: str, at: datetime, policy: StagePolicy
) -> Figures:
    """The same figures as they stood at `at`, recomputed from the orders placed by then
    (interest before `at` counts unpaid orders placed; carts are not kept per event).

    In the database too: one row per customer with an order placed by `at` (purchases as
    known at `at`: statuses reached later and refunds made later do not count), its stage
    and level derived as `derivation.derive` would (`stages.stage_of`, `stages.member_level`
    written as CASE over the policy's thresholds), then the same aggregate as `figures_now`.
    Of several currencies among a customer's purchases the smallest code stands for them
    (a shop sells in one)."""
    o = orders.c
    known = _purchased(at)
    refunded = case((o.refunded_at <= _utc(at), o.refunded_minor), else_=0)
    net = func.coalesce(o.total_minor, 0) - refunded
    merged = (
        select(c.customer_id)
        .where(c.shop_id == o.shop_id, c.customer_id == o.customer_id, c.merged_into.is_not(None))
        .exists()
    )
    d = (
        select(
            o.customer_id,
            func.sum(case((known, 1), else_=0)).label("frequency"),
            func.sum(case((and_(known, net > 0), net), else_=0)).label("monetary"),
            func.min(case((known, o.currency))).label("currency"),
            func.min(case((known, o.created_at))).label("first_order_at"),
            func.max(case((known, o.created_at))).label("last_order_at"),
            func.max(o.created_at).label("last_interest_at"),
        )
        .where(o.shop_id == shop_id, o.created_at <= _utc(at), ~merged)
        .group_by(o.customer_id)
        .subquery("derived")
    ).c
    people = select(
        _stage_sql(d.frequency, d.last_order_at, d.last_interest_at, at, policy).label("stage"),
        d.frequency,
        d.monetary,
        d.currency,
        _level_sql(d.monetary, d.frequency, policy).label("member_level"),
        d.first_order_at,
        d.last_order_at,
        d.last_interest_at,
    ).subquery("people")
    return await _figures(conn, people, at)


def _stage_sql(
    frequency: ColumnElement[int],
    last_order_at: ColumnElement[datetime],
    last_interest_at: ColumnElement[datetime],
    now: datetime,
    policy: StagePolicy,
) -> ColumnElement[str]:
    """`stages.stage_of` as SQL (each boundary belongs to the later stage): `now - t < N
    days` is `t > now - N days`; a customer with a purchase has a last order."""

    def within(t: ColumnElement[datetime], days: int) -> ColumnElement[bool]:
        return t > _utc(now - timedelta(days=days))

    return case(
        (
            frequency == 0,
            case(
                (within(last_interest_at, policy.interested_days), "interested"),
                else_="prospect",
            ),
        ),
        (
            within(last_order_at, policy.after_sale_days),
            case((frequency == 1, "new"), else_="after_sale"),
        ),
        (within(last_order_at, policy.silent_after_days), "active"),
        (within(last_order_at, policy.sleeping_after_days), "silent"),
        (within(last_order_at, policy.churned_after_days), "sleeping"),
        else_="churned",
    )


def _level_sql(
    monetary: ColumnElement[int], frequency: ColumnElement[int], policy: StagePolicy
) -> ColumnElement[str]:
    """`stages.member_level` as SQL: the highest level whose threshold is reached (NULL:
    none is)."""
    value = monetary if policy.level_basis == "spend" else frequency
    none = literal(None, String())
    if not policy.levels:
        return none
    return case(
        *((value >= level.threshold, level.name) for level in reversed(policy.levels)),
        else_=none,
    )


async def _figures(conn: AsyncConnection, people: Subquery, now: datetime) -> Figures:
    """The figures of `people` (a row per customer: stage, frequency, monetary, currency,
    member_level and the first order, last order and last interest times) at `now`, from
    one aggregate per stage: a handful of rows, however many customers there are."""
    p = people.c
    buyer = p.frequency > 0
    first_time, returning = p.frequency == 1, p.frequency > 1

    def count_if(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.sum(case((condition, 1), else_=0))

    def sum_if(condition: ColumnElement[bool], value: ColumnElement[int]) -> ColumnElement[int]:
        return func.sum(case((condition, value), else_=0))

    def since(days: int) -> ColumnElement[datetime]:
        return _utc(now - timedelta(days=days))

    rows = (
        await conn.execute(
            select(
                p.stage,
                func.count().label("people"),
                count_if(buyer).label("buyers"),
                count_if(returning).label("repeat_buyers"),
                sum_if(first_time, p.frequency).label("first_orders"),
                sum_if(first_time, p.monetary).label("first_spend"),
                sum_if(returning, p.frequency).label("returning_orders"),
                sum_if(returning, p.monetary).label("returning_spend"),
                count_if(and_(p.frequency == 0, p.last_interest_at > since(30))).label(
                    "interested_30d"
                ),
                count_if(and_(buyer, p.last_order_at > since(365))).label("buyers_365d"),
                count_if(p.member_level.is_not(None)).label("members"),
                count_if(and_(buyer, p.first_order_at > since(7))).label("new_customers_7d"),
                func.min(case((buyer, p.currency))).label("currency"),
            ).group_by(p.stage)
        )
    ).all()
    stages = dict.fromkeys(STAGES, 0)
    stages.update({r.stage: int(r.people) for r in rows})

    def total(name: str) -> int:
        return sum(int(getattr(r, name)) for r in rows)

    currency = min((r.currency for r in rows if r.currency is not None), default=None)

    def aov(orders_count: int, spend: int) -> Money | None:
        if not orders_count or currency is None:
            return None
        return Money(amount_minor=spend // orders_count, currency=currency)

    by_stage = {r.stage: r for r in rows}

    def rate(stage: str) -> float | None:
        r = by_stage.get(stage)
        if r is None:
            return None
        return round(int(r.repeat_buyers) / int(r.people), 4)

    buyers = total("buyers")
    return Figures(
        as_of=now,
        interested_30d=total("interested_30d"),
        buyers_365d=total("buyers_365d"),
        members=total("members"),
        new_customers_7d=total("new_customers_7d"),
        stages=stages,
        returning_share=round(total("repeat_buyers") / buyers, 4) if buyers else None,
        repurchase_rate_by_stage={stage: rate(stage) for stage in STAGES},
        aov_new=aov(total("first_orders"), total("first_spend")),
        aov_returning=aov(total("returning_orders"), total("returning_spend")),
    )

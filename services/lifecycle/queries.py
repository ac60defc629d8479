"""Reads behind the lifecycle API: customers, their orders, and the overview."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.events import Money
from services.lifecycle.models import customers, orders
from services.lifecycle.schemas import CustomerOut, OrderOut, Overview, Rfm
from services.lifecycle.stages import STAGES


def _money(amount: int | None, currency: str | None) -> Money | None:
    if amount is None or currency is None:
        return None
    return Money(amount_minor=amount, currency=currency)


def customer_out(row: Any, now: datetime, order_rows: list[Any] | None = None) -> CustomerOut:
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
        tags=[],
        rfm=Rfm(
            first_order_at=row.first_order_at,
            last_order_at=row.last_order_at,
            recency_days=recency,
            frequency=row.frequency,
            monetary=_money(row.monetary_minor, row.currency),
        ),
        orders=[order_out(o) for o in order_rows or []],
    )


def order_out(row: Any) -> OrderOut:
    return OrderOut(
        order_id=row.order_id,
        status=row.status,
        total=_money(row.total_minor, row.currency),
        refunded=_money(row.refunded_minor, row.currency) if row.refunded_minor else None,
        item_count=row.item_count,
        shipping_province=row.shipping_province,
        shipping_city=row.shipping_city,
        created_at=row.created_at,
        paid_at=row.paid_at,
        shipped_at=row.shipped_at,
        completed_at=row.completed_at,
        cancelled_at=row.cancelled_at,
        refunded_at=row.refunded_at,
    )


async def get_customer(
    conn: AsyncConnection, shop_id: str, customer_id: str, now: datetime
) -> CustomerOut | None:
    row = (
        await conn.execute(
            select(customers).where(
                customers.c.shop_id == shop_id, customers.c.customer_id == customer_id
            )
        )
    ).first()
    if row is None:
        return None
    order_rows = (
        await conn.execute(
            select(orders)
            .where(orders.c.shop_id == shop_id, orders.c.customer_id == customer_id)
            .order_by(orders.c.created_at.desc(), orders.c.order_id.desc())
        )
    ).all()
    return customer_out(row, now, list(order_rows))


async def list_customers(
    conn: AsyncConnection,
    shop_id: str,
    *,
    stage: str | None,
    after: str | None,
    limit: int,
    now: datetime,
) -> tuple[list[CustomerOut], str | None]:
    """A page of customers ordered by id; the cursor is the last id of the page."""
    query = select(customers).where(customers.c.shop_id == shop_id)
    if stage:
        query = query.where(customers.c.stage == stage)
    if after:
        query = query.where(customers.c.customer_id > after)
    rows = (await conn.execute(query.order_by(customers.c.customer_id).limit(limit + 1))).all()
    items = [customer_out(r, now) for r in rows[:limit]]
    return items, (rows[limit - 1].customer_id if len(rows) > limit else None)


async def overview(conn: AsyncConnection, shop_id: str, now: datetime) -> Overview:
    c = customers.c
    in_shop = c.shop_id == shop_id
    counts = dict.fromkeys(STAGES, 0)
    for stage, n in (
        await conn.execute(select(c.stage, func.count()).where(in_shop).group_by(c.stage))
    ).all():
        counts[stage] = n

    async def count(*conditions: Any) -> int:
        return int(
            (await conn.execute(select(func.count()).where(in_shop, *conditions))).scalar_one()
        )

    return Overview(
        shop_id=shop_id,
        as_of=now,
        interested_30d=await count(
            c.frequency == 0, c.last_interest_at >= now - timedelta(days=30)
        ),
        buyers_365d=await count(c.last_order_at >= now - timedelta(days=365)),
        members=await count(c.member_level.is_not(None)),
        new_customers_7d=await count(c.first_order_at >= now - timedelta(days=7)),
        stages=counts,
    )

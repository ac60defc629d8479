"""Response bodies of the lifecycle API (field names fixed by DESIGN.md's contract)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from libs.common.events import Money


class OrderOut(BaseModel):
    order_id: str
    status: str
    total: Money | None
    refunded: Money | None = None
    item_count: int
    shipping_province: str | None = None
    shipping_city: str | None = None
    created_at: datetime | None
    paid_at: datetime | None = None
    shipped_at: datetime | None = None
    completed_at: datetime | None = None
    cancelled_at: datetime | None = None
    refunded_at: datetime | None = None


class Rfm(BaseModel):
    first_order_at: datetime | None
    last_order_at: datetime | None
    recency_days: int | None
    frequency: int
    monetary: Money | None


class CustomerOut(BaseModel):
    shop_id: str
    customer_id: str
    name: str | None
    phone: str | None
    email: str | None
    stage: str
    returning: bool
    member_level: str | None
    tags: list[str]
    rfm: Rfm
    orders: list[OrderOut] = []


class CustomerPage(BaseModel):
    items: list[CustomerOut]
    next_cursor: str | None


class Overview(BaseModel):
    shop_id: str
    as_of: datetime
    interested_30d: int
    buyers_365d: int
    members: int
    new_customers_7d: int
    stages: dict[str, int]

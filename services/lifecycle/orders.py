"""The orders projection: one row per order, whatever order its events arrive in.

Per-status times keep the earliest time seen, descriptive groups (total, shipping, items)
come from the newest event that carries them, refunds add up (`ORDER_MERGE`). An order
belongs to the customer its strongest, earliest identifying event named: the platform's
customer id outranks a phone, which outranks an email (`owner_rank`), and among equals the
earliest event wins (at the same time, the smaller event id: `owner_event`). A later event
about the same order adds facts but never moves it; only a deliberate profile merge does
(`profiles.merge_profiles`), and any move re-derives both customers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import upsert
from libs.common.db.keysets import columns_of, in_rows, insert_select, reused, rows_params
from libs.common.events import Envelope, OrderData
from services.lifecycle.identities import Identity
from services.lifecycle.merging import Earliest, Latest, Merge, Pick, Total
from services.lifecycle.models import orders

STATUS_TIMES = (
    "created_at",
    "paid_at",
    "shipped_at",
    "completed_at",
    "cancelled_at",
    "refunded_at",
)

OrderKey = tuple[str, str]

ORDER_MERGE = Merge(
    (
        Pick(
            ("customer_id",), at="owner_at", prefer="oldest", rank="owner_rank", tie="owner_event"
        ),
        Pick(("total_minor", "currency"), at="total_at", prefer="newest"),
        Pick(("item_count",), at="items_at", prefer="newest"),
        Pick(("shipping_city", "shipping_province"), at="shipping_at", prefer="newest"),
        *(Earliest(name) for name in STATUS_TIMES),
        Total("refunded_minor"),
        Latest("data_time"),
    )
)


def owner_rank(identity: Identity) -> int:
    """How strongly an event names its customer: platform id 3, phone 2, email 1."""
    if identity.platform_id:
        return 3
    if identity.phone:
        return 2
    return 1 if identity.email else 0


@dataclass(frozen=True)
class Owner:
    customer_id: str
    rank: int
    at: datetime
    event_id: str | None

    def outranked_by(self, rank: int, at: datetime, event_id: str) -> bool:
        """Whether an event (`event_id`) naming its customer with `rank` at `at` would own
        the order: stronger, else earlier, else (same time) a smaller event id."""
        if rank != self.rank:
            return rank > self.rank
        if at != self.at:
            return at < self.at
        return self.event_id is not None and event_id < self.event_id


async def load_owners(conn: AsyncConnection, keys: Iterable[OrderKey]) -> dict[OrderKey, Owner]:
    """The stored owner of each of these orders that exists."""
    wanted = list(set(keys))
    if not wanted:
        return {}
    o = orders.c
    rows = await conn.execute(
        select(o.shop_id, o.order_id, o.customer_id, o.owner_rank, o.owner_at, o.owner_event).where(
            in_rows(
                conn,
                "owned",
                [o.shop_id, o.order_id],
                [("shop_id", String()), ("order_id", String())],
                wanted,
            )
        )
    )
    return {
        (r.shop_id, r.order_id): Owner(r.customer_id, r.owner_rank, r.owner_at, r.owner_event)
        for r in rows
    }


def order_row(event: Envelope, data: OrderData, customer_id: str, rank: int) -> dict[str, Any]:
    """The row one order event contributes (merged with `ORDER_MERGE`)."""
    status = event.type.split(".", 1)[1]
    times = {name: getattr(data, name) for name in STATUS_TIMES}
    # The event of a status is itself evidence of when the order reached it.
    times[f"{status}_at"] = times[f"{status}_at"] or event.time
    refunded = 0
    if status == "refunded":
        whole = data.total.amount_minor if data.total else 0
        refunded = data.refund.amount_minor if data.refund else whole
    at = event.time
    return {
        "shop_id": event.shop_id,
        "order_id": data.order_id,
        "customer_id": customer_id,
        "owner_rank": rank,
        "owner_at": at,
        "owner_event": event.id,
        "status": status,
        "total_minor": data.total.amount_minor if data.total else None,
        "currency": data.total.currency if data.total else None,
        "total_at": at if data.total else None,
        "refunded_minor": refunded,
        "item_count": sum(item.quantity for item in data.items) if data.items else None,
        "items_at": at if data.items else None,
        "shipping_province": data.shipping.province if data.shipping else None,
        "shipping_city": data.shipping.city if data.shipping else None,
        "shipping_at": at if data.shipping else None,
        **times,
        "data_time": at,
    }


def order_status(row: Any) -> str:
    """The order's status from the times it reached each status (arrival order free)."""
    if row.refunded_at is not None and row.refunded_minor >= (row.total_minor or 0):
        return "refunded"
    if row.cancelled_at is not None and not is_purchase(row):
        return "cancelled"
    if row.completed_at is not None:
        return "completed"
    if row.shipped_at is not None:
        return "shipped"
    if row.paid_at is not None:
        return "paid"
    if row.cancelled_at is not None:
        return "cancelled"
    if row.refunded_at is not None:
        return "paid"
    return "created"


def is_purchase(row: Any) -> bool:
    """An order counts as a purchase once it reached `paid` or a later status (shipped,
    completed, refunded all imply payment); one cancelled before payment never was."""
    return (
        row.paid_at is not None
        or row.shipped_at is not None
        or row.completed_at is not None
        or row.refunded_at is not None
    )


def purchased_at(row: Any) -> datetime:
    """When a purchase was placed: its creation time, else the earliest status reached."""
    placed: datetime = row.created_at or min(
        t for t in (row.paid_at, row.shipped_at, row.completed_at, row.refunded_at) if t is not None
    )
    return placed


_ORDER_COLUMNS = (
    "shop_id",
    "order_id",
    "customer_id",
    "owner_rank",
    "owner_at",
    "owner_event",
    "status",
    "total_minor",
    "currency",
    "total_at",
    "refunded_minor",
    "item_count",
    "items_at",
    "shipping_province",
    "shipping_city",
    "shipping_at",
    *STATUS_TIMES,
    "data_time",
)


async def upsert_orders(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Fold rows (at most one per order) into the stored orders with `ORDER_MERGE`."""
    stmt = reused(
        conn,
        "lifecycle.orders.upsert",
        lambda: upsert(
            conn,
            orders,
            ["shop_id", "order_id"],
            [],
            merge=ORDER_MERGE.sql(orders),
            source=insert_select(conn, orders, _ORDER_COLUMNS, None),
        ),
    )
    values = [[r[n] for n in _ORDER_COLUMNS] for r in rows]
    await conn.execute(stmt, rows_params(conn, "new", columns_of(orders, _ORDER_COLUMNS), values))

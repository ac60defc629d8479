"""Campaigns' own projection of the domain topics: what journeys need to know about an
order (its customer, status, total, city, items, tracking numbers) and a customer
(contact details, stage, level, tags), so a carrier push that names only a tracking number
still reaches the right buyer, and conditions never ask another service.

A batch is applied in memory (`Snapshot`: the rows its events touch, loaded with one query
per table) in event order and written back with one upsert per table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import insert_ignore, upsert
from libs.common.db.keysets import by_shop
from libs.common.events import Envelope, decode_event
from services.campaigns.models import customers, orders, parcels, parked

Key = tuple[str, str]
PAID_STATUSES = frozenset({"paid", "shipped", "completed", "refunded"})


@dataclass
class Resolved:
    """Whom and which order an event is about, once the projection is applied."""

    customer_id: str | None
    order_id: str | None
    order_statuses: frozenset[str] = frozenset()
    """The statuses the order had reached up to and including this event."""


@dataclass
class Snapshot:
    customers: dict[Key, dict[str, Any]] = field(default_factory=dict)
    orders: dict[Key, dict[str, Any]] = field(default_factory=dict)
    parcels: dict[Key, dict[str, Any]] = field(default_factory=dict)
    dirty: set[tuple[str, Key]] = field(default_factory=set)

    def customer(self, shop: str, customer_id: str | None) -> dict[str, Any] | None:
        if customer_id is None:
            return None
        return self.customers.get((shop, customer_id))

    def order(self, shop: str, order_id: str | None) -> dict[str, Any] | None:
        if order_id is None:
            return None
        return self.orders.get((shop, order_id))


def _customer_of(event: Envelope) -> str | None:
    data = event.data
    if event.type.startswith("customer."):
        value = data.get("customer_id")
        return str(value) if value else None
    customer = data.get("customer") or {}
    return event.subject or customer.get("id") or customer.get("phone") or customer.get("email")


def customer_row(row: Any) -> dict[str, Any]:
    """A `campaign_customers` row as the projection works with it (tags decoded)."""
    value = dict(row)
    value["tags"] = orjson.loads(value["tags"])
    return value


def order_row(row: Any) -> dict[str, Any]:
    """A `campaign_orders` row as the projection works with it (lists decoded)."""
    value = dict(row)
    value["statuses"] = orjson.loads(value["statuses"])
    value["skus"] = orjson.loads(value["skus"])
    return value


async def _rows(
    conn: AsyncConnection,
    table: Any,
    key: str,
    keys: Iterable[Key],
    decode: Callable[[Any], dict[str, Any]] = dict,
) -> dict[Key, dict[str, Any]]:
    found: dict[Key, dict[str, Any]] = {}
    for where in by_shop(table, key, keys):
        for row in (await conn.execute(select(table).where(where))).mappings():
            found[(row["shop_id"], row[key])] = decode(row)
    return found


async def load_state(
    conn: AsyncConnection, keys: Iterable[tuple[str, str, str | None]]
) -> Snapshot:
    """The projection rows of these (shop, customer, order) triples (the timer path's
    read: no event to apply)."""
    wanted = set(keys)
    snap = Snapshot()
    snap.customers = await _rows(
        conn, customers, "customer_id", {(s, c) for s, c, _ in wanted}, customer_row
    )
    snap.orders = await _rows(
        conn, orders, "order_id", {(s, o) for s, _, o in wanted if o is not None}, order_row
    )
    return snap


async def load(conn: AsyncConnection, events: Sequence[Envelope]) -> Snapshot:
    """The rows `events` may touch: their orders, parcels and customers (and the
    customers of those orders)."""
    order_keys: set[Key] = set()
    parcel_keys: set[Key] = set()
    customer_keys: set[Key] = set()
    for event in events:
        data = event.data
        if data.get("order_id"):
            order_keys.add((event.shop_id, str(data["order_id"])))
        if data.get("tracking_number"):
            parcel_keys.add((event.shop_id, str(data["tracking_number"])))
        who = _customer_of(event)
        if who:
            customer_keys.add((event.shop_id, who))
        for merged in data.get("merged_ids") or ():
            customer_keys.add((event.shop_id, str(merged)))
    snap = Snapshot()
    snap.parcels = await _rows(conn, parcels, "tracking_number", parcel_keys)
    order_keys |= {(shop, p["order_id"]) for (shop, _), p in snap.parcels.items()}
    snap.orders = await _rows(conn, orders, "order_id", order_keys, order_row)
    for row in snap.orders.values():
        customer_keys.add((row["shop_id"], row["customer_id"]))
    snap.customers = await _rows(conn, customers, "customer_id", customer_keys, customer_row)
    return snap


def _touch_customer(snap: Snapshot, shop: str, customer_id: str, at: datetime) -> dict[str, Any]:
    key = (shop, customer_id)
    row = snap.customers.get(key)
    if row is None:
        row = snap.customers[key] = {
            "shop_id": shop,
            "customer_id": customer_id,
            "name": None,
            "phone": None,
            "email": None,
            "stage": None,
            "level": None,
            "tags": [],
            "is_returning": None,
            "city": None,
            "province": None,
            "merged_into": None,
            "updated_at": at,
            "purchases": 0,
            "spent_minor": 0,
            "last_purchase_at": None,
            "last_cart_at": None,
            "p_alive": None,
            "expected_purchases_90d": None,
            "next_purchase_at": None,
        }
    snap.dirty.add(("customer", key))
    row["updated_at"] = at
    return row


def _contact(row: dict[str, Any], customer: dict[str, Any]) -> None:
    for name in ("name", "phone", "email"):
        if customer.get(name):
            row[name] = customer[name]


def follow(snap: Snapshot, shop: str, customer_id: str | None) -> str | None:
    """The profile a customer id was merged into, if it was (a few hops at most)."""
    for _ in range(8):
        row = snap.customer(shop, customer_id)
        if row is None or not row.get("merged_into"):
            return customer_id
        customer_id = row["merged_into"]
    return customer_id


def apply(snap: Snapshot, event: Envelope) -> Resolved:
    """Apply one event to the projection; return whom and which order it is about."""
    shop, data, at = event.shop_id, event.data, event.time
    kind = event.type.split(".", 1)[0]
    if kind == "order":
        order_id = str(data["order_id"])
        key = (shop, order_id)
        row = snap.orders.get(key)
        who = _customer_of(event) or ""
        if row is None:
            row = snap.orders[key] = {
                "shop_id": shop,
                "order_id": order_id,
                "customer_id": who,
                "status": data["status"],
                "statuses": [],
                "total_minor": None,
                "currency": None,
                "city": None,
                "province": None,
                "skus": [],
                "item_count": None,
                "paid_at": None,
                "updated_at": at,
            }
        status = data["status"]
        if status not in row["statuses"]:
            row["statuses"].append(status)
        row["status"] = status
        total = data.get("total")
        if total:
            row["total_minor"], row["currency"] = total["amount_minor"], total["currency"]
        shipping = data.get("shipping") or {}
        row["city"] = shipping.get("city") or row["city"]
        row["province"] = shipping.get("province") or row["province"]
        items = data.get("items") or []
        if items:
            row["skus"] = sorted({str(i["sku"]) for i in items if i.get("sku")})
            row["item_count"] = sum(int(i.get("quantity", 1)) for i in items)
        first_payment = status in PAID_STATUSES and row["paid_at"] is None
        if first_payment:
            row["paid_at"] = _time(data.get("paid_at")) or at
        row["updated_at"] = at
        snap.dirty.add(("order", key))
        if data.get("tracking_number"):
            _link_parcel(snap, shop, str(data["tracking_number"]), order_id, data.get("carrier"))
        customer_id = follow(snap, shop, row["customer_id"])
        if customer_id:
            crow = _touch_customer(snap, shop, customer_id, at)
            _contact(crow, data.get("customer") or {})
            if first_payment:
                crow["purchases"] += 1
                crow["spent_minor"] += int(row["total_minor"] or 0)
                paid_at = row["paid_at"]
                if crow["last_purchase_at"] is None or paid_at > crow["last_purchase_at"]:
                    crow["last_purchase_at"] = paid_at
            crow["city"] = row["city"] or crow["city"]
            crow["province"] = row["province"] or crow["province"]
        return Resolved(customer_id, order_id, frozenset(row["statuses"]))
    if kind == "logistics":
        tracking = str(data["tracking_number"])
        linked: str | None = str(data["order_id"]) if data.get("order_id") else None
        if linked:
            _link_parcel(snap, shop, tracking, linked, data.get("carrier"))
        else:
            parcel = snap.parcels.get((shop, tracking))
            linked = str(parcel["order_id"]) if parcel else None
        order = snap.order(shop, linked)
        owner: str | None = order["customer_id"] if order else _customer_of(event)
        customer_id = follow(snap, shop, owner)
        if customer_id and data.get("customer"):
            _contact(_touch_customer(snap, shop, customer_id, at), data["customer"])
        return Resolved(customer_id, linked)
    if kind == "customer":
        customer_id = follow(snap, shop, _customer_of(event))
        if customer_id is None:
            return Resolved(None, None)
        row = _touch_customer(snap, shop, customer_id, at)
        if event.type == "customer.stage_changed":
            row["stage"] = data.get("current")
            row["is_returning"] = bool(data.get("returning"))
        elif event.type == "customer.level_changed":
            row["level"] = data.get("current")
        elif event.type == "customer.tag_added":
            if data["tag"] not in row["tags"]:
                row["tags"] = [*row["tags"], data["tag"]]
        elif event.type == "customer.tag_removed":
            row["tags"] = [t for t in row["tags"] if t != data["tag"]]
        elif event.type == "customer.prediction_changed":
            row["p_alive"] = data["p_alive"]
            row["expected_purchases_90d"] = data["expected_purchases_90d"]
            row["next_purchase_at"] = _time(data.get("next_purchase_at"))
        elif event.type == "customer.merged":
            for merged in data.get("merged_ids") or ():
                if merged != customer_id:
                    gone = _touch_customer(snap, shop, str(merged), at)
                    gone["merged_into"] = customer_id
                    for name in ("name", "phone", "email"):
                        row[name] = row[name] or gone[name]
        return Resolved(customer_id, None)
    customer_id = follow(snap, shop, _customer_of(event))
    if customer_id:
        crow = _touch_customer(snap, shop, customer_id, at)
        _contact(crow, event.data.get("customer") or {})
        if event.type == "cart.added" and (
            crow["last_cart_at"] is None or at > crow["last_cart_at"]
        ):
            crow["last_cart_at"] = at
    return Resolved(customer_id, None)


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _link_parcel(snap: Snapshot, shop: str, tracking: str, order_id: str, carrier: Any) -> None:
    key = (shop, tracking)
    snap.parcels[key] = {
        "shop_id": shop,
        "tracking_number": tracking,
        "order_id": order_id,
        "carrier": str(carrier) if carrier else None,
    }
    snap.dirty.add(("parcel", key))


def waits_for_order(event: Envelope, who: Resolved) -> bool:
    """A carrier update whose waybill no order has named yet: parked until one does."""
    return event.type.startswith("logistics.") and who.order_id is None


def linked_parcels(snap: Snapshot) -> list[Key]:
    return sorted(key for kind, key in snap.dirty if kind == "parcel")


async def park(conn: AsyncConnection, events: Sequence[Envelope], at: datetime) -> None:
    if events:
        await conn.execute(
            insert_ignore(conn, parked),
            [
                {
                    "shop_id": e.shop_id,
                    "tracking_number": str(e.data["tracking_number"]),
                    "event_key": e.dedupe_key,
                    "event": e.to_bytes().decode(),
                    "parked_at": at,
                }
                for e in events
            ],
        )


async def unpark(conn: AsyncConnection, keys: Sequence[Key]) -> list[Envelope]:
    """Take the parked updates of these waybills (now linked to an order), oldest first."""
    found: list[Envelope] = []
    p = parked.c
    for where in by_shop(parked, "tracking_number", keys):
        rows = await conn.execute(select(p.event).where(where))
        found += [decode_event(text.encode()) for text in rows.scalars()]
        if found:
            await conn.execute(parked.delete().where(where))
    found.sort(key=lambda e: e.time)
    return found


async def save(conn: AsyncConnection, snap: Snapshot) -> None:
    """Write back every row the batch changed (one upsert per table)."""
    dumps = orjson.dumps
    rows: dict[str, list[dict[str, Any]]] = {"customer": [], "order": [], "parcel": []}
    for kind, key in snap.dirty:
        if kind == "customer":
            row = dict(snap.customers[key])
            row["tags"] = dumps(row["tags"]).decode()
        elif kind == "order":
            row = dict(snap.orders[key])
            row["statuses"] = dumps(row["statuses"]).decode()
            row["skus"] = dumps(row["skus"]).decode()
        else:
            row = snap.parcels[key]
        rows[kind].append(row)
    for kind, table, pk in (
        ("customer", customers, ["shop_id", "customer_id"]),
        ("order", orders, ["shop_id", "order_id"]),
        ("parcel", parcels, ["shop_id", "tracking_number"]),
    ):
        if rows[kind]:
            columns = [c.name for c in table.columns if c.name not in pk]
            await conn.execute(upsert(conn, table, pk, columns), rows[kind])
    snap.dirty.clear()


def _place(data: dict[str, Any], name: str) -> Any:
    for part in ("checkpoint", "shipping", "destination"):
        value = (data.get(part) or {}).get(name)
        if value:
            return value
    return None


def event_facts(event: Envelope, now: datetime) -> dict[str, Any]:
    """The `event.*` facts of conditions."""
    data = event.data
    total = data.get("total") or data.get("price") or {}
    checkpoint_time = _time((data.get("checkpoint") or {}).get("time")) or event.time
    return {
        "event.type": event.type,
        "event.status": data.get("status"),
        "event.city": _place(data, "city"),
        "event.province": _place(data, "province"),
        "event.sku": data.get("sku"),
        "event.skus": [str(i["sku"]) for i in data.get("items") or () if i.get("sku")]
        if event.type.startswith("order.")
        else None,
        "event.amount_minor": total.get("amount_minor"),
        "event.stage": data.get("current") if event.type == "customer.stage_changed" else None,
        "event.previous_stage": data.get("previous")
        if event.type == "customer.stage_changed"
        else None,
        "event.tag": data.get("tag"),
        "event.level": data.get("current") if event.type == "customer.level_changed" else None,
        "event.previous_level": data.get("previous")
        if event.type == "customer.level_changed"
        else None,
        "event.carrier": data.get("carrier"),
        "event.age_hours": math.floor((now - checkpoint_time).total_seconds() / 3600),
        "event.p_alive": data.get("p_alive")
        if event.type == "customer.prediction_changed"
        else None,
        "event.expected_purchases_90d": data.get("expected_purchases_90d")
        if event.type == "customer.prediction_changed"
        else None,
        "event.reason": data.get("reason") if event.type == "customer.prediction_changed" else None,
    }


CART_OPEN_DAYS = 30
"""A cart counts as open for this long after it was filled, unless a purchase followed."""


def state_facts(
    customer: dict[str, Any] | None, order: dict[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """The `customer.*` and `order.*` facts of conditions, as the projection holds them.
    `frequency`, `monetary_minor` and `recency_days` count what campaigns saw: paid orders
    since it has been running (lifecycle's figures stay lifecycle's)."""
    facts: dict[str, Any] = {}
    if customer is not None:
        last_purchase = customer.get("last_purchase_at")
        last_cart = customer.get("last_cart_at")
        facts.update(
            {
                "customer.frequency": customer.get("purchases", 0),
                "customer.monetary_minor": customer.get("spent_minor", 0),
                "customer.recency_days": None
                if last_purchase is None
                else math.floor((now - last_purchase).total_seconds() / 86400),
                "customer.cart_open": last_cart is not None
                and now - last_cart <= timedelta(days=CART_OPEN_DAYS)
                and (last_purchase is None or last_cart > last_purchase),
            }
        )
        facts.update(
            {
                "customer.stage": customer["stage"],
                "customer.level": customer["level"],
                "customer.tags": list(customer["tags"]),
                "customer.returning": customer["is_returning"],
                "customer.city": customer["city"],
                "customer.province": customer["province"],
                "customer.has_phone": bool(customer["phone"]),
                "customer.has_email": bool(customer["email"]),
                "customer.p_alive": customer.get("p_alive"),
                "customer.expected_purchases_90d": customer.get("expected_purchases_90d"),
            }
        )
    if order is not None:
        facts.update(
            {
                "order.status": order["status"],
                "order.total_minor": order["total_minor"],
                "order.city": order["city"],
                "order.province": order["province"],
                "order.skus": list(order["skus"]),
                "order.item_count": order["item_count"],
                "order.paid": bool(PAID_STATUSES & set(order["statuses"])),
            }
        )
    return facts


def template_variables(
    event: Envelope, customer: dict[str, Any] | None, order: dict[str, Any] | None
) -> dict[str, Any]:
    """What a message template may name, from the trigger event, the customer and the
    order (DESIGN: `customer.name`, `order.id`, `order.total`, `order.city`,
    `parcel.tracking_number`, `parcel.carrier`, `parcel.city`)."""
    data = event.data
    out: dict[str, Any] = {"customer": {"name": (customer or {}).get("name")}}
    if order is not None:
        total = order["total_minor"]
        out["order"] = {
            "id": order["order_id"],
            "total": None if total is None else f"{total / 100:.2f} {order['currency']}",
            "city": order["city"],
        }
    if event.type.startswith("logistics."):
        out["parcel"] = {
            "tracking_number": data.get("tracking_number"),
            "carrier": data.get("carrier"),
            "city": _place(data, "city"),
            "status": data.get("status"),
        }
    return out

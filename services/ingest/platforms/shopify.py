"""Shopify webhooks: verify the HMAC and normalise orders, fulfilments and checkouts.

Verification: `X-Shopify-Hmac-Sha256` is base64(HMAC-SHA256(secret, raw body)); any of the
shop's current secrets may match (rotation). `delivery_id` is `X-Shopify-Event-Id`, else
`X-Shopify-Webhook-Id`. Only the topics below are parsed; every other topic is answered with
no events, whatever its body.

| topic                                  | canonical events                                      |
|----------------------------------------|-------------------------------------------------------|
| orders/create                          | order.created                                         |
| orders/paid                            | order.paid (`paid_at` = the order's `updated_at`)     |
| orders/cancelled                       | order.cancelled                                       |
| orders/fulfilled                       | order.shipped (tracking of the latest fulfillment)    |
| orders/updated                         | one order.* event by the table below                  |
| fulfillments/create, fulfillments/update | order.shipped and/or one logistics.* event (below)  |
| fulfillment_events/create              | one logistics.* event carrying the checkpoint         |
| checkouts/create, checkouts/update     | one cart.added per line item of an open checkout      |
| refunds/create                         | order.refunded with the amount refunded               |

orders/updated, first matching row wins:

| order fields                                              | event           |
|-----------------------------------------------------------|-----------------|
| `cancelled_at` set                                        | order.cancelled |
| `financial_status` refunded, partially_refunded           | order.refunded  |
| `closed_at` set (archived) and `fulfillment_status` fulfilled | order.completed |
| `fulfillment_status` fulfilled, partial                   | order.shipped   |
| `financial_status` paid, authorized                       | order.paid      |
| `financial_status` voided, expired                        | order.cancelled |
| anything else (pending, partially_paid, null)             | order.created   |

An order.refunded from an order payload becomes one event per entry of its `refunds` (ids by
refund id, the same ids refunds/create produces, so the two dedupe); without `refunds` it is
one event without a `refund` amount. The refunded amount of a refund is the sum of its
successful `refund` transactions; a refund that moved no money (restock only) yields nothing.

Fulfillment `shipment_status` and fulfillment event `status` share one vocabulary:

| Shopify                                 | logistics status                         |
|-----------------------------------------|------------------------------------------|
| null, label_printed, label_purchased, confirmed | none: not with the carrier yet   |
| carrier_picked_up                       | picked_up                                |
| in_transit                              | in_transit, or arrived_city (see below)  |
| out_for_delivery, ready_for_pickup      | out_for_delivery                         |
| delivered, picked_up (by the buyer)     | delivered                                |
| attempted_delivery, delayed, failure    | exception (reason: the message or status)|

fulfillments/create always yields order.shipped (unless the fulfillment is cancelled, error
or failure) plus the logistics event its `shipment_status` maps to; fulfillments/update
yields the logistics event, or order.shipped while the status maps to none (e.g. tracking
added before pickup).

Gaps in Shopify's payloads, and what stands in:
- fulfillment_events carry a checkpoint (city, province) but neither tracking number nor
  carrier: `tracking_number` is `shopify-fulfillment-{fulfillment_id}` and `carrier`
  `shopify` unless the payload has `tracking_number` / `tracking_company`.
- arrived_city needs the parcel's destination, which Shopify's fulfillment event does not
  carry: an in_transit event becomes `logistics.arrived_city` only when the payload has a
  `destination` (or `shipping_address`) whose city equals the checkpoint city (compared
  case-insensitively, ignoring a trailing 市); otherwise it stays in_transit.
- fulfillments and refunds carry neither the order's total nor a customer id: order.shipped
  from a fulfillment and order.refunded from refunds/create have no `total` (consumers keep
  the total they know; a refund's amount is its `refund`), and their `customer` is what the
  payload tells (a fulfillment's `email`; nothing for a refund).
- a checkout already completed (it became an order) or without any customer identity
  yields no cart.added.

Event ids are `shopify:{shop_id}:{order id}:{type}:{discriminator}`: the order's
`updated_at`, the fulfillment id and `updated_at`, the fulfillment event id, `refund-{id}`,
or `checkout-{token}` with the line index and `updated_at`, so a redelivery repeats its ids.
Money is Shopify's decimal strings scaled by the currency's ISO 4217 exponent; phone numbers
and emails that do not validate are dropped, never a reason to reject an order. The generic
helpers are in `payloads`, shared with the other adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from libs.common.events import CARRIER_MAX, Envelope
from services.ingest.platforms.base import InvalidPayload, Normalized, ShopContext
from services.ingest.platforms.payloads import (
    JsonObject,
    ShopEvents,
    address,
    as_list,
    as_object,
    checkpoint,
    clip,
    contact,
    currency_code,
    header,
    items,
    load_json_object,
    minor_units,
    missing,
    money,
    money_minor,
    optional_time,
    required_text,
    signature_matches,
    stamp,
    subject_of,
    text,
)

_TOPIC_STATUS = {
    "orders/create": "created",
    "orders/paid": "paid",
    "orders/cancelled": "cancelled",
    "orders/fulfilled": "shipped",
}
_SHIPMENT_STATUS = {
    "carrier_picked_up": "picked_up",
    "in_transit": "in_transit",
    "out_for_delivery": "out_for_delivery",
    "ready_for_pickup": "out_for_delivery",
    "delivered": "delivered",
    "picked_up": "delivered",
    "attempted_delivery": "exception",
    "delayed": "exception",
    "failure": "exception",
}
_DEAD_FULFILLMENT = frozenset({"cancelled", "error", "failure"})


class ShopifyAdapter:
    """Verifies and normalises Shopify webhook deliveries."""

    name = "shopify"

    def verify(self, body: bytes, headers: Mapping[str, str], secrets: Sequence[str]) -> bool:
        signature = header(headers, "X-Shopify-Hmac-Sha256")
        return signature is not None and signature_matches(body, signature, secrets)

    def normalize(self, body: bytes, headers: Mapping[str, str], shop: ShopContext) -> Normalized:
        topic = header(headers, "X-Shopify-Topic")
        if topic is None:
            raise InvalidPayload("X-Shopify-Topic", "missing header", status=400)
        delivery_id = header(headers, "X-Shopify-Event-Id") or header(
            headers, "X-Shopify-Webhook-Id"
        )
        handler = _HANDLERS.get(topic)
        if handler is None:
            return Normalized(topic=topic, delivery_id=delivery_id)
        events = handler(ShopEvents("shopify", shop), load_json_object(body), topic)
        return Normalized(topic=topic, events=events, delivery_id=delivery_id)


def _order_events(shop: ShopEvents, order: JsonObject, topic: str) -> list[Envelope]:
    status = _TOPIC_STATUS.get(topic) or _updated_status(order)
    if status == "refunded":
        base = _order_data(shop, order, status)
        refunds = [
            _refund_event(shop, as_object(refund), f"refunds[{index}].", base)
            for index, refund in enumerate(as_list(order.get("refunds")))
        ]
        events = [event for event in refunds if event is not None]
        if events:
            return events
    return [_order_event(shop, order, status)]


def _updated_status(order: JsonObject) -> str:
    financial = order.get("financial_status")
    fulfillment = order.get("fulfillment_status")
    if order.get("cancelled_at"):
        return "cancelled"
    if financial in ("refunded", "partially_refunded"):
        return "refunded"
    if order.get("closed_at") and fulfillment == "fulfilled":
        return "completed"
    if fulfillment in ("fulfilled", "partial"):
        return "shipped"
    if financial in ("paid", "authorized"):
        return "paid"
    if financial in ("voided", "expired"):
        return "cancelled"
    return "created"


def _order_event(shop: ShopEvents, order: JsonObject, status: str) -> Envelope:
    data = _order_data(shop, order, status)
    updated = _changed_at(shop, order)
    when = updated
    if status == "created":
        when = data.get("created_at") or updated
    elif status == "paid":
        data["paid_at"] = updated
    elif status == "cancelled":
        when = data["cancelled_at"] = data.get("cancelled_at") or updated
    elif status == "shipped":
        fulfillment = _latest_fulfillment(order)
        data.update(_tracking(fulfillment))
        shipped = optional_time(fulfillment, "created_at", "fulfillments.created_at", shop.tz)
        when = data["shipped_at"] = shipped or updated
    elif status == "completed":
        closed = optional_time(order, "closed_at", "closed_at", shop.tz)
        when = data["completed_at"] = closed or updated
    else:
        data["refunded_at"] = updated
    return shop.build(
        f"order.{status}",
        (data["order_id"], f"order.{status}", stamp(updated)),
        time=when,
        data=data,
    )


def _order_data(shop: ShopEvents, order: JsonObject, status: str) -> JsonObject:
    currency = currency_code(order.get("currency"), shop.context.currency)
    data: JsonObject = {
        "order_id": required_text(order, "id", "id"),
        "customer": _customer(order),
        "status": status,
        "total": money(order.get("total_price"), currency, "total_price"),
        "items": _items(order.get("line_items"), currency, "line_items"),
    }
    shipping = _address(order.get("shipping_address"))
    if shipping:
        data["shipping"] = shipping
    for name in ("created_at", "cancelled_at"):
        value = optional_time(order, name, name, shop.tz)
        if value:
            data[name] = value
    return data


def _refund_event(
    shop: ShopEvents, refund: JsonObject, path: str, base: JsonObject | None
) -> Envelope | None:
    """One refund as order.refunded, on top of the order's data (`base`) when known."""
    refund_id = required_text(refund, "id", f"{path}id")
    transactions = [
        item
        for item in map(as_object, as_list(refund.get("transactions")))
        if item.get("kind") == "refund" and item.get("status") == "success"
    ]
    currency = base["total"]["currency"] if base else _refund_currency(shop, refund, transactions)
    amount = sum(
        minor_units(item.get("amount"), currency, f"{path}transactions.amount")
        for item in transactions
    )
    if amount == 0:
        return None
    refunded = money_minor(amount, currency)
    refunded_at = (
        optional_time(refund, "processed_at", f"{path}processed_at", shop.tz)
        or optional_time(refund, "created_at", f"{path}created_at", shop.tz)
        or missing(f"{path}created_at")
    )
    if base is None:
        lines = [
            {**as_object(line.get("line_item")), "quantity": line.get("quantity")}
            for line in map(as_object, as_list(refund.get("refund_line_items")))
        ]
        data: JsonObject = {
            "order_id": required_text(refund, "order_id", f"{path}order_id"),
            "customer": {},
            "status": "refunded",
            "items": _items(lines, currency, f"{path}refund_line_items"),
        }
    else:
        data = dict(base)
    data.update(refund=refunded, refunded_at=refunded_at)
    return shop.build(
        "order.refunded",
        (data["order_id"], "order.refunded", f"refund-{refund_id}"),
        time=refunded_at,
        data=data,
    )


def _refund_currency(shop: ShopEvents, refund: JsonObject, transactions: list[JsonObject]) -> str:
    for item in transactions:
        if text(item.get("currency")):
            return currency_code(item.get("currency"), shop.context.currency)
    for line in map(as_object, as_list(refund.get("refund_line_items"))):
        shop_money = as_object(as_object(line.get("subtotal_set")).get("shop_money"))
        if text(shop_money.get("currency_code")):
            return currency_code(shop_money.get("currency_code"), shop.context.currency)
    return currency_code(None, shop.context.currency)


def _refunds_create(shop: ShopEvents, refund: JsonObject, topic: str) -> list[Envelope]:
    event = _refund_event(shop, refund, "", None)
    return [event] if event else []


def _fulfillment_events(shop: ShopEvents, fulfillment: JsonObject, topic: str) -> list[Envelope]:
    if fulfillment.get("status") in _DEAD_FULFILLMENT:
        return []
    order_id = required_text(fulfillment, "order_id", "order_id")
    fulfillment_id = required_text(fulfillment, "id", "id")
    updated = _changed_at(shop, fulfillment)
    key = f"{fulfillment_id}:{stamp(updated)}"
    customer = contact(emails=(fulfillment.get("email"),))
    destination = _address(fulfillment.get("destination"))
    shipment = text(fulfillment.get("shipment_status"))
    logistics = _SHIPMENT_STATUS.get(shipment or "")
    events: list[Envelope] = []
    if topic == "fulfillments/create" or logistics is None:
        shipped = optional_time(fulfillment, "created_at", "created_at", shop.tz) or updated
        currency = _lines_currency(fulfillment.get("line_items"), shop.context.currency)
        data: JsonObject = {
            "order_id": order_id,
            "customer": customer,
            "status": "shipped",
            "items": _items(fulfillment.get("line_items"), currency, "line_items"),
            "shipped_at": shipped,
            **_tracking(fulfillment),
        }
        if destination:
            data["shipping"] = destination
        events.append(
            shop.build("order.shipped", (order_id, "order.shipped", key), time=shipped, data=data)
        )
    if logistics is not None:
        events.append(
            _logistics_event(
                shop,
                fulfillment,
                logistics,
                (order_id, f"logistics.{logistics}", key),
                fulfillment_id=fulfillment_id,
                time=updated,
                point=checkpoint(time=updated, description=shipment),
                reason=shipment,
                customer=customer,
                destination=destination,
            )
        )
    return events


def _fulfillment_event_events(shop: ShopEvents, event: JsonObject, topic: str) -> list[Envelope]:
    shopify_status = text(event.get("status"))
    status = _SHIPMENT_STATUS.get(shopify_status or "")
    if status is None:
        return []
    event_id = required_text(event, "id", "id")
    order_id = required_text(event, "order_id", "order_id")
    fulfillment_id = required_text(event, "fulfillment_id", "fulfillment_id")
    happened = (
        optional_time(event, "happened_at", "happened_at", shop.tz)
        or optional_time(event, "created_at", "created_at", shop.tz)
        or missing("happened_at")
    )
    place = checkpoint(
        time=happened,
        province=event.get("province"),
        city=event.get("city"),
        description=event.get("message"),
    )
    destination = _address(event.get("destination") or event.get("shipping_address"))
    if status == "in_transit" and _same_city(place.get("city"), destination):
        status = "arrived_city"
    return [
        _logistics_event(
            shop,
            event,
            status,
            (order_id, f"logistics.{status}", event_id),
            fulfillment_id=fulfillment_id,
            time=happened,
            point=place,
            reason=text(event.get("message")) or shopify_status,
            customer={},
            destination=destination,
        )
    ]


def _logistics_event(
    shop: ShopEvents,
    payload: JsonObject,
    status: str,
    key: tuple[str, ...],
    *,
    fulfillment_id: str,
    time: datetime,
    point: JsonObject,
    reason: str | None,
    customer: JsonObject,
    destination: JsonObject | None,
) -> Envelope:
    tracking = _tracking(payload)
    data: JsonObject = {
        "tracking_number": tracking.get("tracking_number")
        or f"shopify-fulfillment-{fulfillment_id}",
        "carrier": tracking.get("carrier") or "shopify",
        "status": status,
        "checkpoint": point,
        "order_id": key[0],
    }
    if customer:
        data["customer"] = customer
    if destination:
        data["destination"] = destination
    if status == "exception":
        data["reason"] = (reason or "exception")[:200]
    return shop.build(f"logistics.{status}", key, time=time, data=data)


def _checkout_events(shop: ShopEvents, checkout: JsonObject, topic: str) -> list[Envelope]:
    token = text(checkout.get("token")) or required_text(checkout, "id", "token")
    if checkout.get("completed_at"):
        return []
    customer = _customer(checkout)
    if not subject_of(customer):
        return []
    currency = currency_code(checkout.get("currency"), shop.context.currency)
    occurred = _changed_at(shop, checkout)
    events: list[Envelope] = []
    for index, item in enumerate(_items(checkout.get("line_items"), currency, "line_items")):
        data = {"customer": customer, **item, "occurred_at": occurred}
        key = (f"checkout-{token}", "cart.added", str(index), stamp(occurred))
        events.append(shop.build("cart.added", key, time=occurred, data=data))
    return events


_HANDLERS: dict[str, Callable[[ShopEvents, JsonObject, str], list[Envelope]]] = {
    **dict.fromkeys((*_TOPIC_STATUS, "orders/updated"), _order_events),
    "fulfillments/create": _fulfillment_events,
    "fulfillments/update": _fulfillment_events,
    "fulfillment_events/create": _fulfillment_event_events,
    "checkouts/create": _checkout_events,
    "checkouts/update": _checkout_events,
    "refunds/create": _refunds_create,
}


def _customer(document: JsonObject) -> JsonObject:
    """The buyer of an order or checkout: its `customer`, completed from the document."""
    customer = as_object(document.get("customer"))
    names = (text(customer.get("first_name")), text(customer.get("last_name")))
    region = text(as_object(document.get("shipping_address")).get("country_code")) or text(
        as_object(document.get("billing_address")).get("country_code")
    )
    return contact(
        customer_id=customer.get("id"),
        name=" ".join(name for name in names if name) or None,
        phones=(customer.get("phone"), document.get("phone")),
        emails=(customer.get("email"), document.get("email"), document.get("contact_email")),
        region=region,
    )


def _address(value: Any) -> JsonObject | None:
    place = as_object(value)
    return address(
        country=place.get("country_code"), province=place.get("province"), city=place.get("city")
    )


def _items(lines: Any, currency: str, path: str) -> list[JsonObject]:
    return items(lines, currency, path, title=_title)


def _title(line: JsonObject) -> str | None:
    return text(line.get("title")) or text(line.get("name"))


def _lines_currency(lines: Any, fallback: str) -> str:
    for line in map(as_object, as_list(lines)):
        shop_money = as_object(as_object(line.get("price_set")).get("shop_money"))
        if text(shop_money.get("currency_code")):
            return currency_code(shop_money.get("currency_code"), fallback)
    return currency_code(None, fallback)


def _latest_fulfillment(order: JsonObject) -> JsonObject:
    live = [
        item
        for item in map(as_object, as_list(order.get("fulfillments")))
        if item.get("status") not in _DEAD_FULFILLMENT
    ]
    return live[-1] if live else {}


def _tracking(document: JsonObject) -> JsonObject:
    numbers = [text(number) for number in as_list(document.get("tracking_numbers"))]
    number = text(document.get("tracking_number")) or next(filter(None, numbers), None)
    result: JsonObject = {}
    if number:
        result["tracking_number"] = number
    if text(document.get("tracking_company")):
        # Free text for custom carriers: cut to the column, like other descriptive text.
        result["carrier"] = clip(text(document.get("tracking_company")), CARRIER_MAX)
    return result


def _same_city(city: Any, destination: JsonObject | None) -> bool:
    if not isinstance(city, str) or not destination or not destination.get("city"):
        return False
    return _place_name(city) == _place_name(destination["city"])


def _place_name(name: str) -> str:
    """Latin or Chinese names: case and a trailing 市 ignored (AfterShip's `_key` keeps 市)."""
    return name.strip().casefold().removesuffix("市")


def _changed_at(shop: ShopEvents, document: JsonObject) -> datetime:
    return (
        optional_time(document, "updated_at", "updated_at", shop.tz)
        or optional_time(document, "created_at", "created_at", shop.tz)
        or missing("updated_at")
    )

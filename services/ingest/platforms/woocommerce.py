"""WooCommerce webhooks: verify the HMAC and normalise order.created / order.updated.

Verification: `X-WC-Webhook-Signature` is base64(HMAC-SHA256(secret, raw body)); any of the
shop's current secrets may match (rotation). `delivery_id` is `X-WC-Webhook-Delivery-ID`,
the topic `X-WC-Webhook-Topic`. The payload of both order topics is the order as the REST
API (wc/v3) returns it, read when WooCommerce delivers, so it shows the order's status then.

The ping: when a webhook is saved WooCommerce POSTs the form body `webhook_id=N` with no
signature and no topic header, and activates the webhook only if that answers 200. A
delivery with neither header whose whole body is `webhook_id=<digits>` therefore verifies
(it carries nothing and yields nothing, so accepting it unsigned lets no one inject data)
and normalises to topic `ping` with no events. Anything else unsigned fails verification.

Order status (`status`) to canonical event, by what WooCommerce means by each:

| status     | WooCommerce meaning                                    | event           |
|------------|--------------------------------------------------------|-----------------|
| pending    | placed, no payment received yet                        | order.created   |
| on-hold    | awaiting a manual payment (bank transfer, cheque)      | order.created   |
| failed     | payment failed or declined, still unpaid               | order.created   |
| processing | payment received, awaiting fulfilment                  | order.paid      |
| completed  | fulfilled and complete (Woo has no "shipped" status)   | order.completed |
| cancelled  | cancelled by the shop or the customer                  | order.cancelled |
| refunded   | fully refunded                                         | order.refunded  |
| other (trash, checkout-draft, custom statuses)          | | none            |

On topic order.created an order.created event is emitted too when the status maps to a
later one (an order paid at checkout is delivered already `processing`). Every entry of
`refunds` (partial refunds leave the status unchanged) becomes its own order.refunded with
`refund` = that refund's amount and id `...:order.refunded:refund-{id}`, so it is emitted once
however many later deliveries repeat it; a `refunded` order with no `refunds` entries yields
one order.refunded without an amount. Refund events keep `total`, as the payload is the whole
order and its `total` the order's grand total (refunds are listed apart, in `refunds`). Other
timestamps come from the `*_gmt` fields (cancelled and refunded: `date_modified_gmt`,
WooCommerce records no dedicated time).

Event ids are `woocommerce:{shop_id}:{order id}:{type}:{date_modified_gmt}` (refunds as
above). The customer is `customer_id` (0 is a guest: no id), the billing name, phone and
email (a phone or email that does not validate is dropped); the subject falls back to the
phone, then the email. Money is the decimal strings in the order's `currency`; a line's
`price` (WooCommerce derives it by division) is rounded half up to the currency's minor unit.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from libs.common.events import Envelope
from services.ingest.platforms.base import InvalidPayload, Normalized, ShopContext
from services.ingest.platforms.payloads import (
    JsonObject,
    ShopEvents,
    address,
    as_list,
    as_object,
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
    text,
)

_STATUS = {
    "pending": "created",
    "on-hold": "created",
    "failed": "created",
    "processing": "paid",
    "completed": "completed",
    "cancelled": "cancelled",
    "refunded": "refunded",
}
_ORDER_TOPICS = ("order.created", "order.updated")
_PING = re.compile(rb"webhook_id=\d+")


class WooCommerceAdapter:
    """Verifies and normalises WooCommerce webhook deliveries (and answers its ping)."""

    name = "woocommerce"

    def verify(self, body: bytes, headers: Mapping[str, str], secrets: Sequence[str]) -> bool:
        signature = header(headers, "X-WC-Webhook-Signature")
        if signature is None:
            return _is_ping(body, headers)
        return signature_matches(body, signature, secrets)

    def normalize(self, body: bytes, headers: Mapping[str, str], shop: ShopContext) -> Normalized:
        if _is_ping(body, headers):
            return Normalized(topic="ping")
        topic = header(headers, "X-WC-Webhook-Topic")
        if topic is None:
            raise InvalidPayload("X-WC-Webhook-Topic", "missing header", status=400)
        delivery_id = header(headers, "X-WC-Webhook-Delivery-ID")
        if topic not in _ORDER_TOPICS:
            return Normalized(topic=topic, delivery_id=delivery_id)
        events = _order_events(ShopEvents("woocommerce", shop), load_json_object(body), topic)
        return Normalized(topic=topic, events=events, delivery_id=delivery_id)


def _is_ping(body: bytes, headers: Mapping[str, str]) -> bool:
    unsigned = header(headers, "X-WC-Webhook-Signature") is None
    untopical = header(headers, "X-WC-Webhook-Topic") is None
    return unsigned and untopical and _PING.fullmatch(body.strip()) is not None


def _order_events(shop: ShopEvents, order: JsonObject, topic: str) -> list[Envelope]:
    status = _STATUS.get(text(order.get("status")) or "")
    if status is None:
        return []
    base = _order_data(shop, order)
    modified = _time(shop, order, "date_modified") or missing("date_modified_gmt")
    statuses = [status]
    if topic == "order.created" and status != "created":
        statuses.insert(0, "created")
    refunds = [
        event
        for index, refund in enumerate(map(as_object, as_list(order.get("refunds"))))
        if (event := _refund_event(shop, base, refund, f"refunds[{index}]", modified))
    ]
    events = [
        _status_event(shop, base, name, modified)
        for name in statuses
        if name != "refunded" or not refunds
    ]
    return events + refunds


def _status_event(shop: ShopEvents, base: JsonObject, status: str, modified: datetime) -> Envelope:
    data = {**base, "status": status}
    when = modified
    if status == "created":
        when = base.get("created_at") or modified
    elif status in ("paid", "completed"):
        when = base.get(f"{status}_at") or modified
    else:
        data[f"{status}_at"] = modified
    return shop.build(
        f"order.{status}",
        (base["order_id"], f"order.{status}", stamp(modified)),
        time=when,
        data=data,
    )


def _refund_event(
    shop: ShopEvents, base: JsonObject, refund: JsonObject, path: str, modified: datetime
) -> Envelope | None:
    """One entry of `refunds` (its `total` is negative) as order.refunded; None for 0."""
    refund_id = required_text(refund, "id", f"{path}.id")
    currency = base["total"]["currency"]
    amount = abs(minor_units(refund.get("total"), currency, f"{path}.total"))
    if amount == 0:
        return None
    refunded = money_minor(amount, currency)
    data = {**base, "status": "refunded", "refund": refunded, "refunded_at": modified}
    return shop.build(
        "order.refunded",
        (base["order_id"], "order.refunded", f"refund-{refund_id}"),
        time=modified,
        data=data,
    )


def _order_data(shop: ShopEvents, order: JsonObject) -> JsonObject:
    currency = currency_code(order.get("currency"), shop.context.currency)
    billing = as_object(order.get("billing"))
    delivery = as_object(order.get("shipping"))
    customer_id = order.get("customer_id")
    names = (text(billing.get("first_name")), text(billing.get("last_name")))
    data: JsonObject = {
        "order_id": required_text(order, "id", "id"),
        "customer": contact(
            customer_id=customer_id if customer_id not in (0, "0") else None,
            name=" ".join(name for name in names if name) or None,
            phones=(billing.get("phone"),),
            emails=(billing.get("email"),),
            region=text(billing.get("country")) or text(delivery.get("country")),
        ),
        "total": money(order.get("total"), currency, "total"),
        "items": _items(order.get("line_items"), currency),
    }
    shipping = address(
        country=delivery.get("country"), province=delivery.get("state"), city=delivery.get("city")
    )
    if shipping:
        data["shipping"] = shipping
    for name, field in (
        ("created_at", "date_created"),
        ("paid_at", "date_paid"),
        ("completed_at", "date_completed"),
    ):
        value = _time(shop, order, field)
        if value:
            data[name] = value
    return data


def _time(shop: ShopEvents, order: JsonObject, field: str) -> datetime | None:
    """`{field}_gmt` read as UTC, else the site-local `{field}` in the shop's timezone."""
    return optional_time(order, f"{field}_gmt", f"{field}_gmt", UTC) or optional_time(
        order, field, field, shop.tz
    )


def _items(lines: object, currency: str) -> list[JsonObject]:
    """Line items; a line's `price` (derived by division) is rounded to the minor unit."""
    return items(lines, currency, "line_items", title=_title, rounded=True)


def _title(line: JsonObject) -> str | None:
    name = text(line.get("name"))
    return html.unescape(name) if name else None

"""Shopify webhooks: HMAC over the raw body, and Shopify's sample payloads as canonical events."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.ingest.platforms.base import InvalidPayload, PlatformAdapter, ShopContext
from services.ingest.platforms.shopify import ShopifyAdapter
from tests.ingest.platforms.senders import Sender, hmac_sha256_base64

SAMPLES = Path(__file__).parent / "samples" / "shopify"
SHOP = ShopContext(shop_id="acme-tea", currency="CNY", timezone="Asia/Shanghai")
SECRET = "shpss_current"
OLD_SECRET = "shpss_rotated_out"
ORDER_ID = "820982911946154508"
ADAPTER = ShopifyAdapter()


def sample(name: str) -> bytes:
    return (SAMPLES / f"{name}.json").read_bytes()


def variant(name: str, change: Callable[[dict[str, Any]], None]) -> bytes:
    """A sample with fields changed, serialised compactly as Shopify sends it."""
    payload = json.loads(sample(name))
    change(payload)
    return json.dumps(payload).encode()


def headers(topic: str, body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": hmac_sha256_base64(body, secret),
        "X-Shopify-Shop-Domain": "acme-tea.myshopify.com",
        "X-Shopify-API-Version": "2026-07",
        "X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
        "X-Shopify-Event-Id": "98880550-7158-44d4-b7cd-2c97c8a091b5",
        "X-Shopify-Triggered-At": "2022-01-01T00:00:00.000000Z",
    }


SENDER = Sender(ADAPTER, SHOP, SECRET, headers)
deliver = SENDER.deliver
only = SENDER.only


def test_adapter_fulfils_the_platform_contract() -> None:
    adapter: PlatformAdapter = ADAPTER
    assert adapter.name == "shopify"


@pytest.mark.parametrize("name", [path.stem for path in sorted(SAMPLES.glob("*.json"))])
def test_each_sample_signed_by_shopify_verifies(name: str) -> None:
    body = sample(name)
    assert ADAPTER.verify(body, headers("orders/create", body), [SECRET])


def test_any_current_secret_verifies_during_rotation() -> None:
    body = sample("orders_create")
    rotating = [OLD_SECRET, SECRET]
    assert ADAPTER.verify(body, headers("orders/create", body, OLD_SECRET), rotating)
    assert ADAPTER.verify(body, headers("orders/create", body, SECRET), rotating)
    assert not ADAPTER.verify(body, headers("orders/create", body, "shpss_other"), rotating)


def test_wrong_secret_tampered_body_or_missing_signature_fail_verification() -> None:
    body = sample("orders_create")
    signed = headers("orders/create", body)
    assert not ADAPTER.verify(body, headers("orders/create", body, OLD_SECRET), [SECRET])
    assert not ADAPTER.verify(body.replace(b"404.95", b"4.95"), signed, [SECRET])
    assert not ADAPTER.verify(body, {"X-Shopify-Topic": "orders/create"}, [SECRET])
    assert not ADAPTER.verify(body, {**signed, "X-Shopify-Hmac-Sha256": ""}, [SECRET])
    assert not ADAPTER.verify(body, signed, [])
    assert not ADAPTER.verify(body, signed, [""])


def test_headers_are_read_case_insensitively() -> None:
    body = sample("orders_create")
    lowered = {name.lower(): value for name, value in headers("orders/create", body).items()}
    assert ADAPTER.verify(body, lowered, [SECRET])
    assert ADAPTER.normalize(body, lowered, SHOP).events[0].type == "order.created"


def test_orders_create_sample_is_order_created_with_customer_money_and_city() -> None:
    normalized = deliver("orders/create", sample("orders_create"))
    assert normalized.topic == "orders/create"
    assert normalized.delivery_id == "98880550-7158-44d4-b7cd-2c97c8a091b5"
    [event] = normalized.events
    assert event.type == "order.created"
    assert event.id == f"shopify:acme-tea:{ORDER_ID}:order.created:20220101T000000Z"
    assert event.source == "shopify/acme-tea"
    assert event.shop_id == "acme-tea"
    assert event.subject == "115310627314723954"
    assert event.time.isoformat() == "2022-01-01T00:00:00+00:00"
    data = event.data
    assert data["order_id"] == ORDER_ID
    assert data["status"] == "created"
    assert data["customer"] == {
        "id": "115310627314723954",
        "name": "John Smith",
        "email": "john@example.com",
    }
    assert data["total"] == {"amount_minor": 40495, "currency": "USD"}
    assert len(data["items"]) == 5
    assert data["items"][0] == {
        "sku": "SKU2006-001",
        "title": "Aviator sunglasses",
        "quantity": 1,
        "price": {"amount_minor": 8999, "currency": "USD"},
    }
    assert data["shipping"] == {"country": "US", "province": "Kentucky", "city": "Shippington"}
    assert data["created_at"] == "2022-01-01T00:00:00Z"
    assert data["cancelled_at"] == "2022-01-01T00:00:00Z"


def test_delivery_id_falls_back_to_the_webhook_id() -> None:
    body = sample("orders_create")
    received = headers("orders/create", body)
    del received["X-Shopify-Event-Id"]
    normalized = ADAPTER.normalize(body, received, SHOP)
    assert normalized.delivery_id == "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"


@pytest.mark.parametrize(
    ("topic", "event_type", "stamp_field"),
    [
        ("orders/paid", "order.paid", "paid_at"),
        ("orders/cancelled", "order.cancelled", "cancelled_at"),
        ("orders/fulfilled", "order.shipped", "shipped_at"),
    ],
)
def test_each_order_topic_is_its_canonical_event(
    topic: str, event_type: str, stamp_field: str
) -> None:
    event = only(topic, sample("orders_create"))
    assert event.type == event_type
    assert event.data["status"] == event_type.removeprefix("order.")
    assert event.data[stamp_field] == "2022-01-01T00:00:00Z"
    assert event.data["total"] == {"amount_minor": 40495, "currency": "USD"}


def test_fulfilled_order_carries_the_latest_fulfillments_tracking() -> None:
    def fulfilled(order: dict[str, Any]) -> None:
        order["fulfillments"] = [
            {"id": 1, "status": "cancelled", "tracking_number": "OLD", "tracking_company": "X"},
            {
                "id": 2,
                "status": "success",
                "created_at": "2022-01-02T10:00:00+08:00",
                "tracking_number": "SF1234567890",
                "tracking_company": "SF Express",
            },
        ]

    event = only("orders/fulfilled", variant("orders_create", fulfilled))
    assert event.data["tracking_number"] == "SF1234567890"
    assert event.data["carrier"] == "SF Express"
    assert event.data["shipped_at"] == "2022-01-02T02:00:00Z"


def _order_fields(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(order: dict[str, Any]) -> None:
        order.update({"cancelled_at": None, "cancel_reason": None, **fields})

    return change


@pytest.mark.parametrize(
    ("fields", "event_type"),
    [
        ({"cancelled_at": "2022-01-03T00:00:00Z", "financial_status": "paid"}, "order.cancelled"),
        ({"financial_status": "refunded"}, "order.refunded"),
        ({"financial_status": "partially_refunded"}, "order.refunded"),
        (
            {
                "financial_status": "paid",
                "fulfillment_status": "fulfilled",
                "closed_at": "2022-01-05T00:00:00Z",
            },
            "order.completed",
        ),
        ({"financial_status": "paid", "fulfillment_status": "fulfilled"}, "order.shipped"),
        ({"financial_status": "paid", "fulfillment_status": "partial"}, "order.shipped"),
        ({"financial_status": "paid"}, "order.paid"),
        ({"financial_status": "authorized"}, "order.paid"),
        ({"financial_status": "voided"}, "order.cancelled"),
        ({"financial_status": "pending"}, "order.created"),
        ({"financial_status": "partially_paid"}, "order.created"),
    ],
)
def test_orders_updated_maps_financial_and_fulfillment_status(
    fields: dict[str, Any], event_type: str
) -> None:
    event = only("orders/updated", variant("orders_create", _order_fields(**fields)))
    assert event.type == event_type
    assert event.data["status"] == event_type.removeprefix("order.")


def test_completed_order_is_completed_at_its_close() -> None:
    change = _order_fields(
        financial_status="paid",
        fulfillment_status="fulfilled",
        closed_at="2022-01-05T08:00:00+08:00",
    )
    event = only("orders/updated", variant("orders_create", change))
    assert event.data["completed_at"] == "2022-01-05T00:00:00Z"
    assert event.time.isoformat() == "2022-01-05T00:00:00+00:00"


def test_sample_order_updated_is_cancelled_because_it_was() -> None:
    assert only("orders/updated", sample("orders_create")).type == "order.cancelled"


def test_redelivery_repeats_ids_and_a_later_update_gets_new_ones() -> None:
    body = sample("orders_create")
    first = [event.id for event in deliver("orders/updated", body).events]
    again = [event.id for event in deliver("orders/updated", body).events]
    assert first == again

    def later(order: dict[str, Any]) -> None:
        order["updated_at"] = "2022-01-02T09:30:00+08:00"

    [event] = deliver("orders/updated", variant("orders_create", later)).events
    assert event.id == f"shopify:acme-tea:{ORDER_ID}:order.cancelled:20220102T013000Z"
    assert event.id not in first


@pytest.mark.parametrize(
    ("currency", "total", "minor"),
    [
        ("USD", "404.95", 40495),
        ("JPY", "40495", 40495),
        ("JPY", "40495.00", 40495),
        ("KWD", "1.234", 1234),
    ],
)
def test_money_is_scaled_by_the_currency_exponent(currency: str, total: str, minor: int) -> None:
    def priced(order: dict[str, Any]) -> None:
        order.update(currency=currency, total_price=total, line_items=[])

    event = only("orders/create", variant("orders_create", priced))
    assert event.data["total"] == {"amount_minor": minor, "currency": currency}


def test_more_decimals_than_the_currency_has_is_rejected() -> None:
    def yen(order: dict[str, Any]) -> None:
        order.update(currency="JPY", total_price="404.95", line_items=[])

    with pytest.raises(InvalidPayload) as raised:
        deliver("orders/create", variant("orders_create", yen))
    assert raised.value.field == "total_price"
    assert raised.value.status == 422


def test_a_valid_phone_is_normalised_and_an_invalid_one_dropped() -> None:
    def china(order: dict[str, Any]) -> None:
        order["customer"]["phone"] = "138 0013 8000"
        order["shipping_address"].update(country_code="CN", province="浙江省", city="杭州市")

    event = only("orders/create", variant("orders_create", china))
    assert event.data["customer"]["phone"] == "+8613800138000"
    assert event.data["shipping"] == {"country": "CN", "province": "浙江省", "city": "杭州市"}

    def bogus(order: dict[str, Any]) -> None:
        order["customer"]["phone"] = "555-555-SHIP"
        order["customer"]["email"] = "not an email"

    event = only("orders/create", variant("orders_create", bogus))
    assert "phone" not in event.data["customer"]
    assert event.data["customer"]["email"] == "jon@example.com"


def test_guest_order_subject_falls_back_to_the_email() -> None:
    def guest(order: dict[str, Any]) -> None:
        order["customer"] = None

    event = only("orders/create", variant("orders_create", guest))
    assert event.data["customer"] == {"email": "jon@example.com"}
    assert event.subject == "jon@example.com"


def test_fulfillment_sample_is_order_shipped_with_tracking_and_carrier() -> None:
    event = only("fulfillments/create", sample("fulfillments_create"))
    assert event.type == "order.shipped"
    assert event.id == f"shopify:acme-tea:{ORDER_ID}:order.shipped:123456:20220101T000000Z"
    data = event.data
    assert data["order_id"] == ORDER_ID
    assert data["tracking_number"] == "1z827wk74630"
    assert data["carrier"] == "UPS"
    assert data["shipped_at"] == "2022-01-01T00:00:00Z"
    assert data["customer"] == {"email": "jon@example.com"}
    assert event.subject == "jon@example.com"
    assert data["shipping"] == {"country": "US", "province": "Kentucky", "city": "Shippington"}
    # A fulfillment does not carry the order's total: no stand-in, consumers keep theirs.
    assert "total" not in data
    assert [item["sku"] for item in data["items"]][:2] == ["SKU2006-001", "LENS-PROTECT-2YR"]


def _shipment(status: str | None, fulfillment_status: str = "success") -> bytes:
    def change(fulfillment: dict[str, Any]) -> None:
        fulfillment.update(shipment_status=status, status=fulfillment_status)

    return variant("fulfillments_create", change)


@pytest.mark.parametrize(
    ("shipment_status", "event_type"),
    [
        ("carrier_picked_up", "logistics.picked_up"),
        ("in_transit", "logistics.in_transit"),
        ("out_for_delivery", "logistics.out_for_delivery"),
        ("ready_for_pickup", "logistics.out_for_delivery"),
        ("delivered", "logistics.delivered"),
        ("attempted_delivery", "logistics.exception"),
        ("failure", "logistics.exception"),
        (None, "order.shipped"),
        ("label_printed", "order.shipped"),
        ("confirmed", "order.shipped"),
    ],
)
def test_fulfillment_update_maps_its_shipment_status(
    shipment_status: str | None, event_type: str
) -> None:
    event = only("fulfillments/update", _shipment(shipment_status))
    assert event.type == event_type
    assert event.subject == "jon@example.com"
    if event_type == "order.shipped":
        assert "total" not in event.data
    if event_type.startswith("logistics."):
        assert event.data["tracking_number"] == "1z827wk74630"
        assert event.data["carrier"] == "UPS"
        assert event.data["order_id"] == ORDER_ID
        assert event.data["destination"]["city"] == "Shippington"
    if event_type == "logistics.exception":
        assert event.data["reason"] == shipment_status


def test_fulfillment_created_already_in_transit_is_shipped_and_in_transit() -> None:
    events = deliver("fulfillments/create", _shipment("in_transit")).events
    assert [event.type for event in events] == ["order.shipped", "logistics.in_transit"]
    assert "total" not in events[0].data


def test_cancelled_fulfillment_yields_nothing() -> None:
    assert deliver("fulfillments/update", _shipment("delivered", "cancelled")).events == []


def test_fulfillment_event_sample_is_an_in_transit_checkpoint() -> None:
    event = only("fulfillment_events/create", sample("fulfillment_events_create"))
    assert event.type == "logistics.in_transit"
    assert event.id == f"shopify:acme-tea:{ORDER_ID}:logistics.in_transit:1234567"
    assert event.time.isoformat() == "2022-01-01T00:00:00+00:00"
    assert event.data == {
        "tracking_number": "shopify-fulfillment-123456",
        "carrier": "shopify",
        "status": "in_transit",
        "checkpoint": {"time": "2022-01-01T00:00:00Z", "description": "Item is now in transit"},
        "order_id": ORDER_ID,
    }


def _checkpoint(
    city: str, destination: str | None, status: str = "in_transit"
) -> Callable[[dict[str, Any]], None]:
    def change(event: dict[str, Any]) -> None:
        event.update(status=status, city=city, province="浙江省", message="快件到达杭州转运中心")
        if destination is not None:
            event["destination"] = {"country_code": "CN", "province": "浙江省", "city": destination}

    return change


@pytest.mark.parametrize(
    ("city", "destination", "event_type"),
    [
        ("杭州市", "杭州市", "logistics.arrived_city"),
        ("杭州", "杭州市", "logistics.arrived_city"),
        ("Shippington", "shippington", "logistics.arrived_city"),
        ("宁波市", "杭州市", "logistics.in_transit"),
        ("杭州市", None, "logistics.in_transit"),
    ],
)
def test_in_transit_checkpoint_in_the_destination_city_is_arrived_city(
    city: str, destination: str | None, event_type: str
) -> None:
    body = variant("fulfillment_events_create", _checkpoint(city, destination))
    event = only("fulfillment_events/create", body)
    assert event.type == event_type
    assert event.data["checkpoint"]["city"] == city
    assert event.data["checkpoint"]["province"] == "浙江省"


@pytest.mark.parametrize(
    ("status", "event_type"),
    [
        ("out_for_delivery", "logistics.out_for_delivery"),
        ("delivered", "logistics.delivered"),
        ("picked_up", "logistics.delivered"),
        ("delayed", "logistics.exception"),
    ],
)
def test_fulfillment_event_statuses(status: str, event_type: str) -> None:
    body = variant("fulfillment_events_create", _checkpoint("杭州市", "杭州市", status))
    event = only("fulfillment_events/create", body)
    assert event.type == event_type
    if event_type == "logistics.exception":
        assert event.data["reason"] == "快件到达杭州转运中心"


@pytest.mark.parametrize("status", ["confirmed", "label_printed", "something_new"])
def test_fulfillment_event_before_pickup_yields_nothing(status: str) -> None:
    body = variant("fulfillment_events_create", _checkpoint("杭州市", None, status))
    assert deliver("fulfillment_events/create", body).events == []


@pytest.mark.parametrize("topic", ["checkouts/create", "checkouts/update"])
def test_abandoned_checkout_sample_is_cart_added_per_line(topic: str) -> None:
    events = deliver(topic, sample("checkouts_create")).events
    assert [event.type for event in events] == ["cart.added", "cart.added"]
    assert len({event.id for event in events}) == 2
    event = events[0]
    assert event.id == "shopify:acme-tea:checkout-123123123:cart.added:0:20220101T000000Z"
    assert event.subject == "603851970716743426"
    assert event.data == {
        "customer": {"id": "603851970716743426", "name": "John Smith", "email": "john@example.com"},
        "sku": "IPOD2008PINK",
        "title": "IPod Nano - 8GB",
        "quantity": 1,
        "price": {"amount_minor": 19900, "currency": "USD"},
        "occurred_at": "2022-01-01T00:00:00Z",
    }


def test_completed_or_anonymous_checkout_yields_nothing() -> None:
    def completed(checkout: dict[str, Any]) -> None:
        checkout["completed_at"] = "2022-01-01T00:05:00Z"

    def anonymous(checkout: dict[str, Any]) -> None:
        checkout.update(customer=None, email=None, phone=None)

    assert deliver("checkouts/update", variant("checkouts_create", completed)).events == []
    assert deliver("checkouts/update", variant("checkouts_create", anonymous)).events == []


def test_refund_sample_is_order_refunded_with_the_refunded_amount() -> None:
    event = only("refunds/create", sample("refunds_create"))
    assert event.type == "order.refunded"
    assert event.id == (f"shopify:acme-tea:{ORDER_ID}:order.refunded:refund-890088186047892319")
    assert event.data["order_id"] == ORDER_ID
    assert event.data["status"] == "refunded"
    # Two successful refund transactions: 75.00 + 10.00.
    assert event.data["refund"] == {"amount_minor": 8500, "currency": "USD"}
    assert event.data["refunded_at"] == "2022-01-01T00:00:00Z"
    assert [item["sku"] for item in event.data["items"]][-1] == "SKU2006-035"
    # A refund does not carry the order's total: no stand-in, consumers keep theirs.
    assert "total" not in event.data


def test_refund_without_money_moved_yields_nothing() -> None:
    def restock_only(refund: dict[str, Any]) -> None:
        refund["transactions"] = []

    assert deliver("refunds/create", variant("refunds_create", restock_only)).events == []


def test_refunded_order_update_emits_each_refund_with_the_refunds_create_id() -> None:
    refund = json.loads(sample("refunds_create"))
    change = _order_fields(financial_status="refunded", refunds=[refund])
    event = only("orders/updated", variant("orders_create", change))
    assert event.id == only("refunds/create", sample("refunds_create")).id
    assert event.data["refund"] == {"amount_minor": 8500, "currency": "USD"}
    assert event.data["total"] == {"amount_minor": 40495, "currency": "USD"}
    assert event.subject == "115310627314723954"


def test_refunded_order_update_without_refunds_has_no_amount() -> None:
    event = only(
        "orders/updated", variant("orders_create", _order_fields(financial_status="refunded"))
    )
    assert event.type == "order.refunded"
    assert "refund" not in event.data


@pytest.mark.parametrize("topic", ["products/delete", "orders/delete", "app/uninstalled"])
def test_an_unused_topic_yields_no_events(topic: str) -> None:
    normalized = deliver(topic, sample("products_delete"))
    assert normalized.topic == topic
    assert normalized.events == []
    assert normalized.delivery_id == "98880550-7158-44d4-b7cd-2c97c8a091b5"


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"id": 1,}'])
def test_malformed_json_is_a_400(body: bytes) -> None:
    with pytest.raises(InvalidPayload) as raised:
        deliver("orders/create", body)
    assert raised.value.status == 400
    assert raised.value.field == "body"


def test_json_that_is_not_an_object_is_a_422() -> None:
    with pytest.raises(InvalidPayload) as raised:
        deliver("orders/create", b"[]")
    assert raised.value.status == 422


def test_missing_topic_header_is_a_400() -> None:
    body = sample("orders_create")
    received = headers("orders/create", body)
    del received["X-Shopify-Topic"]
    with pytest.raises(InvalidPayload) as raised:
        ADAPTER.normalize(body, received, SHOP)
    assert (raised.value.field, raised.value.status) == ("X-Shopify-Topic", 400)


@pytest.mark.parametrize(
    ("topic", "name", "drop", "field"),
    [
        ("orders/create", "orders_create", "id", "id"),
        ("orders/paid", "orders_create", "total_price", "total_price"),
        ("fulfillments/create", "fulfillments_create", "order_id", "order_id"),
        (
            "fulfillment_events/create",
            "fulfillment_events_create",
            "fulfillment_id",
            "fulfillment_id",
        ),
        ("refunds/create", "refunds_create", "order_id", "order_id"),
        ("checkouts/create", "checkouts_create", "token", "token"),
    ],
)
def test_missing_required_field_names_its_path(
    topic: str, name: str, drop: str, field: str
) -> None:
    def without(payload: dict[str, Any]) -> None:
        del payload[drop]

    with pytest.raises(InvalidPayload) as raised:
        deliver(topic, variant(name, without))
    assert raised.value.field == field
    assert raised.value.status == 422


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("total_price", "abc", "total_price"),
        ("total_price", None, "total_price"),
        ("created_at", "yesterday", "created_at"),
    ],
)
def test_unreadable_values_are_rejected_with_their_path(field: str, value: Any, path: str) -> None:
    def broken(order: dict[str, Any]) -> None:
        order[field] = value

    with pytest.raises(InvalidPayload) as raised:
        deliver("orders/create", variant("orders_create", broken))
    assert raised.value.field == path


def test_a_bad_line_price_names_the_line() -> None:
    def broken(order: dict[str, Any]) -> None:
        order["line_items"][2]["price"] = "twenty"

    with pytest.raises(InvalidPayload) as raised:
        deliver("orders/create", variant("orders_create", broken))
    assert raised.value.field == "line_items[2].price"

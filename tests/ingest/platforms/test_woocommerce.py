"""WooCommerce webhooks: HMAC over the raw body, the ping, and the REST API's order examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.ingest.platforms.base import InvalidPayload, PlatformAdapter, ShopContext
from services.ingest.platforms.woocommerce import WooCommerceAdapter
from tests.ingest.platforms.senders import Sender, hmac_sha256_base64

SAMPLES = Path(__file__).parent / "samples" / "woocommerce"
SHOP = ShopContext(shop_id="acme-tea", currency="CNY", timezone="Asia/Shanghai")
SECRET = "wc-secret-current"
OLD_SECRET = "wc-secret-rotated-out"
ADAPTER = WooCommerceAdapter()
PING = b"webhook_id=42"


def sample(name: str) -> bytes:
    return (SAMPLES / f"{name}.json").read_bytes()


def encode(order: dict[str, Any]) -> bytes:
    """As WooCommerce's wp_json_encode sends it: compact, slashes escaped."""
    return json.dumps(order, separators=(",", ":")).replace("/", "\\/").encode()


def registered_order() -> dict[str, Any]:
    """Order 723 of the "List all orders" example: registered customer, two refunds."""
    order: dict[str, Any] = json.loads(sample("orders_list"))[1]
    return order


def updated(**fields: Any) -> bytes:
    order = json.loads(sample("order_updated"))
    order.update(fields)
    return encode(order)


def headers(topic: str, body: bytes, secret: str = SECRET) -> dict[str, str]:
    resource, event = topic.split(".")
    return {
        "Content-Type": "application/json",
        "User-Agent": "WooCommerce/8.6.1 Hookshot (WordPress/6.4.3)",
        "X-WC-Webhook-Source": "https://example.com/",
        "X-WC-Webhook-Topic": topic,
        "X-WC-Webhook-Resource": resource,
        "X-WC-Webhook-Event": event,
        "X-WC-Webhook-Signature": hmac_sha256_base64(body, secret),
        "X-WC-Webhook-ID": "42",
        "X-WC-Webhook-Delivery-ID": "9c1f7c6b1d2e4a3f8e5d6c7b8a9f0e1d",
    }


SENDER = Sender(ADAPTER, SHOP, SECRET, headers)
deliver = SENDER.deliver
only = SENDER.only


def test_adapter_fulfils_the_platform_contract() -> None:
    adapter: PlatformAdapter = ADAPTER
    assert adapter.name == "woocommerce"


@pytest.mark.parametrize("name", ["order_created", "order_updated", "orders_list"])
def test_each_sample_signed_by_woocommerce_verifies(name: str) -> None:
    body = sample(name)
    assert ADAPTER.verify(body, headers("order.updated", body), [SECRET])


def test_any_current_secret_verifies_during_rotation() -> None:
    body = sample("order_created")
    rotating = [OLD_SECRET, SECRET]
    assert ADAPTER.verify(body, headers("order.created", body, OLD_SECRET), rotating)
    assert ADAPTER.verify(body, headers("order.created", body, SECRET), rotating)
    assert not ADAPTER.verify(body, headers("order.created", body, "other"), rotating)


def test_wrong_secret_tampered_body_or_missing_signature_fail_verification() -> None:
    body = sample("order_created")
    signed = headers("order.created", body)
    unsigned = {k: v for k, v in signed.items() if k != "X-WC-Webhook-Signature"}
    assert not ADAPTER.verify(body, headers("order.created", body, OLD_SECRET), [SECRET])
    assert not ADAPTER.verify(body.replace(b"29.35", b"2.35"), signed, [SECRET])
    assert not ADAPTER.verify(body, unsigned, [SECRET])
    assert not ADAPTER.verify(body, signed, [])


def test_the_ping_on_saving_a_webhook_is_accepted_with_no_events() -> None:
    ping_headers = {
        "User-Agent": "WooCommerce/8.6.1 Hookshot (WordPress/6.4.3)",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    assert ADAPTER.verify(PING, ping_headers, [SECRET])
    normalized = ADAPTER.normalize(PING, ping_headers, SHOP)
    assert normalized.topic == "ping"
    assert normalized.events == []


def test_only_an_exact_unsigned_ping_skips_the_signature() -> None:
    assert not ADAPTER.verify(b"webhook_id=42&x=1", {}, [SECRET])
    assert not ADAPTER.verify(b'{"webhook_id": 42}', {}, [SECRET])
    assert not ADAPTER.verify(PING, {"X-WC-Webhook-Topic": "order.created"}, [SECRET])
    assert not ADAPTER.verify(
        PING, {"X-WC-Webhook-Signature": hmac_sha256_base64(PING, "other")}, [SECRET]
    )


def test_order_created_sample_paid_at_checkout_is_created_then_paid() -> None:
    normalized = deliver("order.created", sample("order_created"))
    assert normalized.topic == "order.created"
    assert normalized.delivery_id == "9c1f7c6b1d2e4a3f8e5d6c7b8a9f0e1d"
    created, paid = normalized.events
    assert created.type == "order.created"
    assert paid.type == "order.paid"
    assert created.id == "woocommerce:acme-tea:727:order.created:20170322T192808Z"
    assert paid.id == "woocommerce:acme-tea:727:order.paid:20170322T192808Z"
    assert created.source == "woocommerce/acme-tea"
    assert created.time.isoformat() == "2017-03-22T19:28:02+00:00"
    assert paid.time.isoformat() == "2017-03-22T19:28:08+00:00"
    # A guest (customer_id 0) whose phone "(555) 555-5555" is no valid number.
    assert paid.subject == "john.doe@example.com"
    data = paid.data
    assert data["order_id"] == "727"
    assert data["status"] == "paid"
    assert data["customer"] == {"name": "John Doe", "email": "john.doe@example.com"}
    assert data["total"] == {"amount_minor": 2935, "currency": "USD"}
    assert data["items"] == [
        {
            "title": "Woo Single #1",
            "quantity": 2,
            "price": {"amount_minor": 300, "currency": "USD"},
        },
        {
            "sku": "Bar3",
            "title": "Ship Your Idea – Color: Black, Size: M Test",
            "quantity": 1,
            "price": {"amount_minor": 1200, "currency": "USD"},
        },
    ]
    assert data["shipping"] == {"country": "US", "province": "CA", "city": "San Francisco"}
    assert data["created_at"] == "2017-03-22T19:28:02Z"
    assert data["paid_at"] == "2017-03-22T19:28:08Z"


def test_order_updated_sample_is_completed() -> None:
    event = only("order.updated", sample("order_updated"))
    assert event.type == "order.completed"
    assert event.id == "woocommerce:acme-tea:727:order.completed:20170322T193035Z"
    assert event.data["status"] == "completed"
    assert event.data["completed_at"] == "2017-03-22T19:30:35Z"
    assert event.time.isoformat() == "2017-03-22T19:30:35+00:00"


def test_registered_customer_and_each_refund_with_its_amount() -> None:
    events = deliver("order.updated", encode(registered_order())).events
    assert [event.type for event in events] == [
        "order.completed",
        "order.refunded",
        "order.refunded",
    ]
    completed, first, second = events
    assert completed.subject == "26"
    assert completed.data["customer"] == {
        "id": "26",
        "name": "João Silva",
        "email": "joao.silva@example.com",
    }
    assert completed.data["shipping"] == {
        "country": "BR",
        "province": "RJ",
        "city": "Rio de Janeiro",
    }
    assert first.id == "woocommerce:acme-tea:723:order.refunded:refund-726"
    assert first.data["refund"] == {"amount_minor": 1000, "currency": "USD"}
    assert second.id == "woocommerce:acme-tea:723:order.refunded:refund-724"
    assert second.data["refund"] == {"amount_minor": 900, "currency": "USD"}
    assert first.data["total"] == {"amount_minor": 3900, "currency": "USD"}


@pytest.mark.parametrize(
    ("status", "event_type"),
    [
        ("pending", "order.created"),
        ("on-hold", "order.created"),
        ("failed", "order.created"),
        ("processing", "order.paid"),
        ("completed", "order.completed"),
        ("cancelled", "order.cancelled"),
        ("refunded", "order.refunded"),
    ],
)
def test_order_status_maps_to_its_canonical_event(status: str, event_type: str) -> None:
    event = only("order.updated", updated(status=status))
    assert event.type == event_type
    assert event.data["status"] == event_type.removeprefix("order.")
    if event_type in ("order.cancelled", "order.refunded"):
        assert event.data[f"{event.data['status']}_at"] == "2017-03-22T19:30:35Z"
    if event_type == "order.refunded":
        assert "refund" not in event.data


@pytest.mark.parametrize("status", ["trash", "checkout-draft", "shipped-by-plugin"])
def test_other_statuses_yield_no_events(status: str) -> None:
    assert deliver("order.updated", updated(status=status)).events == []


def test_a_pending_order_created_is_one_order_created() -> None:
    assert only("order.created", updated(status="pending")).type == "order.created"


def test_a_refunded_order_with_refunds_is_its_refunds() -> None:
    order = registered_order()
    order["status"] = "refunded"
    events = deliver("order.updated", encode(order)).events
    assert [event.id.rsplit(":", 1)[1] for event in events] == ["refund-726", "refund-724"]


def test_redelivery_repeats_ids_and_refunds_keep_theirs_across_updates() -> None:
    body = encode(registered_order())
    first = [event.id for event in deliver("order.updated", body).events]
    assert first == [event.id for event in deliver("order.updated", body).events]
    later = registered_order()
    later["date_modified_gmt"] = "2017-03-23T08:00:00"
    ids = [event.id for event in deliver("order.updated", encode(later)).events]
    assert ids[0] != first[0]
    assert ids[1:] == first[1:]


def test_money_follows_the_order_currency() -> None:
    event = only("order.updated", updated(currency="JPY", total="2935", line_items=[]))
    assert event.data["total"] == {"amount_minor": 2935, "currency": "JPY"}
    with pytest.raises(InvalidPayload) as raised:
        deliver("order.updated", updated(currency="JPY", total="29.35"))
    assert raised.value.field == "total"


def test_a_valid_billing_phone_is_normalised() -> None:
    order = json.loads(sample("order_updated"))
    order["billing"].update(phone="138 0013 8000", country="CN")
    event = only("order.updated", encode(order))
    assert event.data["customer"]["phone"] == "+8613800138000"


def test_site_local_times_are_read_in_the_shop_timezone_without_gmt_fields() -> None:
    order = json.loads(sample("order_updated"))
    for field in ("date_created", "date_modified", "date_paid", "date_completed"):
        order[f"{field}_gmt"] = None
    order["date_modified"] = "2017-03-22T16:30:35"
    event = only("order.updated", encode(order))
    assert event.time.isoformat() == "2017-03-22T08:30:35+00:00"


@pytest.mark.parametrize("topic", ["product.updated", "customer.created", "order.deleted"])
def test_an_unused_topic_yields_no_events(topic: str) -> None:
    normalized = deliver(topic, sample("order_updated"))
    assert normalized.topic == topic
    assert normalized.events == []
    assert normalized.delivery_id == "9c1f7c6b1d2e4a3f8e5d6c7b8a9f0e1d"


@pytest.mark.parametrize("body", [b"", b"{", b"webhook_id=42", b"<html></html>"])
def test_malformed_json_is_a_400(body: bytes) -> None:
    with pytest.raises(InvalidPayload) as raised:
        deliver("order.created", body)
    assert (raised.value.field, raised.value.status) == ("body", 400)


def test_missing_topic_header_on_a_signed_delivery_is_a_400() -> None:
    body = sample("order_created")
    received = headers("order.created", body)
    del received["X-WC-Webhook-Topic"]
    assert ADAPTER.verify(body, received, [SECRET])
    with pytest.raises(InvalidPayload) as raised:
        ADAPTER.normalize(body, received, SHOP)
    assert (raised.value.field, raised.value.status) == ("X-WC-Webhook-Topic", 400)


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("id", None, "id"),
        ("total", None, "total"),
        ("total", "a lot", "total"),
        ("date_modified_gmt", "last tuesday", "date_modified_gmt"),
    ],
)
def test_missing_or_unreadable_fields_name_their_path(field: str, value: Any, path: str) -> None:
    with pytest.raises(InvalidPayload) as raised:
        deliver("order.updated", updated(**{field: value}))
    assert raised.value.field == path
    assert raised.value.status == 422

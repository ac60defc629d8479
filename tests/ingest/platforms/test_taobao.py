"""Taobao TMC adapter: TOP SPI signature and normalisation of trade and refund messages."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from services.ingest.platforms.base import InvalidPayload, PlatformAdapter, ShopContext
from services.ingest.platforms.taobao import TaobaoAdapter

SAMPLES = Path(__file__).parent / "samples" / "taobao"
SHOP = ShopContext(shop_id="acme-tea", currency="CNY", timezone="Asia/Shanghai")
SECRET = "sandbox9e3c1e8c65b37da4d0237a953"
SENT_AT = "2024-11-11 08:00:00"  # GMT+8
NOW = datetime(2024, 11, 11, 0, 1, tzinfo=UTC)  # one minute after SENT_AT


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def spi_sign(params: dict[str, str], body: bytes, secret: str) -> str:
    """The platform's rule, written out: MD5(secret + sorted k+v + body + secret), upper hex."""
    text = secret
    for name in sorted(params):
        text += name + params[name]
    text += body.decode() + secret
    return hashlib.md5(text.encode()).hexdigest().upper()


def signed_headers(body: bytes, secret: str = SECRET, timestamp: str = SENT_AT) -> dict[str, str]:
    params = {"app_key": "12499723", "timestamp": timestamp}
    return {
        "Content-Type": "application/json;charset=UTF-8",
        "top-sign-list": "app_key,timestamp",
        "app_key": "12499723",
        "timestamp": timestamp,
        "sign": spi_sign(params, body, secret),
    }


@pytest.fixture
def adapter() -> TaobaoAdapter:
    return TaobaoAdapter(clock=lambda: NOW)


def normalize_one(adapter: TaobaoAdapter, body: bytes):
    result = adapter.normalize(body, signed_headers(body), SHOP)
    assert len(result.events) == 1
    return result.events[0]


def with_content(name: str, **changes: object) -> bytes:
    message = orjson.loads(sample(name))
    content = orjson.loads(message["content"])
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    message["content"] = orjson.dumps(content).decode()
    return orjson.dumps(message)


def test_adapter_fulfils_the_platform_contract(adapter: TaobaoAdapter) -> None:
    checked: PlatformAdapter = adapter
    assert checked.name == "taobao"


# --- signature -------------------------------------------------------------------------------


def test_signed_delivery_verifies(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    assert adapter.verify(body, signed_headers(body), [SECRET])


def test_any_of_several_secrets_verifies(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    headers = signed_headers(body, secret="new-secret")
    assert adapter.verify(body, headers, ["old-secret", "new-secret"])
    assert not adapter.verify(body, headers, ["old-secret", SECRET])


def test_wrong_signature_fails(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    headers = signed_headers(body, secret="someone-else")
    assert not adapter.verify(body, headers, [SECRET])


def test_missing_signature_fails(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    headers = signed_headers(body)
    del headers["sign"]
    assert not adapter.verify(body, headers, [SECRET])


def test_lower_case_hex_signature_fails_like_the_sdk(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    headers = signed_headers(body)
    headers["sign"] = headers["sign"].lower()
    assert not adapter.verify(body, headers, [SECRET])


def test_tampered_body_fails(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    headers = signed_headers(body)
    assert not adapter.verify(body.replace(b"200.07", b"0.07"), headers, [SECRET])


def test_tampered_signed_header_fails(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    headers = signed_headers(body)
    headers["app_key"] = "99999999"
    assert not adapter.verify(body, headers, [SECRET])


def test_timestamp_must_be_signed(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    headers = {
        "content-type": "application/json",
        "timestamp": SENT_AT,
        "top-sign-list": "",
        "sign": spi_sign({}, body, SECRET),
    }
    assert not adapter.verify(body, headers, [SECRET])


def test_stale_or_future_timestamp_fails(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    for sent in ("2024-11-11 07:54:59", "2024-11-11 08:06:01"):
        assert not adapter.verify(body, signed_headers(body, timestamp=sent), [SECRET])
    assert adapter.verify(body, signed_headers(body, timestamp="2024-11-11 07:56:00"), [SECRET])


def test_url_encoded_header_values_are_decoded_before_signing(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    headers = signed_headers(body)
    headers["timestamp"] = "2024-11-11+08%3A00%3A00"
    assert adapter.verify(body, headers, [SECRET])


def test_header_names_are_case_insensitive(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    headers = {key.title(): value for key, value in signed_headers(body).items()}
    assert adapter.verify(body, headers, [SECRET])


def test_empty_secret_never_verifies(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    assert not adapter.verify(body, signed_headers(body, secret=""), [""])


# --- normalisation ---------------------------------------------------------------------------


def test_trade_create_from_the_sdk_example_becomes_order_created(adapter: TaobaoAdapter) -> None:
    event = normalize_one(adapter, sample("trade_create.json"))
    assert event.type == "order.created"
    assert event.id == "taobao:acme-tea:192364827791084:order.created"
    assert event.source == "taobao/acme-tea"
    assert event.shop_id == "acme-tea"
    assert event.subject == "sandbox_cilai_c"
    assert event.time == datetime(2024, 11, 10, 16, 0, 5, tzinfo=UTC)
    assert event.data == {
        "order_id": "192364827791084",
        "customer": {"id": "sandbox_cilai_c", "name": "sandbox_cilai_c"},
        "status": "created",
        "total": {"amount_minor": 12000, "currency": "CNY"},
        "items": [],
        "created_at": "2024-11-10T16:00:05Z",
    }


def test_buyer_pay_is_order_paid_of_the_open_uid_keyed_by_trade(adapter: TaobaoAdapter) -> None:
    event = normalize_one(adapter, sample("trade_buyer_pay.json"))
    assert event.type == "order.paid"
    assert event.subject == "AAHk5d-EAAeGwJedwSFu0XXX"
    assert event.data["customer"] == {"id": "AAHk5d-EAAeGwJedwSFu0XXX"}
    assert event.data["status"] == "paid"
    assert event.data["total"] == {"amount_minor": 20007, "currency": "CNY"}
    assert event.data["paid_at"] == "2024-11-10T16:01:10Z"
    assert event.key == "acme-tea:order:2231958349"


@pytest.mark.parametrize(
    ("name", "event_type", "time_field", "at"),
    [
        ("trade_seller_ship.json", "order.shipped", "shipped_at", "2024-11-12T01:30:00Z"),
        ("trade_success.json", "order.completed", "completed_at", "2024-11-15T10:02:44Z"),
        ("trade_close.json", "order.cancelled", "cancelled_at", "2024-11-10T17:00:07Z"),
    ],
)
def test_trade_transitions_map_to_order_events(
    adapter: TaobaoAdapter, name: str, event_type: str, time_field: str, at: str
) -> None:
    event = normalize_one(adapter, sample(name))
    assert event.type == event_type
    assert event.data["status"] == event_type.removeprefix("order.")
    assert event.data[time_field] == at
    assert event.data["total"]["currency"] == "CNY"


def test_whole_trade_close_by_either_topic_gives_one_event_id(adapter: TaobaoAdapter) -> None:
    closed = normalize_one(adapter, sample("trade_close.json"))
    also_closed = normalize_one(adapter, sample("trade_close_and_modify_detail_order.json"))
    assert also_closed.type == "order.cancelled"
    assert also_closed.id == closed.id == "taobao:acme-tea:2231958350:order.cancelled"
    assert also_closed.data["total"] == {"amount_minor": 5900, "currency": "CNY"}


def test_sub_order_change_without_trade_close_gives_no_event(adapter: TaobaoAdapter) -> None:
    body = with_content("trade_close_and_modify_detail_order.json", status="WAIT_BUYER_PAY")
    result = adapter.normalize(body, signed_headers(body), SHOP)
    assert result.topic == "taobao_trade_TradeCloseAndModifyDetailOrder"
    assert result.events == []


def test_refund_success_becomes_order_refunded(adapter: TaobaoAdapter) -> None:
    event = normalize_one(adapter, sample("refund_success.json"))
    assert event.type == "order.refunded"
    assert event.id == "taobao:acme-tea:2231958349:order.refunded:60123456789012345"
    assert event.subject == "AAHk5d-EAAeGwJedwSFu0XXX"
    assert event.time == datetime(2024, 11, 17, 6, 17, 15, tzinfo=UTC)
    assert event.data["status"] == "refunded"
    assert event.data["refund"] == {"amount_minor": 5000, "currency": "CNY"}
    assert event.data["refunded_at"] == "2024-11-17T06:17:15Z"
    # Refund messages carry no order total: it is left out, never a stand-in.
    assert "total" not in event.data


def test_refund_enriched_with_the_order_payment_carries_the_total(adapter: TaobaoAdapter) -> None:
    event = normalize_one(adapter, with_content("refund_success.json", payment="120.00"))
    assert event.data["total"] == {"amount_minor": 12000, "currency": "CNY"}
    assert event.data["refund"] == {"amount_minor": 5000, "currency": "CNY"}


def test_refund_request_gives_no_event(adapter: TaobaoAdapter) -> None:
    body = sample("refund_created.json")
    result = adapter.normalize(body, signed_headers(body), SHOP)
    assert result.topic == "taobao_refund_RefundCreated"
    assert result.events == []
    assert result.delivery_id == "7104300007405430007"


def test_unused_topic_from_the_sdk_fixture_gives_no_event(adapter: TaobaoAdapter) -> None:
    body = sample("item_stock_changed.json")
    assert adapter.verify(body, signed_headers(body), [SECRET])
    result = adapter.normalize(body, signed_headers(body), SHOP)
    assert result.topic == "taobao_item_ItemStockChanged"
    assert result.events == []
    assert result.delivery_id == "7104300007405429232"


def test_redelivery_gives_the_same_event(adapter: TaobaoAdapter) -> None:
    body = sample("trade_buyer_pay.json")
    first = normalize_one(adapter, body)
    again = TaobaoAdapter(clock=lambda: NOW + timedelta(minutes=3)).normalize(
        body, signed_headers(body, timestamp="2024-11-11 08:03:00"), SHOP
    )
    assert again.events == [first]
    assert again.delivery_id == "7104300007405430002"


def test_amounts_are_exact_fen(adapter: TaobaoAdapter) -> None:
    for payment, fen in (("0.01", 1), ("19.9", 1990), ("1000", 100000), ("0", 0)):
        body = with_content("trade_buyer_pay.json", payment=payment)
        assert normalize_one(adapter, body).data["total"]["amount_minor"] == fen


def test_content_may_arrive_already_parsed(adapter: TaobaoAdapter) -> None:
    message = orjson.loads(sample("trade_buyer_pay.json"))
    message["content"] = orjson.loads(message["content"])
    event = normalize_one(adapter, orjson.dumps(message))
    assert event.data["total"]["amount_minor"] == 20007


# --- unreadable deliveries -------------------------------------------------------------------


def invalid(adapter: TaobaoAdapter, body: bytes) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as caught:
        adapter.normalize(body, signed_headers(body), SHOP)
    return caught.value


def test_malformed_json_is_a_400(adapter: TaobaoAdapter) -> None:
    error = invalid(adapter, b'{"topic": "taobao_trade_TradeCreate", ')
    assert error.status == 400
    assert error.field == "body"


def test_malformed_content_json_is_a_400(adapter: TaobaoAdapter) -> None:
    message = orjson.loads(sample("trade_buyer_pay.json"))
    message["content"] = '{"tid": 1,'
    error = invalid(adapter, orjson.dumps(message))
    assert (error.field, error.status) == ("content", 400)


def test_body_that_is_not_an_object_is_invalid(adapter: TaobaoAdapter) -> None:
    assert invalid(adapter, b"[1, 2]").field == "body"


@pytest.mark.parametrize("field", ["tid", "payment"])
def test_missing_trade_fields_are_named(adapter: TaobaoAdapter, field: str) -> None:
    error = invalid(adapter, with_content("trade_buyer_pay.json", **{field: None}))
    assert error.field == field
    assert error.status == 422


@pytest.mark.parametrize("field", ["refund_id", "refund_fee"])
def test_missing_refund_fields_are_named(adapter: TaobaoAdapter, field: str) -> None:
    assert invalid(adapter, with_content("refund_success.json", **{field: None})).field == field


def test_missing_topic_is_named(adapter: TaobaoAdapter) -> None:
    message = orjson.loads(sample("trade_buyer_pay.json"))
    del message["topic"]
    assert invalid(adapter, orjson.dumps(message)).field == "topic"


def test_missing_content_is_named(adapter: TaobaoAdapter) -> None:
    message = orjson.loads(sample("trade_buyer_pay.json"))
    del message["content"]
    assert invalid(adapter, orjson.dumps(message)).field == "content"


def test_missing_pub_time_is_named(adapter: TaobaoAdapter) -> None:
    message = orjson.loads(sample("trade_buyer_pay.json"))
    del message["pub_time"]
    assert invalid(adapter, orjson.dumps(message)).field == "pub_time"


def test_masked_nick_without_open_uid_identifies_nobody(adapter: TaobaoAdapter) -> None:
    body = with_content("trade_buyer_pay.json", buyer_open_uid=None)
    assert invalid(adapter, body).field == "buyer_open_uid"


@pytest.mark.parametrize("payment", ["12.345", "-1.00", "1,000.00", "abc", 12.5, True])
def test_amount_that_is_not_yuan_is_invalid(adapter: TaobaoAdapter, payment: object) -> None:
    assert (
        invalid(adapter, with_content("trade_buyer_pay.json", payment=payment)).field == "payment"
    )


def test_badly_formatted_time_is_invalid(adapter: TaobaoAdapter) -> None:
    message = orjson.loads(sample("trade_buyer_pay.json"))
    message["pub_time"] = "2024-11-11T00:01:10Z"
    assert invalid(adapter, orjson.dumps(message)).field == "pub_time"


def test_schema_violation_names_the_canonical_field(adapter: TaobaoAdapter) -> None:
    body = with_content("trade_buyer_pay.json", buyer_open_uid="A" * 201)
    assert invalid(adapter, body).field == "data.customer.id"

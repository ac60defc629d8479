"""Whatever ingest accepts, lifecycle can apply (issue 16).

Amounts, times, counts and text lengths are bounded once, in the canonical schemas
(`libs.common.events`); everything beyond them is refused at the edge with a 422 naming
the field (401 for a malformed signature), never a 500 and never a 2xx followed by a
dead letter. Each test posts through the running platform (both modes: SQLite and
PostgreSQL) and checks that nothing was published; the schema↔column comparison is by
introspection, with the field → column mapping written out below.
"""

from __future__ import annotations

import asyncio
import types
import typing
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from pydantic import BaseModel, ValidationError
from sqlalchemy import BigInteger, Integer, Table

from libs.common.db.tables import processed_events
from libs.common.events import (
    MAX_AMOUNT_MINOR,
    MAX_ITEMS,
    MAX_QUANTITY,
    Address,
    BehaviorData,
    Checkpoint,
    Customer,
    Envelope,
    LogisticsData,
    LogisticsExceptionData,
    OrderData,
    OrderItem,
    parse_event,
)
from services.ingest import models as ingest_models
from services.ingest.signing import sign
from services.lifecycle import models as lifecycle_models
from tests.ingest import signers
from tests.ingest.test_webhooks import SECRETS, new_shop
from tests.platform import Platform, until

NOW = "2026-11-11T00:03:10Z"


def order_event(shop: str, **changes: Any) -> dict[str, Any]:
    """A valid `order.paid` in CNY; `data` keys in `changes` are merged into its data."""
    data: dict[str, Any] = {
        "order_id": f"o-{uuid.uuid4().hex[:8]}",
        "status": "paid",
        "customer": {"id": f"c-{uuid.uuid4().hex[:8]}", "name": "王芳"},
        "total": {"amount_minor": 25900, "currency": "CNY"},
        "items": [
            {"sku": "LJ-250", "quantity": 1, "price": {"amount_minor": 25900, "currency": "CNY"}}
        ],
        "created_at": "2026-11-11T00:00:05Z",
    }
    data.update(changes.pop("data", {}))
    return {
        "specversion": "1.0",
        "id": f"evt-{uuid.uuid4().hex}",
        "source": f"erp/{shop}",
        "type": "order.paid",
        "time": NOW,
        "shop_id": shop,
        "data": data,
        **changes,
    }


async def published(platform: Platform) -> float:
    """Events ingest has published so far (`huitou_ingest_events_total`, every label)."""
    async with httpx.AsyncClient() as client:
        r = await client.get(platform.service_url("ingest", "/metrics"))
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in r.text.splitlines()
        if line.startswith("huitou_ingest_events_total{")
    )


async def nothing_arrives(platform: Platform, shop: str, key: str) -> None:
    """A sentinel event posted after the refused ones is applied, and no other customer is."""
    sentinel = order_event(shop, data={"customer": {"id": "sentinel"}, "items": []})
    del sentinel["data"]["total"]  # whatever the shop's currency
    r = await platform.request("POST", "/v1/events", key=key, json=sentinel)
    assert r.status_code == 202, r.text

    async def applied() -> bool:
        r = await platform.request("GET", "/v1/customers/sentinel", key=key)
        return r.status_code == 200

    await until(applied)
    await asyncio.sleep(0.5)
    listed = (await platform.request("GET", "/v1/customers", key=key)).json()["items"]
    assert [c["customer_id"] for c in listed] == ["sentinel"]


async def refused(platform: Platform, key: str, body: Any, status: int = 422) -> list[str]:
    """POST /v1/events, expect `status` as a problem, return the fields it names."""
    r = await platform.request(
        "POST",
        "/v1/events",
        key=key,
        content=orjson.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json", r.text
    return [e["field"] for e in r.json().get("errors", [])]


# --- 1, 2, 4: amounts, times and NUL in canonical events ---------------------------------


async def test_canonical_events_out_of_bounds_are_refused_naming_the_field(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    before = await published(platform)
    money = {"currency": "CNY"}
    cases: list[tuple[dict[str, Any], str]] = [
        (order_event(shop, data={"total": {**money, "amount_minor": 2**63}}), "total"),
        (
            order_event(shop, data={"total": {**money, "amount_minor": MAX_AMOUNT_MINOR + 1}}),
            "total",
        ),
        (order_event(shop, data={"total": {**money, "amount_minor": -1}}), "total"),
        (order_event(shop, data={"refund": {**money, "amount_minor": -500}}), "refund"),
        (order_event(shop, data={"items": [{"quantity": MAX_QUANTITY + 1}]}), "items.0"),
        (order_event(shop, data={"items": [{"quantity": 1}] * (MAX_ITEMS + 1)}), "items"),
        (order_event(shop, time="9999-06-01T00:00:00Z"), "time"),
        (order_event(shop, time="9999-06-01T00:00:00+08:00"), "time"),
        (order_event(shop, time="9999-12-31T23:59:59-05:00"), "time"),
        (order_event(shop, time="0001-01-01T00:00:00+08:00"), "time"),
        (order_event(shop, time="1969-12-31T23:59:59Z"), "time"),
        (order_event(shop, data={"created_at": "9999-12-31T23:59:59-05:00"}), "created_at"),
        (order_event(shop, data={"paid_at": "0001-01-01T00:00:00+08:00"}), "paid_at"),
        (order_event(shop, data={"customer": {"id": "c-nul", "name": "王\x00芳"}}), "name"),
        (order_event(shop, id="evt-\x00-1"), "id"),
        (order_event(shop, subject="c\x00"), "subject"),
    ]
    named = {
        "total": "data.total.amount_minor",
        "refund": "data.refund.amount_minor",
        "items.0": "data.items.0.quantity",
        "items": "data.items",
        "created_at": "data.created_at",
        "paid_at": "data.paid_at",
        "name": "data.customer.name",
    }
    for body, field in cases:
        assert await refused(platform, key, body) == [named.get(field, field)], body
    # A batch is refused whole, naming the event of the batch.
    batch = [order_event(shop), order_event(shop, data={"paid_at": "9999-12-31T23:59:59-05:00"})]
    assert await refused(platform, key, batch) == ["[1].data.paid_at"]
    # The same bounds for logistics and behavior events (the generic carrier route too).
    logistics = {
        **order_event(shop, type="logistics.in_transit"),
        "data": {
            "tracking_number": "YT1",
            "carrier": "yuantong",
            "status": "in_transit",
            "checkpoint": {"time": "0001-01-01T00:00:00+08:00", "city": "杭州\x00市"},
        },
    }
    assert set(await refused(platform, key, logistics)) == {
        "data.checkpoint.time",
        "data.checkpoint.city",
    }
    behavior = {
        **order_event(shop, type="cart.added"),
        "data": {
            "customer": {"id": "c-cart"},
            "sku": "LJ-250",
            "price": {"amount_minor": -1, "currency": "CNY"},
        },
    }
    assert await refused(platform, key, behavior) == ["data.price.amount_minor"]
    raw = orjson.dumps(logistics)
    signed = {
        "X-Huitou-Signature": sign(raw, SECRETS["huitou"]),
        "Content-Type": "application/json",
    }
    r = await platform.request("POST", f"/v1/logistics/generic/{shop}", content=raw, headers=signed)
    assert r.status_code == 422, r.text
    assert await published(platform) == before
    await nothing_arrives(platform, shop, key)


def test_every_text_field_of_the_canonical_schemas_refuses_nul() -> None:
    """Found by walking the models, so a text field added later is held to it too."""
    minimal: dict[type[BaseModel], dict[str, Any]] = {
        Customer: {},
        Address: {},
        OrderItem: {},
        Checkpoint: {},
        OrderData: {"order_id": "1", "customer": {}, "status": "paid"},
        LogisticsData: {"tracking_number": "T", "carrier": "c", "status": "in_transit"},
        LogisticsExceptionData: {
            "tracking_number": "T",
            "carrier": "c",
            "status": "exception",
            "reason": "r",
        },
        BehaviorData: {"customer": {}},
        Envelope: {
            "id": "e",
            "source": "s",
            "type": "order.paid",
            "time": NOW,
            "shop_id": "s",
            "data": {},
        },
    }
    checked = []
    for model, base in minimal.items():
        model.model_validate(base)
        for name, field in model.model_fields.items():
            if not _holds_text(field.annotation):
                continue
            value = "a\x00b@example.com" if name == "email" else "a\x00b"
            with pytest.raises(ValidationError) as caught:
                model.model_validate({**base, name: value})
            assert caught.value.errors()[0]["loc"][0] == name
            checked.append(f"{model.__name__}.{name}")
    assert len(checked) >= 30, checked


def _holds_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (
        typing.Union,
        typing.Annotated,
    ):
        return any(_holds_text(arg) for arg in typing.get_args(annotation))
    return False


# --- 2: platform payloads out of range: 422, never 500 -----------------------------------


def _shopify(order: dict[str, Any], topic: str = "orders/create") -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(order)
    return body, signers.shopify(body, SECRETS["shopify"], topic, uuid.uuid4().hex)


def _woo(order: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(order)
    return body, signers.woocommerce(body, SECRETS["woocommerce"], "order.updated", "d-1")


def _taobao(message: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(message)
    return body, signers.taobao(body, SECRETS["taobao"])


def _kuaidi100(param: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    return signers.kuaidi100(orjson.dumps(param).decode(), SECRETS["kuaidi100"])


def _aftership(payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(payload)
    return body, signers.aftership(body, SECRETS["aftership"])


async def test_platform_payloads_out_of_range_are_refused_and_emit_nothing(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform, currency="USD")
    shopify = orjson.loads(signers.sample("shopify/orders_create.json"))
    woo = orjson.loads(signers.sample("woocommerce/order_created.json"))
    taobao = orjson.loads(signers.sample("taobao/trade_buyer_pay.json"))
    kuaidi = orjson.loads(signers.sample("kuaidi100/push_param_yt6186594166532.json"))
    aftership = orjson.loads(signers.sample("aftership/tracking_update_usps_arrival_adapted.json"))

    def kuaidi_at(ftime: str) -> dict[str, Any]:
        result = dict(kuaidi["lastResult"])
        result["data"] = [{**result["data"][0], "ftime": ftime, "time": ftime}]
        return {**kuaidi, "lastResult": result}

    def aftership_at(when: str) -> dict[str, Any]:
        msg = dict(aftership["msg"])
        msg["checkpoints"] = [{**point, "checkpoint_time": when} for point in msg["checkpoints"]]
        return {**aftership, "msg": msg}

    deliveries: list[tuple[str, tuple[bytes, dict[str, str]], str]] = [
        ("webhooks/shopify", _shopify({**shopify, "total_price": "1e30"}), "total_price"),
        ("webhooks/shopify", _shopify({**shopify, "total_price": "1e999999999"}), "total_price"),
        ("webhooks/shopify", _shopify({**shopify, "total_price": "-10.00"}), ""),
        ("webhooks/shopify", _shopify({**shopify, "created_at": "9999-06-01T00:00:00Z"}), ""),
        ("webhooks/shopify", _shopify({**shopify, "created_at": "9999-12-31T23:59:59-05:00"}), ""),
        ("webhooks/shopify", _shopify({**shopify, "updated_at": "0001-01-01T00:00:00+08:00"}), ""),
        ("webhooks/woocommerce", _woo({**woo, "total": "1e30"}), "total"),
        ("webhooks/woocommerce", _woo({**woo, "total": 1e30}), "total"),
        ("webhooks/woocommerce", _woo({**woo, "date_created_gmt": "9999-06-01T00:00:00"}), ""),
        (
            "webhooks/woocommerce",
            _woo({**woo, "date_created_gmt": "0001-01-01T00:00:00+08:00"}),
            "date_created_gmt",
        ),
        ("webhooks/taobao", _taobao({**taobao, "pub_time": "0001-01-01 00:00:00"}), "pub_time"),
        ("webhooks/taobao", _taobao({**taobao, "pub_time": "9999-12-31 23:59:59"}), "pub_time"),
        ("logistics/kuaidi100", _kuaidi100(kuaidi_at("0001-01-01 00:00:00")), ""),
        ("logistics/kuaidi100", _kuaidi100(kuaidi_at("9999-12-31 23:59:59")), ""),
        ("logistics/aftership", _aftership(aftership_at("9999-12-31T23:59:59-05:00")), ""),
        ("logistics/aftership", _aftership(aftership_at("0001-01-01T00:00:00+08:00")), ""),
    ]
    before = await published(platform)
    for route, (body, headers), field in deliveries:
        r = await platform.request("POST", f"/v1/{route}/{shop}", content=body, headers=headers)
        assert r.status_code == 422, (route, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        if field:
            assert r.json()["errors"][0]["field"] == field, r.text
    assert await published(platform) == before
    await nothing_arrives(platform, shop, key)


# --- 3: malformed X-Huitou-Signature -----------------------------------------------------


async def test_malformed_huitou_signatures_are_401_not_500(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    body = orjson.dumps(order_event(shop))
    good = sign(body, SECRETS["huitou"])
    mac = good.split("v1=", 1)[1]
    before = await published(platform)
    for header in (
        "t=²,v1=00",
        f"t=²,v1={mac}",
        "t=" + "9" * 5000 + ",v1=00",
        "t=" + "1" * 13 + f",v1={mac}",
        f"{good.split(',')[0]},v1=²{mac[1:]}",
        f"{good.split(',')[0]},v1={mac.upper()}",
        "t=-1,v1=00",
        "t=,v1=",
    ):
        r = await platform.request(
            "POST",
            "/v1/events",
            content=body,
            headers={
                # As a server reads them: header bytes are Latin-1 ("²" is one byte).
                "X-Huitou-Signature": header.encode("latin-1"),
                "X-Huitou-Shop": shop,
                "Content-Type": "application/json",
            },
        )
        assert r.status_code == 401, (header[:40], r.status_code, r.text)
    assert await published(platform) == before
    await nothing_arrives(platform, shop, key)


# --- 6: one shop, one currency -----------------------------------------------------------


async def test_money_in_another_currency_than_the_shops_is_refused(platform: Platform) -> None:
    shop, key = await new_shop(platform)  # CNY
    usd = {"amount_minor": 4000, "currency": "USD"}
    before = await published(platform)
    assert await refused(platform, key, order_event(shop, data={"total": usd})) == [
        "data.total.currency"
    ]
    refund = order_event(shop, type="order.refunded", data={"refund": usd, "status": "refunded"})
    assert await refused(platform, key, refund) == ["data.refund.currency"]
    batch = [
        order_event(shop),
        order_event(shop, data={"items": [{"sku": "x", "quantity": 1, "price": usd}]}),
    ]
    assert await refused(platform, key, batch) == ["[1].data.items.0.price.currency"]
    cart = {
        **order_event(shop, type="cart.added"),
        "data": {"customer": {"id": "c-cart"}, "sku": "LJ-250", "price": usd},
    }
    assert await refused(platform, key, cart) == ["data.price.currency"]
    # A platform's order in dollars, delivered to the CNY shop: refused after normalising.
    body, headers = _shopify(orjson.loads(signers.sample("shopify/orders_create.json")))
    r = await platform.request(
        "POST", f"/v1/webhooks/shopify/{shop}", content=body, headers=headers
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "data.total.currency"
    assert await published(platform) == before
    await nothing_arrives(platform, shop, key)


# --- 5: schema lengths against column lengths --------------------------------------------


def _length(table: Table, column: str) -> int:
    length = table.c[column].type.length  # type: ignore[attr-defined]
    assert isinstance(length, int), f"{table.name}.{column} has no length"
    return length


L = lifecycle_models
FIELD_COLUMNS: list[tuple[str, list[tuple[Table, str]]]] = [
    ("subject", [(L.customers, "customer_id"), (L.orders, "customer_id")]),
    ("data.customer.id", [(L.customers, "customer_id"), (L.customer_identities, "value")]),
    ("data.customer.name", [(L.customers, "name")]),
    (
        "data.customer.email",
        [(L.customers, "email"), (L.customer_identities, "value"), (L.customers, "customer_id")],
    ),
    ("data.order_id", [(L.orders, "order_id"), (L.order_tracking, "order_id")]),
    ("data.shipping.province", [(L.orders, "shipping_province"), (L.customers, "province")]),
    ("data.shipping.city", [(L.orders, "shipping_city"), (L.customers, "city")]),
    ("data.tracking_number", [(L.order_tracking, "tracking_number")]),
    ("data.carrier", [(L.order_tracking, "carrier")]),
    ("logistics:data.tracking_number", [(L.order_tracking, "tracking_number")]),
    ("logistics:data.carrier", [(L.order_tracking, "carrier")]),
    ("logistics:data.order_id", [(L.order_tracking, "order_id")]),
    ("source", [(L.customers, "source")]),
]
"""Which column stores each event field (lifecycle's handlers): the schema must refuse a
value one character longer than the shortest of them and accept one exactly as long."""


def _event_with(path: str, value: str) -> dict[str, Any]:
    logistics = path.startswith("logistics:")
    path = path.removeprefix("logistics:")
    if logistics:
        body: dict[str, Any] = {
            **order_event("s", type="logistics.in_transit"),
            "data": {"tracking_number": "T", "carrier": "c", "status": "in_transit"},
        }
    else:
        body = order_event("s", data={"tracking_number": "T1", "carrier": "sf"})
    *parents, last = path.split(".")
    target = body
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value
    return body


@pytest.mark.parametrize(("path", "columns"), FIELD_COLUMNS, ids=[p for p, _ in FIELD_COLUMNS])
def test_schema_lengths_equal_the_columns_that_store_them(
    path: str, columns: list[tuple[Table, str]]
) -> None:
    limit = min(_length(table, column) for table, column in columns)

    def text(length: int) -> str:
        if path.endswith("email"):
            return "a" * (length - len("@example.com")) + "@example.com"
        return "x" * length

    parse_event(_event_with(path, text(limit)))
    with pytest.raises(ValidationError) as caught:
        parse_event(_event_with(path, text(limit + 1)))
    assert ".".join(map(str, caught.value.errors()[0]["loc"])) == path.removeprefix("logistics:")


def test_numbers_and_keys_fit_their_columns() -> None:
    assert isinstance(L.orders.c.total_minor.type, BigInteger)
    assert isinstance(L.orders.c.refunded_minor.type, BigInteger)
    assert MAX_AMOUNT_MINOR * MAX_ITEMS < 2**63, "a sum of one order's prices fits a bigint"
    assert isinstance(L.orders.c.item_count.type, Integer)
    assert MAX_QUANTITY * MAX_ITEMS < 2**31, "one order's item count fits an int32"
    assert _length(L.customers, "phone") >= len("+") + 15, "E.164 has at most 15 digits"
    assert _length(L.customers, "currency") == _length(L.orders, "currency") == 3
    # The longest envelope the schema accepts still fits the dedupe-key columns.
    longest = parse_event(order_event("s" * 63, id="i" * 200, source="s" * 200, subject="c" * 200))
    for table, column in (
        (processed_events, "event_id"),
        (ingest_models.ingest_ledger, "dedupe_key"),
    ):
        assert len(longest.dedupe_key) <= _length(table, column), (table.name, column)


async def test_the_longest_values_the_schema_accepts_are_stored(platform: Platform) -> None:
    """On PostgreSQL (distributed) too: every stored field at its limit is applied, not
    dead-lettered."""
    shop, key = await new_shop(platform)
    customer_id = "c" * 200
    order_id = "o" * 200
    tracking = "T" * 100
    order = order_event(
        shop,
        source="s" * 200,
        subject=customer_id,
        data={
            "order_id": order_id,
            "status": "shipped",
            "customer": {
                "id": customer_id,
                "name": "名" * 200,
                "email": "e" * 188 + "@example.com",
                "phone": "13800138000",
            },
            "shipping": {"country": "C" * 100, "province": "省" * 100, "city": "市" * 100},
            "tracking_number": tracking,
            "carrier": "k" * 64,
            "items": [
                {"sku": "s" * 200, "title": "t" * 500, "quantity": MAX_QUANTITY}
                for _ in range(MAX_ITEMS)
            ],
            "total": {"amount_minor": MAX_AMOUNT_MINOR, "currency": "CNY"},
        },
        type="order.shipped",
    )
    email_only = order_event(
        shop, data={"customer": {"email": "m" * 188 + "@example.com"}, "order_id": "by-email"}
    )
    parcel = {
        **order_event(shop, type="logistics.delivered", time="2026-11-12T00:00:00Z"),
        "data": {
            "tracking_number": tracking,
            "carrier": "k" * 64,
            "status": "delivered",
            "order_id": order_id,
            "checkpoint": {"time": NOW, "description": "d" * 2000, "city": "市" * 100},
        },
    }
    r = await platform.request("POST", "/v1/events", key=key, json=[order, email_only, parcel])
    assert r.status_code == 202, r.text
    found: dict[str, Any] = {}

    async def stored() -> bool:
        r = await platform.request("GET", f"/v1/customers/{customer_id}", key=key)
        if r.status_code != 200:
            return False
        found.update(r.json())
        orders = found["orders"]
        return bool(orders and orders[0].get("tracking") and orders[0]["tracking"][0]["status"])

    await until(stored)
    # Whole, not cut to a shorter column (PostgreSQL casts some writes, silently cutting).
    assert found["name"] == "名" * 200
    assert found["source"] == "s" * 200
    assert found["orders"][0]["order_id"] == order_id
    assert found["orders"][0]["tracking"] == [
        {"tracking_number": tracking, "carrier": "k" * 64, "status": "delivered"}
    ]
    assert found["orders"][0]["total"]["amount_minor"] == MAX_AMOUNT_MINOR

    async def by_email() -> bool:
        r = await platform.request("GET", f"/v1/customers/{'m' * 188}@example.com", key=key)
        return r.status_code == 200

    await until(by_email)


def test_times_are_bounded_in_utc() -> None:
    base = order_event("s")
    assert parse_event({**base, "time": "1970-01-01T00:00:00Z"}).time == datetime(
        1970, 1, 1, tzinfo=UTC
    )
    assert parse_event({**base, "time": "2100-01-01T07:59:59+08:00"}).time.year == 2099
    for late in ("2100-01-01T00:00:00Z", "2099-12-31T23:00:00-05:00"):
        with pytest.raises(ValidationError):
            parse_event({**base, "time": late})

"""The foundation's slice, end to end through real processes, in both modes:
POST /v1/events on ingest → bus → lifecycle → GET /v1/customers/{id}."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from tests.platform import Platform, until

CANONICAL: dict[str, Any] = {
    "specversion": "1.0",
    "id": "shopify-evt-7f3c",
    "source": "shopify/acme-tea",
    "type": "order.created",
    "time": "2026-11-11T00:00:05Z",
    "shop_id": "acme-tea",
    "subject": "cust-42",
    "schema_version": 1,
    "data": {
        "order_id": "1001",
        "customer": {
            "id": "cust-42",
            "name": "王芳",
            "phone": "+8613800138000",
            "email": "fang@example.com",
        },
        "status": "created",
        "total": {"amount_minor": 25900, "currency": "CNY"},
        "items": [
            {
                "sku": "LJ-250",
                "title": "龙井 250g",
                "quantity": 1,
                "price": {"amount_minor": 25900, "currency": "CNY"},
            }
        ],
        "shipping": {"country": "CN", "province": "浙江省", "city": "杭州市", "district": "西湖区"},
        "created_at": "2026-11-11T00:00:05Z",
    },
}


def order_event(
    shop: str,
    customer: str,
    order: str,
    type_: str = "order.created",
    amount: int = 25900,
    event_id: str | None = None,
) -> dict[str, Any]:
    event = copy.deepcopy(CANONICAL)
    status = type_.split(".", 1)[1]
    event.update(
        id=event_id or f"{order}-{type_}",
        shop_id=shop,
        subject=customer,
        type=type_,
        source=f"test/{shop}",
    )
    event["data"].update(
        order_id=order, status=status, total={"amount_minor": amount, "currency": "CNY"}
    )
    event["data"]["customer"]["id"] = customer
    if status == "paid":
        event["data"]["paid_at"] = "2026-11-11T00:03:10Z"
    return event


def shop_name() -> str:
    return f"shop-{uuid.uuid4().hex[:8]}"


async def customer(platform: Platform, key: str, customer_id: str) -> dict[str, Any] | None:
    r = await platform.request("GET", f"/v1/customers/{customer_id}", key=key)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_canonical_order_becomes_a_customer_with_its_order(platform: Platform) -> None:
    key = await platform.create_shop("acme-tea")
    r = await platform.request("POST", "/v1/events", key=key, json=CANONICAL)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1, "duplicates": 0, "ids": ["shopify-evt-7f3c"]}

    async def visible() -> bool:
        return await customer(platform, key, "cust-42") is not None

    await until(visible)
    body = await customer(platform, key, "cust-42")
    assert body is not None
    assert body["shop_id"] == "acme-tea"
    assert body["customer_id"] == "cust-42"
    assert body["name"] == "王芳"
    assert body["tags"] == []
    assert body["member_level"] is None
    assert body["returning"] is False
    assert body["rfm"]["frequency"] == 0, "an unpaid order is no purchase"
    assert body["stage"] == "prospect" or body["stage"] == "interested"
    [order] = body["orders"]
    assert order["order_id"] == "1001"
    assert order["status"] == "created"
    assert order["total"] == {"amount_minor": 25900, "currency": "CNY"}
    assert order["created_at"] == "2026-11-11T00:00:05Z"

    paid = order_event("acme-tea", "cust-42", "1001", "order.paid")
    assert (await platform.request("POST", "/v1/events", key=key, json=paid)).status_code == 202

    async def purchased() -> bool:
        c = await customer(platform, key, "cust-42")
        return c is not None and c["rfm"]["frequency"] == 1

    await until(purchased)
    body = await customer(platform, key, "cust-42")
    assert body is not None
    assert body["rfm"]["monetary"] == {"amount_minor": 25900, "currency": "CNY"}
    assert body["rfm"]["first_order_at"] == "2026-11-11T00:00:05Z"
    assert body["orders"][0]["status"] == "paid"
    assert body["orders"][0]["paid_at"] == "2026-11-11T00:03:10Z"

    admin_view = await platform.request(
        "GET", "/v1/customers/cust-42", key=platform.admin_key, params={"shop_id": "acme-tea"}
    )
    assert admin_view.status_code == 200
    assert admin_view.json()["rfm"]["frequency"] == 1


async def test_a_duplicate_event_changes_nothing(platform: Platform) -> None:
    shop = shop_name()
    key = await platform.create_shop(shop)
    paid = order_event(shop, "c1", "o1", "order.paid", amount=1000)
    for _ in range(3):
        r = await platform.request("POST", "/v1/events", key=key, json=paid)
        assert r.status_code == 202
    r = await platform.request("POST", "/v1/events", key=key, json=[paid, paid])
    assert r.status_code == 202
    marker = order_event(shop, "c1", "o2", "order.paid", amount=1)

    async def marker_applied() -> bool:
        c = await customer(platform, key, "c1")
        return c is not None and len(c["orders"]) == 2

    assert (await platform.request("POST", "/v1/events", key=key, json=marker)).status_code == 202
    await until(marker_applied)
    body = await customer(platform, key, "c1")
    assert body is not None
    assert body["rfm"]["frequency"] == 2
    assert body["rfm"]["monetary"]["amount_minor"] == 1001


async def test_a_bad_event_gets_problem_json_and_nothing_of_the_request_is_stored(
    platform: Platform,
) -> None:
    shop = shop_name()
    key = await platform.create_shop(shop)
    good = order_event(shop, "c1", "o1", "order.paid", amount=500)
    bad = order_event(shop, "c1", "o2", "order.paid")
    bad["data"]["total"]["amount_minor"] = "lots"
    r = await platform.request("POST", "/v1/events", key=key, json=[good, bad])
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == 422
    assert {
        "field": "[1].data.total.amount_minor",
        "message": "Input should be a valid integer, unable to parse string as an integer",
    } in problem["errors"]

    for raw, status in [
        (b"{not json", 400),
        (b'{"id": "x"}', 422),
        (b"[]", 422),
    ]:
        r = await platform.request("POST", "/v1/events", key=key, content=raw)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
    huge = order_event(shop, "c1", "o3")
    huge["data"]["note"] = "x" * (1024 * 1024)
    r = await platform.request("POST", "/v1/events", key=key, json=huge)
    assert r.status_code == 413
    unknown_type = order_event(shop, "c1", "o4")
    unknown_type["type"] = "customer.stage_changed"
    assert (
        await platform.request("POST", "/v1/events", key=key, json=unknown_type)
    ).status_code == 422

    marker = order_event(shop, "c1", "o5", "order.paid", amount=7)
    assert (await platform.request("POST", "/v1/events", key=key, json=marker)).status_code == 202

    async def marker_applied() -> bool:
        return await customer(platform, key, "c1") is not None

    await until(marker_applied)
    body = await customer(platform, key, "c1")
    assert body is not None
    assert [o["order_id"] for o in body["orders"]] == ["o5"]


async def test_keys_are_required_and_scoped_to_their_shop(platform: Platform) -> None:
    shop_a, shop_b = shop_name(), shop_name()
    key_a = await platform.create_shop(shop_a)
    key_b = await platform.create_shop(shop_b)
    event = order_event(shop_a, "secret-customer", "o1", "order.paid")
    assert (await platform.request("POST", "/v1/events", key=key_a, json=event)).status_code == 202

    async def visible() -> bool:
        return await customer(platform, key_a, "secret-customer") is not None

    await until(visible)
    for method, path in [
        ("GET", "/v1/customers/secret-customer"),
        ("GET", "/v1/customers"),
        ("GET", "/v1/overview"),
        ("POST", "/v1/events"),
        ("POST", "/v1/shops"),
    ]:
        r = await platform.request(method, path, json={})
        assert r.status_code == 401, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        r = await platform.request(method, path, key="hk_not-a-key", json={})
        assert r.status_code == 401, (path, r.text)

    r = await platform.request("GET", "/v1/customers/secret-customer", key=key_b)
    assert r.status_code == 404
    r = await platform.request(
        "GET", "/v1/customers/secret-customer", key=key_b, params={"shop_id": shop_a}
    )
    assert r.status_code == 403
    r = await platform.request("GET", "/v1/customers", key=key_b)
    assert r.json()["items"] == []
    r = await platform.request("POST", "/v1/events", key=key_b, json=event)
    assert r.status_code == 403
    r = await platform.request("POST", f"/v1/shops/{shop_a}/keys", key=key_a)
    assert r.status_code == 403, "a shop key cannot mint keys"
    r = await platform.request(
        "POST", "/v1/events", key=platform.admin_key, json=order_event("no-such-shop", "c", "o")
    )
    assert r.status_code == 404


async def test_a_consumer_killed_mid_batch_applies_every_event_exactly_once(
    platform: Platform,
) -> None:
    shop = shop_name()
    key = await platform.create_shop(shop)
    customers, orders_each = 200, 10
    events = [
        order_event(shop, f"c{c}", f"o{c}-{o}", "order.paid", amount=100 + o)
        for c in range(customers)
        for o in range(orders_each)
    ]
    for start in range(0, len(events), 1000):
        r = await platform.request("POST", "/v1/events", key=key, json=events[start : start + 1000])
        assert r.status_code == 202

    async def purchases_applied() -> int:
        r = await platform.request("GET", "/v1/customers", key=key, params={"limit": 500})
        return sum(i["rfm"]["frequency"] for i in r.json()["items"]) if r.is_success else 0

    async def some_applied() -> bool:
        return await purchases_applied() > 0

    await until(some_applied)
    partial = await purchases_applied()
    platform.kill("platform" if platform.embedded else "lifecycle")
    assert partial < len(events), "the kill must land while the backlog is being applied"
    await platform.start("platform" if platform.embedded else "lifecycle")

    async def every_order_applied() -> bool:
        r = await platform.request("GET", "/v1/customers", key=key, params={"limit": 500})
        items = r.json()["items"]
        return len(items) == customers and all(i["rfm"]["frequency"] == orders_each for i in items)

    await until(every_order_applied, within=120)
    r = await platform.request("GET", "/v1/customers", key=key, params={"limit": 500})
    for item in r.json()["items"]:
        assert item["rfm"]["frequency"] == orders_each
        assert item["rfm"]["monetary"]["amount_minor"] == sum(100 + o for o in range(orders_each))
        assert item["returning"] is True


async def test_every_service_exposes_health_readiness_and_metrics(platform: Platform) -> None:
    import httpx

    for name in ("ingest", "lifecycle", "campaigns", "notifier"):
        async with httpx.AsyncClient() as client:
            assert (await client.get(platform.service_url(name, "/healthz"))).status_code == 200
            ready = await client.get(platform.service_url(name, "/readyz"))
            assert ready.status_code == 200, ready.text
            assert all(v == "ok" for v in ready.json()["checks"].values())
            text = (await client.get(platform.service_url(name, "/metrics"))).text
            assert "huitou_http_requests_total" in text
    async with httpx.AsyncClient() as client:
        text = (await client.get(platform.service_url("lifecycle", "/metrics"))).text
    assert 'huitou_consumer_messages_total{group="lifecycle"' in text
    docs = await platform.request("GET", "/openapi.json") if platform.embedded else None
    if docs is not None:
        assert "/v1/events" in docs.json()["paths"]

"""Lifecycle through a running Huitou: identities, tags, segments, policy, overview."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.platform import Platform, until


def order(
    shop: str,
    customer: dict[str, Any],
    order_id: str,
    status: str,
    *,
    amount: int = 25_900,
    days_ago: float = 1,
    subject: str | None = None,
    city: str = "杭州市",
) -> dict[str, Any]:
    created = datetime.now(UTC) - timedelta(days=days_ago)
    return {
        "specversion": "1.0",
        "id": f"{order_id}-{status}",
        "source": f"test/{shop}",
        "type": f"order.{status}",
        "time": created.isoformat(),
        "shop_id": shop,
        "subject": subject,
        "data": {
            "order_id": order_id,
            "customer": customer,
            "status": status,
            "total": {"amount_minor": amount, "currency": "CNY"},
            "items": [{"sku": "LJ-250", "quantity": 2}],
            "shipping": {"country": "CN", "province": "浙江省", "city": city},
            "created_at": created.isoformat(),
        },
    }


async def new_shop(platform: Platform) -> tuple[str, str]:
    shop = f"shop-{uuid.uuid4().hex[:8]}"
    return shop, await platform.create_shop(shop)


async def post(platform: Platform, key: str, events: list[dict[str, Any]]) -> None:
    r = await platform.request("POST", "/v1/events", key=key, json=events)
    assert r.status_code == 202, r.text


async def get(platform: Platform, key: str, path: str, **params: Any) -> Any:
    r = await platform.request("GET", path, key=key, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def wait_for(platform: Platform, key: str, customer_id: str, **expected: Any) -> Any:
    found: dict[str, Any] = {}

    async def matches() -> bool:
        r = await platform.request("GET", f"/v1/customers/{customer_id}", key=key)
        if r.status_code != 200:
            return False
        found.update(r.json())
        return all(_dig(found, k) == v for k, v in expected.items())

    await until(matches)
    return found


def _dig(body: dict[str, Any], path: str) -> Any:
    value: Any = body
    for part in path.split("__"):
        value = value[part]
    return value


async def test_a_guest_and_an_account_with_the_same_phone_become_one_customer(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    guest = {"phone": "13800138001", "name": "Guest"}
    await post(platform, key, [order(shop, guest, "g1", "paid", subject="+8613800138001")])
    await wait_for(platform, key, "+8613800138001", rfm__frequency=1)
    account = {"id": "acct-7", "phone": "13800138001", "name": "王芳"}
    await post(platform, key, [order(shop, account, "a1", "paid", subject="acct-7")])
    merged = await wait_for(platform, key, "acct-7", rfm__frequency=2)
    assert sorted(o["order_id"] for o in merged["orders"]) == ["a1", "g1"]
    assert merged["returning"] is True
    via_phone = await get(platform, key, "/v1/customers/+8613800138001")
    assert via_phone["customer_id"] == "acct-7"
    listed = await get(platform, key, "/v1/customers")
    assert [c["customer_id"] for c in listed["items"]] == ["acct-7"]
    other = {"id": "acct-8", "phone": "13800138001"}
    await post(platform, key, [order(shop, other, "b1", "paid", subject="acct-8")])
    await wait_for(platform, key, "acct-8", rfm__frequency=1)
    assert (await get(platform, key, "/v1/customers/acct-7"))["rfm"]["frequency"] == 2, (
        "two platform accounts sharing a phone stay two customers"
    )


async def test_manual_and_automatic_tags(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await post(
        platform,
        key,
        [
            order(shop, {"id": "big"}, "o1", "paid", amount=80_000),
            order(shop, {"id": "small"}, "o2", "paid", amount=5_000),
            order(shop, {"id": "small"}, "o3", "created", amount=5_000),
        ],
    )
    await wait_for(platform, key, "big", rfm__frequency=1)
    await wait_for(platform, key, "small", rfm__frequency=1)

    r = await platform.request(
        "POST",
        "/v1/tags",
        key=key,
        json={
            "name": "big-spender",
            "rule": {
                "all": [
                    {"field": "monetary_minor", "op": "gte", "value": 50_000},
                    {"field": "city", "op": "eq", "value": "杭州市"},
                ]
            },
        },
    )
    assert r.status_code == 201, r.text
    await wait_for(platform, key, "big", tags=["big-spender"])
    assert (await get(platform, key, "/v1/customers/small"))["tags"] == []

    await post(platform, key, [order(shop, {"id": "small"}, "o4", "paid", amount=60_000)])
    await wait_for(platform, key, "small", tags=["big-spender"])

    r = await platform.request("POST", "/v1/tags", key=key, json={"name": "vip-list"})
    assert r.status_code == 201
    r = await platform.request(
        "POST", "/v1/tags/vip-list/customers", key=key, json={"customer_ids": ["small"]}
    )
    assert r.json() == {"changed": 1}
    r = await platform.request("POST", "/v1/tags", key=key, json={"name": "call-list"})
    r = await platform.request(
        "POST", "/v1/tags/big-spender/copy", key=key, json={"to": "call-list"}
    )
    assert r.json() == {"changed": 2}
    r = await platform.request("POST", "/v1/tags/vip-list/move", key=key, json={"to": "call-list"})
    assert r.json() == {"changed": 0}
    small = await get(platform, key, "/v1/customers/small")
    assert small["tags"] == ["big-spender", "call-list"]
    tags = {t["name"]: t for t in await get(platform, key, "/v1/tags")}
    assert (tags["big-spender"]["kind"], tags["big-spender"]["customers"]) == ("auto", 2)
    assert tags["vip-list"]["customers"] == 0

    r = await platform.request(
        "POST", "/v1/tags/big-spender/customers", key=key, json={"customer_ids": ["small"]}
    )
    assert r.status_code == 409, "an automatic tag's rule decides, not the operator"
    r = await platform.request(
        "POST", "/v1/tags/call-list/customers", key=key, json={"customer_ids": ["nobody"]}
    )
    assert r.status_code == 422
    r = await platform.request(
        "POST",
        "/v1/tags",
        key=key,
        json={"name": "broken", "rule": {"all": [{"field": "shoe_size", "op": "eq", "value": 42}]}},
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"].startswith("rule.all.0")

    other_shop, other_key = await new_shop(platform)
    assert await get(platform, other_key, "/v1/tags") == []
    r = await platform.request("POST", "/v1/tags", key=other_key, json={"name": "mine"})
    r = await platform.request(
        "POST", "/v1/tags/mine/customers", key=other_key, json={"customer_ids": ["small"]}
    )
    assert r.status_code == 422, "another shop's customers do not exist for this key"
    assert other_shop != shop


async def test_segments_count_list_and_export(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await post(
        platform,
        key,
        [
            order(
                shop,
                {"id": f"c{i}", "name": f"n{i}"},
                f"o{i}",
                "paid",
                amount=1000 * (i + 1),
                city="杭州市" if i % 2 else "上海市",
            )
            for i in range(12)
        ],
    )
    await wait_for(platform, key, "c11", rfm__frequency=1)
    r = await platform.request(
        "POST",
        "/v1/segments",
        key=key,
        json={
            "name": "Hangzhou new buyers",
            "filter": {
                "all": [
                    {"field": "stage", "op": "eq", "value": "new"},
                    {"field": "city", "op": "eq", "value": "杭州市"},
                ]
            },
        },
    )
    assert r.status_code == 201, r.text
    segment_id = r.json()["segment_id"]
    assert (await get(platform, key, f"/v1/segments/{segment_id}/count")) == {"count": 6}
    first = await get(platform, key, f"/v1/segments/{segment_id}/customers", limit=4)
    second = await get(
        platform, key, f"/v1/segments/{segment_id}/customers", limit=4, cursor=first["next_cursor"]
    )
    ids = [c["customer_id"] for c in first["items"] + second["items"]]
    assert ids == ["c1", "c11", "c3", "c5", "c7", "c9"]
    assert second["next_cursor"] is None
    r = await platform.request("GET", f"/v1/segments/{segment_id}/export.csv", key=key)
    lines = r.text.strip().splitlines()
    assert lines[0].startswith("customer_id,name,phone,email,stage")
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted(ids)
    r = await platform.request(
        "POST",
        "/v1/segments",
        key=key,
        json={"name": "bad", "filter": {"field": "stage", "op": "eq", "value": "asleep"}},
    )
    assert r.status_code == 422
    _, other_key = await new_shop(platform)
    r = await platform.request("GET", f"/v1/segments/{segment_id}/count", key=other_key)
    assert r.status_code == 404


async def test_a_policy_change_restages_the_shop(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await post(platform, key, [order(shop, {"id": "c1"}, "o1", "paid", days_ago=12)])
    await wait_for(platform, key, "c1", stage="new")
    policy = await get(platform, key, "/v1/policy")
    assert policy["after_sale_days"] == 15
    r = await platform.request("PUT", "/v1/policy", key=key, json={**policy, "after_sale_days": 10})
    assert r.status_code == 200, r.text
    await wait_for(platform, key, "c1", stage="active")
    r = await platform.request(
        "PUT", "/v1/policy", key=key, json={**policy, "silent_after_days": 10}
    )
    assert r.status_code == 422, "thresholds must increase"
    timeline = await get(platform, key, "/v1/customers/c1/timeline")
    kinds = {(e["kind"], e["detail"].get("current")) for e in timeline}
    assert ("stage", "new") in kinds and ("stage", "active") in kinds


async def test_notes_source_correction_and_list_filters(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await post(
        platform,
        key,
        [
            order(
                shop,
                {"id": "a", "name": "Alice", "email": "alice@example.com"},
                "o1",
                "paid",
                amount=90_000,
            ),
            order(shop, {"id": "b", "name": "Bob"}, "o2", "paid", amount=1_000),
            order(shop, {"id": "b", "name": "Bob"}, "o3", "paid", amount=2_000, days_ago=2),
        ],
    )
    await wait_for(platform, key, "b", rfm__frequency=2)
    await wait_for(platform, key, "a", rfm__frequency=1)
    r = await platform.request(
        "POST", "/v1/customers/a/notes", key=key, json={"text": "prefers SMS"}
    )
    assert r.status_code == 201
    r = await platform.request("PATCH", "/v1/customers/a", key=key, json={"source": "wechat"})
    assert r.json()["source"] == "wechat"
    timeline = await get(platform, key, "/v1/customers/a/timeline")
    assert any(e["kind"] == "note" and e["detail"]["text"] == "prefers SMS" for e in timeline)
    by_spend = await get(platform, key, "/v1/customers", sort="-monetary")
    assert [c["customer_id"] for c in by_spend["items"]] == ["a", "b"]
    assert [
        c["customer_id"]
        for c in (await get(platform, key, "/v1/customers", min_frequency=2))["items"]
    ] == ["b"]
    assert [
        c["customer_id"] for c in (await get(platform, key, "/v1/customers", q="alice@"))["items"]
    ] == ["a"]
    assert [
        c["customer_id"]
        for c in (await get(platform, key, "/v1/customers", stage="after_sale"))["items"]
    ] == ["b"]
    overview = await get(platform, key, "/v1/overview")
    assert overview["stages"]["new"] == 1 and overview["stages"]["after_sale"] == 1
    assert overview["returning_share"] == 0.5
    assert overview["aov_returning"] == {"amount_minor": 1500, "currency": "CNY"}
    assert overview["aov_new"] == {"amount_minor": 90_000, "currency": "CNY"}
    assert overview["previous"]["stages"]["new"] == 0, "30 days ago nobody had bought"
    cycle = overview["repurchase_cycle_days"]
    assert cycle["repeat_purchases"] == 1
    assert 0.99 < cycle["p50"] < 1.01, "Bob bought again a day after his first order"


async def test_time_alone_moves_a_customer_to_sleeping(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    almost = 180 - 4 / 86400  # the sleeping threshold is four seconds away
    await post(platform, key, [order(shop, {"id": "c1"}, "o1", "paid", days_ago=almost)])
    await wait_for(platform, key, "c1", stage="silent")
    await wait_for(platform, key, "c1", stage="sleeping")
    timeline = await get(platform, key, "/v1/customers/c1/timeline")
    assert {"previous": "silent", "current": "sleeping"} in [
        e["detail"] for e in timeline if e["kind"] == "stage"
    ]

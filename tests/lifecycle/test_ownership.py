"""Whose events are whose: shops never share dedupe keys, an order never changes owner by a
weaker identity, contact details follow event time, and carrier pushes that arrive before
their order are kept."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.ingest import signers
from tests.lifecycle.test_lifecycle_api import new_shop, order, post, wait_for
from tests.platform import Platform, until

SHOPIFY_SECRET = "shpss_ownership"
REGISTERED = "115310627314723954"
ORDER_ID = "820982911946154508"
GUEST = "jon@example.com"


async def test_two_shops_using_the_same_source_and_id_both_apply(platform: Platform) -> None:
    (shop_a, key_a), (shop_b, key_b) = await new_shop(platform), await new_shop(platform)
    answers = []
    for shop, key, buyer in ((shop_a, key_a, "buyer-a"), (shop_b, key_b, "buyer-b")):
        event = order(shop, {"id": buyer}, "1", "paid")
        event["source"], event["id"] = "erp", "1"
        r = await platform.request("POST", "/v1/events", key=key, json=event)
        assert r.status_code == 202, r.text
        answers.append(r.json())
    assert [(a["accepted"], a["duplicates"]) for a in answers] == [(1, 0), (1, 0)]
    await wait_for(platform, key_a, "buyer-a", rfm__frequency=1)
    await wait_for(platform, key_b, "buyer-b", rfm__frequency=1)


async def _shopify_shop(platform: Platform) -> tuple[str, str]:
    shop = f"shop-{uuid.uuid4().hex[:8]}"
    key = await platform.create_shop(
        shop, currency="USD", webhook_secrets={"shopify": SHOPIFY_SECRET}
    )
    return shop, key


async def _shopify(platform: Platform, shop: str, topic: str, sample: str) -> None:
    body = signers.sample(f"shopify/{sample}.json")
    headers = signers.shopify(body, SHOPIFY_SECRET, topic, f"wh-{uuid.uuid4().hex}")
    r = await platform.request(
        "POST", f"/v1/webhooks/shopify/{shop}", content=body, headers=headers
    )
    assert r.status_code == 200, r.text


async def _orders_of(platform: Platform, key: str, customer_id: str) -> list[dict[str, Any]] | None:
    r = await platform.request("GET", f"/v1/customers/{customer_id}", key=key)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    orders: list[dict[str, Any]] = r.json()["orders"]
    return orders


async def test_a_fulfilment_naming_only_an_email_never_moves_the_order(
    platform: Platform,
) -> None:
    """Shopify's documented orders/create (customer id and email) then its
    fulfillments/create (the order's email only): the order stays the registered
    customer's, and no guest profile appears for the email."""
    shop, key = await _shopify_shop(platform)
    await _shopify(platform, shop, "orders/create", "orders_create")
    await _shopify(platform, shop, "fulfillments/create", "fulfillments_create")

    async def shipped_with_tracking() -> bool:
        orders = await _orders_of(platform, key, REGISTERED) or []
        return any(o["order_id"] == ORDER_ID and o["tracking"] for o in orders)

    await until(shipped_with_tracking)
    registered = await wait_for(platform, key, REGISTERED, rfm__frequency=1)
    assert registered["stage"] != "prospect"
    assert [o["order_id"] for o in registered["orders"]] == [ORDER_ID]
    assert await _orders_of(platform, key, GUEST) is None


async def test_the_platform_customer_takes_an_order_first_seen_under_an_email(
    platform: Platform,
) -> None:
    """The same two deliveries the other way round end with the same owner, and the
    move re-derives both profiles: the email's guest keeps no purchase."""
    shop, key = await _shopify_shop(platform)
    await _shopify(platform, shop, "fulfillments/create", "fulfillments_create")
    await wait_for(platform, key, GUEST, rfm__frequency=1)
    await _shopify(platform, shop, "orders/create", "orders_create")
    registered = await wait_for(platform, key, REGISTERED, rfm__frequency=1)
    assert [o["order_id"] for o in registered["orders"]] == [ORDER_ID]
    guest = await wait_for(platform, key, GUEST, rfm__frequency=0)
    assert guest["orders"] == []
    assert guest["stage"] == "prospect"


async def test_contact_details_come_from_the_newest_event_not_the_last_to_arrive(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    newer = order(shop, {"id": "c1", "phone": "+8613800138001", "name": "新"}, "o1", "paid")
    newer["time"] = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    older = order(shop, {"id": "c1", "phone": "+8613800138002", "name": "旧"}, "o2", "paid")
    older["time"] = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    await post(platform, key, [newer])
    await wait_for(platform, key, "c1", rfm__frequency=1)
    await post(platform, key, [older])
    found = await wait_for(platform, key, "c1", rfm__frequency=2)
    assert (found["phone"], found["name"]) == ("+8613800138001", "新")


async def test_a_carrier_push_before_its_order_is_kept(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    number = f"SF{uuid.uuid4().int % 10**12:012d}"
    push = {
        "specversion": "1.0",
        "id": f"push-{number}",
        "source": f"carrier/{shop}",
        "type": "logistics.arrived_city",
        "time": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
        "shop_id": shop,
        "subject": number,
        "data": {
            "tracking_number": number,
            "carrier": "SF",
            "status": "arrived_city",
            "checkpoint": {"city": "杭州市", "description": "到达杭州"},
        },
    }
    await post(platform, key, [push])
    shipped = order(shop, {"id": "c-parcel"}, "o-parcel", "shipped")
    shipped["data"]["tracking_number"], shipped["data"]["carrier"] = number, "SF"
    await post(platform, key, [shipped])
    found: dict[str, Any] = {}

    async def tracked() -> bool:
        orders = await _orders_of(platform, key, "c-parcel") or []
        found["orders"] = orders
        return bool(orders and orders[0]["tracking"])

    await until(tracked)
    assert found["orders"][0]["tracking"] == [
        {"tracking_number": number, "carrier": "SF", "status": "arrived_city"}
    ]

"""Journeys timed by the clock: a broadcast to an audience at a set time, and the waves of
a promotion (`promotion_waves`), through real processes in both modes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from tests.campaigns.test_journeys import (
    cart_event,
    enrollments,
    from_playbook,
    keys_of,
    make_journey,
    new_shop,
    now,
    order_event,
    post,
    requests_of,
    until_statuses,
)
from tests.platform import Platform

SHANGHAI = ZoneInfo("Asia/Shanghai")


async def known_customers(platform: Platform, key: str, shop: str) -> None:
    """c-1 bought, c-2 filled a cart, c-3 left an order unpaid; wait until campaigns has
    seen all three (observer journeys enroll each)."""
    observer: dict[str, Any] = {
        "name": "observer",
        "trigger": {"event": "order.created"},
        "steps": [{"id": "hold", "wait": "P30D"}],
        "reentry": {"per": "always"},
    }
    orders = await make_journey(platform, key, observer)
    carts = await make_journey(platform, key, {**observer, "trigger": {"event": "cart.added"}})
    await post(
        platform,
        key,
        order_event(shop, f"{shop}-1", "c-1", "created"),
        order_event(shop, f"{shop}-1", "c-1", "paid"),
        cart_event(shop, "c-2"),
        order_event(shop, f"{shop}-3", "c-3", "created"),
    )
    await until_statuses(platform, key, orders, {f"{shop}-1": "waiting", f"{shop}-3": "waiting"})
    await until_statuses(platform, key, carts, {"c-2": "waiting"})
    for journey in (orders, carts):
        r = await platform.request("POST", f"/v1/journeys/{journey}/archive", key=key)
        assert r.status_code == 200, r.text


async def test_a_broadcast_reaches_its_audience_at_its_time(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await known_customers(platform, key, shop)
    at = (now() + timedelta(seconds=2)).isoformat()
    journey = await make_journey(
        platform,
        key,
        {
            "name": "new arrivals",
            "trigger": {
                "broadcast": {
                    "at": at,
                    "audience": {"field": "customer.cart_open", "op": "eq", "value": False},
                }
            },
            "steps": [{"id": "send", "send": {"channel": "sms", "template": "news"}}],
        },
    )
    found = await until_statuses(platform, key, journey, {"c-1": "completed", "c-3": "completed"})
    assert "c-2" not in found  # an open cart: not in this audience
    sent_to = {m.data["customer_id"] for m in await requests_of(platform, shop, at_least=2)}
    assert sent_to == {"c-1", "c-3"}
    # Long past: refused rather than sent late.
    r = await platform.request(
        "POST",
        "/v1/journeys",
        key=key,
        json={
            "name": "too late",
            "trigger": {"broadcast": {"at": "2020-01-01T10:00:00"}},
            "steps": [{"id": "send", "send": {"channel": "sms", "template": "news"}}],
        },
    )
    late = r.json()["journey_id"]
    r = await platform.request("POST", f"/v1/journeys/{late}/activate", key=key)
    assert r.status_code == 409, r.text


async def test_promotion_waves_start_a_week_before_with_each_wave_to_its_audience(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    await known_customers(platform, key, shop)
    local = now().astimezone(SHANGHAI)
    starts = (local + timedelta(days=7)).replace(hour=0, minute=0, second=0, microsecond=0)
    r = await platform.request(
        "POST",
        "/v1/promotions",
        key=key,
        json={
            "name": "双11",
            "starts_at": starts.isoformat(),
            "ends_at": (starts + timedelta(days=1)).isoformat(),
        },
    )
    assert r.status_code == 201, r.text
    promotion = r.json()["promotion_id"]
    # The warm-up is due 7 days before the start at `at`: this very minute.
    journey = await from_playbook(
        platform,
        key,
        "promotion_waves",
        promotion_id=promotion,
        at=local.strftime("%H:%M"),
        holdout_percent=0,
    )
    found = await until_statuses(platform, key, journey, {"c-1": "waiting", "c-2": "waiting"})
    assert {c: e["step_id"] for c, e in found.items()} == {"c-1": "wait3", "c-2": "wait3"}
    assert "c-3" not in found  # no purchase, no open cart: in no wave's audience
    [warmup] = await requests_of(platform, shop, at_least=1)
    assert (warmup.data["customer_id"], warmup.data["template"]) == (
        "c-1",
        "promotion_waves_warmup",
    )
    assert warmup.data["variables"]["promotion"] == {"name": "双11"}
    assert len(keys_of(await requests_of(platform, shop))) == 1
    assert len(await enrollments(platform, key, journey)) == 2

"""Journeys end to end, in both modes, through real processes: events in through ingest,
campaigns enrolls, waits on durable timers, ends enrollments at their goals, and requests
messages (`notification.requested`, read back from the bus itself). Waits are seconds
long, so no test waits an hour; every wait is on a condition, never a fixed sleep."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from libs.common.events import Envelope
from services.campaigns.engine import in_holdout
from tests.campaigns.bus_reader import published
from tests.ingest.signers import kuaidi100
from tests.platform import Platform, until

SALT = "kd100-salt-journeys"


async def new_shop(platform: Platform) -> tuple[str, str]:
    shop = f"jr-{uuid.uuid4().hex[:8]}"
    key = await platform.create_shop(shop, webhook_secrets={"kuaidi100": SALT})

    async def campaigns_knows() -> bool:
        r = await platform.request("GET", "/v1/journeys", key=key)
        n = await platform.request("GET", "/v1/messages", key=key)
        return r.status_code == 200 and n.status_code == 200

    await until(campaigns_knows)
    return shop, key


def now() -> datetime:
    return datetime.now(UTC)


def order_event(
    shop: str,
    order_id: str,
    customer: str,
    status: str,
    *,
    event_id: str | None = None,
    total: int = 25_900,
    **data: Any,
) -> dict[str, Any]:
    at = now().isoformat()
    return {
        "specversion": "1.0",
        "id": event_id or f"{order_id}-{status}-{uuid.uuid4().hex[:6]}",
        "source": f"test/{shop}",
        "type": f"order.{status}",
        "time": at,
        "shop_id": shop,
        "subject": customer,
        "data": {
            "order_id": order_id,
            "customer": {"id": customer, "name": "王芳", "phone": "+8613800138000"},
            "status": status,
            "total": {"amount_minor": total, "currency": "CNY"},
            "shipping": {"country": "CN", "province": "浙江省", "city": "杭州市"},
            "created_at": at,
            **data,
        },
    }


def cart_event(shop: str, customer: str) -> dict[str, Any]:
    at = now().isoformat()
    return {
        "specversion": "1.0",
        "id": f"cart-{uuid.uuid4().hex[:10]}",
        "source": f"test/{shop}",
        "type": "cart.added",
        "time": at,
        "shop_id": shop,
        "subject": customer,
        "data": {"customer": {"id": customer, "phone": "+8613800138001"}, "sku": "LJ-250"},
    }


async def post(platform: Platform, key: str, *events: dict[str, Any]) -> None:
    r = await platform.request("POST", "/v1/events", key=key, json=list(events))
    assert r.status_code == 202, r.text


async def make_journey(platform: Platform, key: str, definition: dict[str, Any]) -> str:
    r = await platform.request("POST", "/v1/journeys", key=key, json=definition)
    assert r.status_code == 201, r.text
    journey_id: str = r.json()["journey_id"]
    r = await platform.request("POST", f"/v1/journeys/{journey_id}/activate", key=key)
    assert r.status_code == 200, r.text
    return journey_id


async def from_playbook(platform: Platform, key: str, name: str, **params: Any) -> str:
    r = await platform.request(
        "POST", f"/v1/playbooks/{name}", key=key, json={"params": params, "activate": True}
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "active"
    journey_id: str = r.json()["journey_id"]
    return journey_id


async def enrollments(
    platform: Platform, key: str, journey_id: str, **params: str
) -> list[dict[str, Any]]:
    r = await platform.request(
        "GET", f"/v1/journeys/{journey_id}/enrollments", key=key, params={"limit": 500, **params}
    )
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def report(platform: Platform, key: str, journey_id: str) -> dict[str, Any]:
    r = await platform.request("GET", f"/v1/journeys/{journey_id}/report", key=key)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def until_statuses(
    platform: Platform, key: str, journey_id: str, wanted: dict[str, str], within: float = 60
) -> dict[str, dict[str, Any]]:
    """Wait until each order (or customer) named in `wanted` has an enrollment in the given
    status; returns the enrollments by order (customer) id."""
    found: dict[str, dict[str, Any]] = {}

    async def reached() -> bool:
        nonlocal found
        items = await enrollments(platform, key, journey_id)
        found = {(e["order_id"] or e["customer_id"]): e for e in items}
        return all(found.get(k, {}).get("status") == s for k, s in wanted.items())

    await until(reached, within)
    return found


async def requests_of(platform: Platform, shop: str, at_least: int = 0) -> list[Envelope]:
    """The shop's `notification.requested` messages on the bus, once at least `at_least`
    distinct ones are there (the outbox relays them just after the commit)."""
    found: list[Envelope] = []

    async def enough() -> bool:
        nonlocal found
        found = await published(platform, "notifications.requested", shop)
        return len(keys_of(found)) >= at_least

    await until(enough)
    return found


def keys_of(messages: list[Envelope]) -> Counter[str]:
    """Distinct messages by idempotency key (a relay may publish one twice; the notifier
    drops the repeat by event id, which is the same for both)."""
    by_id = {m.id: m for m in messages}
    return Counter(str(m.data["idempotency_key"]) for m in by_id.values())


async def test_unpaid_reminder_once_unless_paid_and_the_report_counts_it(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    journey = await from_playbook(platform, key, "unpaid_reminder", delay="PT2S")
    unpaid, paid, twice = (f"{shop}-{n}" for n in ("unpaid", "paid", "twice"))
    created = order_event(shop, twice, "c-3", "created")
    await post(
        platform,
        key,
        order_event(shop, unpaid, "c-1", "created"),
        order_event(shop, paid, "c-2", "created"),
        created,
        created,  # the same event delivered twice
        order_event(shop, twice, "c-3", "created"),  # and the platform's retry, a new id
    )
    await post(platform, key, order_event(shop, paid, "c-2", "paid"))  # minute 59
    found = await until_statuses(
        platform,
        key,
        journey,
        {unpaid: "completed", paid: "exited", twice: "completed"},
    )
    assert found[paid]["exit_reason"] == "goal:order.paid"
    messages = await requests_of(platform, shop, at_least=2)
    by_key = keys_of(messages)
    assert sorted(by_key.values()) == [1, 1]
    reminded = {str(m.data["variables"]["order"]["id"]) for m in messages}
    assert reminded == {unpaid, twice}
    assert {m.data["template"] for m in messages} == {"unpaid_reminder"}
    assert {m.data["to"] for m in messages} == {"+8613800138000"}
    # Paying after the reminder converts the enrollment: counted once, with its revenue.
    await post(platform, key, order_event(shop, unpaid, "c-1", "paid"))

    async def converted() -> bool:
        return bool((await report(platform, key, journey))["conversions"] == 1)

    await until(converted)
    body = await report(platform, key, journey)
    assert body["entered"] == 3
    assert body["refused"] == {"order": 1}
    assert body["exited"] == {"completed": 2, "goal:order.paid": 1}
    assert body["messages"]["requested"] == 2
    assert body["revenue"] == {"amount_minor": 25_900, "currency": "CNY"}
    assert body["waiting"] == {}
    assert body["lift"] is None and "too few" in body["lift_unavailable"]


async def test_a_goal_ends_the_wait_at_once(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    journey = await from_playbook(platform, key, "unpaid_reminder", delay="PT1H")
    order = f"{shop}-o"
    await post(platform, key, order_event(shop, order, "c-1", "created"))
    found = await until_statuses(platform, key, journey, {order: "waiting"})
    assert found[order]["step_id"] == "wait"
    assert (await report(platform, key, journey))["waiting"] == {"wait": 1}
    await post(platform, key, order_event(shop, order, "c-1", "cancelled"))
    found = await until_statuses(platform, key, journey, {order: "exited"})
    assert found[order]["exit_reason"] == "goal:order.cancelled"
    assert found[order]["due_at"] is None
    assert (await report(platform, key, journey))["waiting"] == {}


def kuaidi100_push(tracking: str, city: str, at: datetime, status_code: str = "1001") -> str:
    """A Kuaidi100 subscription push (`param`) naming only the waybill: no order id."""
    local = (at + timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S")
    checkpoint = {
        "time": local,
        "ftime": local,
        "context": f"【{city}】 快件已到达 {city}分拨中心",
        "areaName": f"浙江,{city}",
        "status": "到达派件城市",
        "statusCode": status_code,
    }
    return json.dumps(
        {
            "status": "polling",
            "message": "",
            "lastResult": {
                "message": "ok",
                "nu": tracking,
                "com": "yuantong",
                "state": "0",
                "status": "200",
                "ischeck": "0",
                "data": [checkpoint],
            },
        },
        ensure_ascii=False,
    )


async def push_kuaidi100(platform: Platform, shop: str, param: str) -> None:
    body, headers = kuaidi100(param, SALT)
    r = await platform.request(
        "POST", f"/v1/logistics/kuaidi100/{shop}", content=body, headers=headers
    )
    assert r.status_code == 200, r.text


async def test_delivery_city_once_per_order_from_a_push_naming_only_the_waybill(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    journey = await from_playbook(platform, key, "delivery_city")
    order, stale_order = f"{shop}-o", f"{shop}-stale"
    tracking, stale_tracking = f"YT{uuid.uuid4().int % 10**12}", f"YT{uuid.uuid4().int % 10**12}"
    await post(
        platform,
        key,
        order_event(shop, order, "c-1", "shipped", tracking_number=tracking, carrier="yuantong"),
        order_event(
            shop, stale_order, "c-2", "shipped", tracking_number=stale_tracking, carrier="yuantong"
        ),
    )
    # The pushes may reach campaigns before the orders naming their waybills do: it
    # parks them until the link arrives, so no wait for the orders is needed here.
    at = now()
    await push_kuaidi100(platform, shop, kuaidi100_push(tracking, "杭州市", at))
    await push_kuaidi100(
        platform, shop, kuaidi100_push(tracking, "杭州市", at + timedelta(minutes=20))
    )
    await push_kuaidi100(
        platform, shop, kuaidi100_push(stale_tracking, "宁波市", at - timedelta(days=2))
    )

    async def repeat_refused() -> bool:
        return bool((await report(platform, key, journey))["refused"] == {"order": 1})

    await until(repeat_refused)
    found = await until_statuses(platform, key, journey, {order: "completed"})
    assert stale_order not in found
    messages = await requests_of(platform, shop, at_least=1)
    assert len(keys_of(messages)) == 1
    variables = messages[0].data["variables"]
    assert variables["parcel"]["city"] == "杭州市"
    assert variables["parcel"]["tracking_number"] == tracking
    assert variables["order"]["id"] == order


async def test_pause_holds_waits_and_resume_releases_them(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    journey = await from_playbook(platform, key, "unpaid_reminder", delay="PT2S")
    order = f"{shop}-o"
    await post(platform, key, order_event(shop, order, "c-1", "created"))
    await until_statuses(platform, key, journey, {order: "waiting"})
    r = await platform.request("POST", f"/v1/journeys/{journey}/pause", key=key)
    assert r.status_code == 200 and r.json()["status"] == "paused", r.text
    await until_statuses(platform, key, journey, {order: "held"})
    # Paused admits no one.
    await post(platform, key, order_event(shop, f"{shop}-late", "c-2", "created"))
    await platform.settle()
    assert await requests_of(platform, shop) == []
    r = await platform.request("POST", f"/v1/journeys/{journey}/resume", key=key)
    assert r.status_code == 200 and r.json()["status"] == "active", r.text
    found = await until_statuses(platform, key, journey, {order: "completed"})
    assert f"{shop}-late" not in found
    assert len(keys_of(await requests_of(platform, shop, at_least=1))) == 1
    r = await platform.request("POST", f"/v1/journeys/{journey}/resume", key=key)
    assert r.status_code == 409


async def test_an_edit_keeps_running_enrollments_on_their_version(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    definition = {
        "name": "edited",
        "category": "transactional",
        "key": "order",
        "trigger": {"event": "order.created"},
        "steps": [
            {"id": "wait", "wait": "PT3S"},
            {"id": "send", "send": {"channel": "sms", "template": "first"}},
        ],
        "reentry": {"per": "order"},
    }
    journey = await make_journey(platform, key, definition)
    first, second = f"{shop}-1", f"{shop}-2"
    await post(platform, key, order_event(shop, first, "c-1", "created"))
    await until_statuses(platform, key, journey, {first: "waiting"})
    edited = {
        **definition,
        "steps": [{"id": "send", "send": {"channel": "sms", "template": "second"}}],
    }
    r = await platform.request("PUT", f"/v1/journeys/{journey}", key=key, json=edited)
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    await post(platform, key, order_event(shop, second, "c-2", "created"))
    found = await until_statuses(platform, key, journey, {first: "completed", second: "completed"})
    assert (found[first]["version"], found[second]["version"]) == (1, 2)
    templates = {
        m.data["variables"]["order"]["id"]: (m.data["template"], m.data["journey_version"])
        for m in await requests_of(platform, shop, at_least=2)
    }
    assert templates == {first: ("first", 1), second: ("second", 2)}


def capped(on_cap: str, defer_max: str) -> dict[str, Any]:
    return {
        "name": f"cart {on_cap}",
        "category": "marketing",
        "key": "customer",
        "trigger": {"event": "cart.added"},
        "steps": [{"id": "nudge", "send": {"channel": "sms", "template": "cart"}}],
        "reentry": {"per": "always"},
        "caps": [
            {
                "scope": "journey",
                "max": 1,
                "period": "P1D",
                "on_cap": on_cap,
                "defer_max": defer_max,
            }
        ],
    }


async def test_caps_defer_skip_or_drop_and_the_report_says_so(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    deferring = await make_journey(platform, key, capped("defer", "P2D"))
    skipping = await make_journey(platform, key, capped("skip", "P1D"))
    dropping = await make_journey(platform, key, capped("defer", "PT1M"))
    await post(platform, key, cart_event(shop, "c-1"))
    await platform.settle(("cart.added",))
    await post(platform, key, cart_event(shop, "c-1"))
    await platform.settle(("cart.added",))

    async def reported() -> bool:
        bodies = [await report(platform, key, j) for j in (deferring, skipping, dropping)]
        return all(b["entered"] == 2 for b in bodies)

    await until(reported)
    defer, skip, drop = [
        (await report(platform, key, j))["messages"] for j in (deferring, skipping, dropping)
    ]
    assert (defer["requested"], defer["capped"]) == (1, {"deferred": 1, "skipped": 0, "expired": 0})
    assert (skip["requested"], skip["capped"]) == (1, {"deferred": 0, "skipped": 1, "expired": 0})
    assert (drop["requested"], drop["capped"]) == (1, {"deferred": 0, "skipped": 0, "expired": 1})
    waiting = await enrollments(platform, key, deferring, status="waiting")
    assert [(e["step_id"], e["customer_id"]) for e in waiting] == [("nudge", "c-1")]
    # The deferred send waits until the cap allows it: a day after the first message.
    assert datetime.fromisoformat(waiting[0]["due_at"]) > now() + timedelta(hours=23)
    assert len(keys_of(await requests_of(platform, shop, at_least=3))) == 3


def waiting_journey(per: str, **reentry: Any) -> dict[str, Any]:
    return {
        "name": f"reentry {per}",
        "category": "marketing",
        "key": "customer",
        "trigger": {"event": "order.created"},
        "steps": [
            {"id": "wait", "wait": "P30D"},
            {"id": "send", "send": {"channel": "sms", "template": "t"}},
        ],
        "reentry": {"per": per, **reentry},
    }


async def test_each_reentry_rule_refuses_what_it_says(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    once = await make_journey(platform, key, waiting_journey("customer"))
    monthly = await make_journey(platform, key, waiting_journey("customer_days", days=30))
    always = await make_journey(platform, key, waiting_journey("always"))
    per_order = await make_journey(platform, key, {**waiting_journey("order"), "key": "order"})
    for n in range(3):
        await post(platform, key, order_event(shop, f"{shop}-{n}", "c-1", "created"))
    await post(platform, key, order_event(shop, f"{shop}-0", "c-1", "created"))  # a repeat

    async def all_counted() -> bool:
        for journey in (once, monthly, always, per_order):
            body = await report(platform, key, journey)
            if body["entered"] + sum(body["refused"].values()) < 4:
                return False
        return True

    await until(all_counted)
    seen = {}
    for name, journey in (
        ("once", once),
        ("monthly", monthly),
        ("always", always),
        ("order", per_order),
    ):
        body = await report(platform, key, journey)
        seen[name] = (body["entered"], body["refused"])
    assert seen == {
        "once": (1, {"customer": 3}),
        "monthly": (1, {"customer_days": 3}),
        "always": (4, {}),
        "order": (3, {"order": 1}),
    }


async def test_holdout_is_deterministic_and_sends_nothing(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    definition = {
        "name": "holdout",
        "category": "marketing",
        "key": "customer",
        "trigger": {"event": "cart.added"},
        "steps": [{"id": "nudge", "send": {"channel": "sms", "template": "cart"}}],
        "holdout_percent": 40,
    }
    journey = await make_journey(platform, key, definition)
    customers = [f"c-{n}" for n in range(40)]
    await post(platform, key, *[cart_event(shop, c) for c in customers])

    async def all_in() -> bool:
        return bool((await report(platform, key, journey))["entered"] == len(customers))

    await until(all_in)
    expected_out = {c for c in customers if in_holdout(journey, c, 40)}
    found = {e["customer_id"]: e for e in await enrollments(platform, key, journey)}
    assert {c for c, e in found.items() if e["held_out"]} == expected_out
    body = await report(platform, key, journey)
    assert body["held_out"] == len(expected_out)
    assert body["messages"]["held_out"] == len(expected_out)
    treated = len(customers) - len(expected_out)
    sent_to = {m.data["customer_id"] for m in await requests_of(platform, shop, treated)}
    assert sent_to == set(customers) - expected_out


def test_holdout_split_is_within_tolerance_of_its_percentage() -> None:
    for percent in (5, 10, 50):
        held = sum(in_holdout("j_split", f"cust-{n}", percent) for n in range(20_000))
        assert abs(held / 20_000 - percent / 100) < 0.01, (percent, held)
    assert not any(in_holdout("j_split", f"cust-{n}", 0) for n in range(1000))


async def test_an_invalid_journey_is_refused_with_a_pointer_to_the_bad_node(
    platform: Platform,
) -> None:
    _, key = await new_shop(platform)
    bad = {
        "name": "bad",
        "trigger": {"event": "order.created"},
        "steps": [
            {"id": "a", "wait": "PT1H"},
            {
                "id": "b",
                "branch": {
                    "if": {"field": "order.total_minor", "op": "gt", "value": "x"},
                    "then": "c",
                },
            },
            {"id": "c", "wait": "an hour"},
        ],
    }
    r = await platform.request("POST", "/v1/journeys", key=key, json=bad)
    assert r.status_code == 422, r.text
    fields = {e["field"] for e in r.json()["errors"]}
    assert fields == {"steps.1.branch.if.value", "steps.2.wait"}
    r = await platform.request("GET", "/v1/journeys", key=key)
    assert r.json()["items"] == []


async def test_a_tag_step_asks_lifecycle_and_its_change_triggers_another_journey(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    await make_journey(
        platform,
        key,
        {
            "name": "tag carts",
            "trigger": {"event": "cart.added"},
            "steps": [{"id": "tag", "tag": {"add": "cart-nudged"}}],
        },
    )
    follow_up = await make_journey(
        platform,
        key,
        {
            "name": "on the tag",
            "trigger": {
                "event": "customer.tag_added",
                "if": {"field": "event.tag", "op": "eq", "value": "cart-nudged"},
            },
            "steps": [{"id": "send", "send": {"channel": "sms", "template": "tagged"}}],
        },
    )
    await post(platform, key, cart_event(shop, "c-1"))

    async def tagged() -> bool:
        r = await platform.request("GET", "/v1/customers/c-1", key=key)
        return r.status_code == 200 and "cart-nudged" in r.json()["tags"]

    await until(tagged)
    await until_statuses(platform, key, follow_up, {"c-1": "completed"})
    [message] = await requests_of(platform, shop, at_least=1)
    assert message.data["template"] == "tagged"

"""The notifier end to end on the platform (both modes): campaigns' unpaid reminder becomes
one message in `GET /v1/messages` through the outbox provider, with its status history and
its `sent` status in the journey's report; rules stop what they should, with a reason;
another shop's key sees none of it."""

from __future__ import annotations

from typing import Any

from tests.campaigns.test_journeys import from_playbook, new_shop, order_event, post, report
from tests.platform import Platform, until


async def messages_of(platform: Platform, key: str, **params: str) -> list[dict[str, Any]]:
    r = await platform.request("GET", "/v1/messages", key=key, params=params)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def test_the_unpaid_reminder_is_one_message_in_the_outbox(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    journey = await from_playbook(platform, key, "unpaid_reminder", delay="PT1S")
    # The playbook saved its default template in the notifier.
    r = await platform.request("GET", "/v1/templates/unpaid_reminder", key=key)
    assert r.status_code == 200, r.text
    order = f"{shop}-o1"
    created = order_event(shop, order, "c-1", "created")
    await post(platform, key, created, created)  # delivered twice

    async def sent() -> bool:
        found = await messages_of(platform, key)
        return len(found) == 1 and found[0]["status"] == "sent"

    await until(sent)
    (message,) = await messages_of(platform, key)
    assert message["to"] == "+8613800138000"
    assert message["provider"] == "outbox"
    assert message["journey_id"] == journey
    assert order in message["body"] and "王芳" in message["body"]
    r = await platform.request("GET", f"/v1/messages/{message['message_id']}", key=key)
    assert [h["status"] for h in r.json()["status_history"]] == ["queued", "sending", "sent"]

    async def reported() -> bool:
        return bool((await report(platform, key, journey))["messages"].get("sent") == 1)

    await until(reported)
    # Another shop sees none of it.
    _, other = await new_shop(platform)

    async def notifier_knows_the_key() -> bool:
        r = await platform.request("GET", "/v1/messages", key=other)
        return r.status_code == 200

    await until(notifier_knows_the_key)
    assert await messages_of(platform, other) == []
    r = await platform.request("GET", f"/v1/messages/{message['message_id']}", key=other)
    assert r.status_code == 404


async def test_a_customer_who_said_no_gets_nothing_and_the_reason_is_recorded(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    await from_playbook(platform, key, "unpaid_reminder", delay="PT1S")
    r = await platform.request("PUT", "/v1/consent/c-2", key=key, json={"sms": False})
    assert r.status_code == 200 and r.json()["sms"] is False, r.text
    await post(platform, key, order_event(shop, f"{shop}-o2", "c-2", "created"))

    async def suppressed() -> bool:
        found = await messages_of(platform, key)
        return len(found) == 1 and found[0]["status"] == "suppressed"

    await until(suppressed)
    (message,) = await messages_of(platform, key)
    assert message["reason"] == "no_consent"

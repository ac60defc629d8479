"""Campaigns SIGKILLed while its reminders fire, then restarted: every reminder is requested
exactly once (one distinct idempotency key each, and the report's counter, which a fire
applied twice would push past the number of orders)."""

from __future__ import annotations

from datetime import timedelta

from tests.campaigns.test_journeys import (
    enrollments,
    from_playbook,
    keys_of,
    new_shop,
    now,
    order_event,
    post,
    report,
    requests_of,
)
from tests.platform import Platform, until

ORDERS = 200


async def test_a_kill_while_reminders_fire_requests_each_once(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    # The first reminder comes due six seconds after the first checkout, the last one ten
    # seconds later: enrolling the orders can be slow (the suite starts the bench smoke
    # beside the first tests) and the firing still spans long enough for the kill to land
    # in its middle.
    journey = await from_playbook(platform, key, "unpaid_reminder", delay="PT6S")
    start = now()
    events = []
    for n in range(ORDERS):
        event = order_event(shop, f"{shop}-{n}", f"c-{n}", "created")
        event["time"] = (start + timedelta(milliseconds=50 * n)).isoformat()
        events.append(event)
    for first in range(0, ORDERS, 100):
        await post(platform, key, *events[first : first + 100])

    async def requested() -> int:
        return int((await report(platform, key, journey))["messages"]["requested"])

    async def all_enrolled() -> bool:
        return int((await report(platform, key, journey))["entered"]) == ORDERS

    await until(all_enrolled)

    async def firing() -> bool:
        return await requested() > 0

    await until(firing)
    before_kill = await requested()
    service = "platform" if platform.embedded else "campaigns"
    platform.kill(service)
    await platform.start(service)  # before any assertion: the platform serves later tests
    assert before_kill < ORDERS, "the kill came after every reminder fired; nothing was proven"

    async def all_done() -> bool:
        done = await enrollments(platform, key, journey, status="completed")
        return len(done) == ORDERS

    await until(all_done, within=120)
    body = await report(platform, key, journey)
    assert body["messages"]["requested"] == ORDERS
    assert body["exited"] == {"completed": ORDERS}
    by_key = keys_of(await requests_of(platform, shop, at_least=ORDERS))
    assert len(by_key) == ORDERS and set(by_key.values()) == {1}

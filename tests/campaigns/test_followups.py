"""What campaigns learns from the other services' events, in process on the real bus and
database (both modes): lifecycle's merges move enrollments to the surviving customer, and
the notifier's statuses land in the journey's report, each counted once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI

from libs.common.bus import Message
from libs.common.events import (
    CustomerMergedData,
    NotificationStatusData,
    OrderData,
    ShopData,
    new_event,
    topic_for,
)
from libs.common.http import build_app
from libs.common.settings import Settings
from services.campaigns.app import SPEC
from tests.conftest import eventually

ADMIN = {"Authorization": "Bearer test-admin-key"}


@asynccontextmanager
async def campaigns(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, str]]:
    app = build_app(settings, [SPEC])
    shop = f"fu-{uuid.uuid4().hex[:6]}"
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://huitou.test") as c:
            registered = new_event(
                type="shop.registered",
                shop_id=shop,
                source="test",
                data=ShopData(shop_id=shop, name="FU", timezone="Asia/Shanghai", currency="CNY"),
                subject=shop,
                id=f"{shop}-registered",
            )
            await publish(app, settings, registered)

            async def known() -> bool:
                r = await c.get("/v1/journeys", params={"shop_id": shop}, headers=ADMIN)
                return r.status_code == 200 and await _shop_known(c, shop)

            await eventually(known)
            yield app, c, shop


async def _shop_known(client: httpx.AsyncClient, shop: str) -> bool:
    r = await client.post(
        "/v1/promotions",
        params={"shop_id": shop},
        headers=ADMIN,
        json={
            "name": "probe",
            "starts_at": "2030-01-01T00:00:00Z",
            "ends_at": "2030-01-02T00:00:00Z",
        },
    )
    return r.status_code == 201


async def publish(app: FastAPI, settings: Settings, *events: Any) -> None:
    await app.state.runtime.bus.publish(
        [Message(topic_for(e.type, settings.topic_namespace), e.key, e.to_bytes()) for e in events]
    )


def order(shop: str, order_id: str, customer: str) -> Any:
    return new_event(
        type="order.created",
        shop_id=shop,
        source=f"test/{shop}",
        data=OrderData.model_validate(
            {"order_id": order_id, "customer": {"id": customer}, "status": "created"}
        ),
        subject=customer,
        id=f"{order_id}-created",
        time=datetime.now(UTC),
    )


async def make(client: httpx.AsyncClient, shop: str, definition: dict[str, Any]) -> str:
    params = {"shop_id": shop}
    r = await client.post("/v1/journeys", params=params, json=definition, headers=ADMIN)
    assert r.status_code == 201, r.text
    journey: str = r.json()["journey_id"]
    r = await client.post(f"/v1/journeys/{journey}/activate", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    return journey


async def items(client: httpx.AsyncClient, shop: str, journey: str) -> list[dict[str, Any]]:
    r = await client.get(
        f"/v1/journeys/{journey}/enrollments", params={"shop_id": shop}, headers=ADMIN
    )
    found: list[dict[str, Any]] = r.json()["items"]
    return found


async def test_enrollments_follow_a_merge(settings: Settings) -> None:
    async with campaigns(settings) as (app, client, shop):
        journey = await make(
            client,
            shop,
            {
                "name": "wait",
                "trigger": {"event": "order.created"},
                "steps": [{"id": "wait", "wait": "P30D"}],
            },
        )
        await publish(app, settings, order(shop, "o-1", "c-2"))

        async def enrolled() -> bool:
            return [e["customer_id"] for e in await items(client, shop, journey)] == ["c-2"]

        await eventually(enrolled)
        merged = new_event(
            type="customer.merged",
            shop_id=shop,
            source="huitou/lifecycle",
            data=CustomerMergedData(customer_id="c-1", merged_ids=["c-2"]),
            subject="c-1",
            id=f"{shop}-merged",
        )
        await publish(app, settings, merged)

        async def moved() -> bool:
            return [e["customer_id"] for e in await items(client, shop, journey)] == ["c-1"]

        await eventually(moved)
        assert await moved()


async def test_statuses_land_in_the_report_once_each(settings: Settings) -> None:
    async with campaigns(settings) as (app, client, shop):
        journey = await make(
            client,
            shop,
            {
                "name": "at once",
                "trigger": {"event": "order.created"},
                "steps": [{"id": "send", "send": {"channel": "sms", "template": "t"}}],
            },
        )
        await publish(app, settings, *(order(shop, f"o-{n}", f"c-{n}") for n in range(3)))

        async def all_sent() -> bool:
            return len(await items(client, shop, journey)) == 3

        await eventually(all_sent)
        keys = sorted(
            f"{shop}:{journey}:v1:send:{e['enrollment_id']}"
            for e in await items(client, shop, journey)
        )

        def status(key: str, value: str, n: int, reason: str | None = None) -> Any:
            return new_event(
                type="notification.status",
                shop_id=shop,
                source="huitou/notifier",
                data=NotificationStatusData(
                    idempotency_key=key, status=value, channel="sms", reason=reason
                ),
                subject=None,
                id=f"{key}-{value}-{n}",
            )

        await publish(
            app,
            settings,
            status(keys[0], "sent", 1),
            status(keys[0], "sent", 2),  # the same status again, another event id
            status(keys[0], "delivered", 1),
            status(keys[1], "failed", 1, "provider 500 after retries"),
            status(keys[2], "suppressed", 1, "no_consent"),
        )

        async def reported() -> dict[str, Any]:
            r = await client.get(
                f"/v1/journeys/{journey}/report", params={"shop_id": shop}, headers=ADMIN
            )
            messages: dict[str, Any] = r.json()["messages"]
            return messages

        async def counted() -> bool:
            return bool((await reported())["suppressed"] == {"no_consent": 1})

        await eventually(counted)
        messages = await reported()
        assert (messages["requested"], messages["sent"], messages["delivered"]) == (3, 1, 1)
        assert (messages["failed"], messages["suppressed"]) == (1, {"no_consent": 1})

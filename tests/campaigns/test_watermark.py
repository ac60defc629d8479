"""The event-time watermark: a reminder due at minute 60 waits while a payment made at
minute 59 is still in the pipeline (its partition lags), and the payment cancels it.

Campaigns runs in this process (both modes, on the real bus and database), so the test can
hold its consumer in the middle of the batch carrying the payment: the partition then lags
for as long as the test says. The control run sets the maximum hold to zero and shows the
reminder racing the payment, so the test is known to fail without the watermark."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from libs.common.bus import Message, Received
from libs.common.events import OrderData, ShopData, new_event, topic_for
from libs.common.http import build_app
from libs.common.settings import Settings
from services.campaigns.app import SPEC
from services.campaigns.firing import WATERMARK_HOLDS
from tests.conftest import eventually, make_settings

ADMIN = {"Authorization": "Bearer test-admin-key"}


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://huitou.test") as c:
            yield c


def order(shop: str, order_id: str, status: str, namespace: str) -> Message:
    event = new_event(
        type=f"order.{status}",
        shop_id=shop,
        source=f"test/{shop}",
        data=OrderData.model_validate(
            {
                "order_id": order_id,
                "customer": {"id": "c-1", "phone": "+8613800138000"},
                "status": status,
                "total": {"amount_minor": 100, "currency": "CNY"},
            }
        ),
        subject="c-1",
        id=f"{order_id}-{status}",
        time=datetime.now(UTC),
    )
    return Message(topic_for(event.type, namespace), event.key, event.to_bytes())


async def test_a_payment_still_in_the_pipeline_cancels_the_reminder(settings: Settings) -> None:
    await _scenario(settings, max_hold=60.0)


async def test_control_without_the_hold_the_reminder_races_the_payment(tmp_path: Path) -> None:
    """The same scenario with the maximum hold at zero (embedded: one mode shows that
    the test above can fail)."""
    await _scenario(make_settings("embedded", tmp_path), max_hold=0.0)


async def _scenario(settings: Settings, *, max_hold: float) -> None:
    namespace = settings.topic_namespace
    settings = settings.model_copy(update={"journey_watermark_max_hold_s": max_hold})
    shop = f"wm-{uuid.uuid4().hex[:6]}"
    app = build_app(settings, [SPEC])
    runtime = app.state.runtime
    [campaigns] = runtime.services
    subscription = campaigns.parts.subscriptions[0]
    handle = subscription.handler
    release = asyncio.Event()
    stuck = asyncio.Event()

    async def lagging(batch: list[Received]) -> None:
        """The partition carrying the payment lags until the test releases it."""
        if any(b'"order.paid"' in r.value for r in batch) and not release.is_set():
            stuck.set()
            await release.wait()
        await handle(batch)

    subscription.handler = lagging
    async with serving(app) as client:
        registered = new_event(
            type="shop.registered",
            shop_id=shop,
            source="test",
            data=ShopData(shop_id=shop, name="WM", timezone="Asia/Shanghai", currency="CNY"),
            subject=shop,
            id=f"{shop}-registered",
        )
        await runtime.bus.publish(
            [Message(topic_for(registered.type, namespace), shop, registered.to_bytes())]
        )
        params = {"shop_id": shop}
        definition: dict[str, Any] = {
            "name": "unpaid",
            "category": "transactional",
            "key": "order",
            "trigger": {"event": "order.created"},
            "steps": [
                {"id": "wait", "wait": "PT2S"},
                {"id": "remind", "send": {"channel": "sms", "template": "unpaid_reminder"}},
            ],
            "goals": [{"event": "order.paid", "match": "order"}],
            "reentry": {"per": "order"},
        }

        async def shop_known() -> bool:
            r = await client.post("/v1/journeys", params=params, json=definition, headers=ADMIN)
            if r.status_code == 201:
                definition["journey_id"] = r.json()["journey_id"]
            return r.status_code == 201

        await eventually(shop_known)
        journey = definition["journey_id"]
        r = await client.post(f"/v1/journeys/{journey}/activate", params=params, headers=ADMIN)
        assert r.status_code == 200, r.text

        async def statuses() -> dict[str, Any]:
            r = await client.get(
                f"/v1/journeys/{journey}/enrollments", params=params, headers=ADMIN
            )
            return {e["order_id"]: e for e in r.json()["items"]}

        await runtime.bus.publish([order(shop, "o-1", "created", namespace)])

        async def enrolled() -> bool:
            return bool((await statuses()).get("o-1", {}).get("status") == "waiting")

        await eventually(enrolled)
        await runtime.bus.publish([order(shop, "o-1", "paid", namespace)])  # minute 59
        await asyncio.wait_for(stuck.wait(), 30)
        holds = WATERMARK_HOLDS.labels("held")._value.get()
        ended = (await statuses())["o-1"]

        async def due_and_decided() -> bool:
            nonlocal ended
            ended = (await statuses())["o-1"]
            held_again = WATERMARK_HOLDS.labels("held")._value.get() >= holds + 3
            return bool(ended["status"] != "waiting" or held_again)

        await eventually(due_and_decided, within=30)
        release.set()

        async def settled() -> bool:
            return (await statuses())["o-1"]["status"] in ("exited", "completed")

        await eventually(settled, within=30)
        found = (await statuses())["o-1"]
        r = await client.get(f"/v1/journeys/{journey}/report", params=params, headers=ADMIN)
        requested = r.json()["messages"]["requested"]
        if max_hold > 0:
            assert ended["status"] == "waiting", "the reminder did not wait for the payment"
            assert (found["status"], found["exit_reason"]) == ("exited", "goal:order.paid")
            assert requested == 0
        else:
            # Without the hold the reminder races the payment and wins: the failure the
            # watermark prevents.
            assert (found["status"], requested) == ("completed", 1)

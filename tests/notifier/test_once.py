"""The notifier's own idempotency (both modes, in process on the real bus and database):
a request repeated under new event ids — a journey replayed, a producer that retried —
names the same message, so it is stored once and the provider called once (a second call
would show as a second `sending` in the message's history, a second message as a second
row)."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from libs.common.bus import Message
from libs.common.db import Database
from libs.common.db.tables import processed_events
from libs.common.events import NotificationRequestedData, ShopData, new_event, topic_for
from libs.common.http import build_app
from libs.common.settings import Settings
from services.notifier.app import SPEC
from tests.campaigns.test_watermark import ADMIN, serving
from tests.conftest import eventually


async def test_a_request_repeated_under_new_event_ids_is_sent_once(settings: Settings) -> None:
    namespace = settings.topic_namespace
    shop = f"once-{uuid.uuid4().hex[:6]}"
    app = build_app(settings, [SPEC])
    runtime = app.state.runtime
    db = Database(settings.database_url_for("notifier"), "notifier")
    try:
        async with serving(app) as client:
            registered = new_event(
                type="shop.registered",
                shop_id=shop,
                source="test",
                data=ShopData(shop_id=shop, name="Once", timezone="Asia/Shanghai", currency="CNY"),
                subject=shop,
                id=f"{shop}-registered",
            )
            await runtime.bus.publish(
                [Message(topic_for(registered.type, namespace), shop, registered.to_bytes())]
            )
            params = {"shop_id": shop}
            template = {"name": "t", "channel": "sms", "locales": {"zh-CN": {"text": "您好"}}}

            async def template_saved() -> bool:
                r = await client.post("/v1/templates", params=params, json=template, headers=ADMIN)
                return r.status_code in (201, 409)

            await eventually(template_saved)
            requests = [
                new_event(
                    type="notification.requested",
                    shop_id=shop,
                    source="test",
                    data=NotificationRequestedData(
                        idempotency_key=f"{shop}:j:v1:send:e1",
                        channel="sms",
                        customer_id="c-1",
                        template="t",
                        to="+8613800138000",
                    ),
                    subject="c-1",
                    id=f"{shop}-request-{n}",  # a new event id each time
                )
                for n in range(3)
            ]
            for request in requests:  # one publish (and so at least one batch) each
                await runtime.bus.publish(
                    [Message(topic_for(request.type, namespace), request.key, request.to_bytes())]
                )

            async def handled() -> int:
                async with db.connect() as conn:
                    found: int = (
                        await conn.execute(
                            select(func.count())
                            .select_from(processed_events)
                            .where(processed_events.c.event_id.like(f"{shop}|%request-%"))
                        )
                    ).scalar_one()
                return found

            async def all_handled_and_sent() -> bool:
                r = await client.get("/v1/messages", params=params, headers=ADMIN)
                items = r.json()["items"]
                return (
                    await handled() == 3
                    and bool(items)
                    and all(i["status"] == "sent" for i in items)
                )

            await eventually(all_handled_and_sent)
            assert await handled() == 3  # every repeat consumed (none dead-lettered)
            r = await client.get("/v1/messages", params=params, headers=ADMIN)
            (message,) = r.json()["items"]
            r = await client.get(
                f"/v1/messages/{message['message_id']}", params=params, headers=ADMIN
            )
            history = [h["status"] for h in r.json()["status_history"]]
            assert history == ["queued", "sending", "sent"]
    finally:
        await db.dispose()

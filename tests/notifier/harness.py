"""The notifier service in the test's process, on the real bus and database of the mode
under test: a shop registered through the bus, its templates and channels set through the
API, requests published as campaigns publishes them, messages read through the API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import select

from libs.common.bus import Message
from libs.common.db import Database
from libs.common.db.tables import shops
from libs.common.events import (
    Envelope,
    NotificationRequestedData,
    ShopData,
    new_event,
    topic_for,
)
from libs.common.http import build_app
from libs.common.settings import Settings
from services.notifier.app import SPEC
from services.notifier.models import message_id_of
from tests.campaigns.test_watermark import ADMIN, serving
from tests.conftest import eventually


class Notifier:
    def __init__(self, client: httpx.AsyncClient, runtime: Any, settings: Settings) -> None:
        self.client = client
        self.runtime = runtime
        self.settings = settings
        self.shop = f"n-{uuid.uuid4().hex[:8]}"
        self.params = {"shop_id": self.shop}

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A route with the admin key, for this shop."""
        params = {**self.params, **kwargs.pop("params", {})}
        return await self.client.request(method, path, params=params, headers=ADMIN, **kwargs)

    async def register(self) -> None:
        registered = new_event(
            type="shop.registered",
            shop_id=self.shop,
            source="test",
            data=ShopData(
                shop_id=self.shop, name="惠投小店", timezone="Asia/Shanghai", currency="CNY"
            ),
            subject=self.shop,
            id=f"{self.shop}-registered",
        )
        await self.publish(registered)

        db = Database(self.settings.database_url_for("notifier"), "notifier")
        query = select(shops.c.name).where(shops.c.shop_id == self.shop)

        async def known() -> bool:
            async with db.connect() as conn:
                return (await conn.execute(query)).first() is not None

        try:
            await eventually(known)
            assert await known(), "the notifier never learnt of the shop"
        finally:
            await db.dispose()

    async def publish(self, event: Any) -> None:
        topic = topic_for(event.type, self.settings.topic_namespace)
        await self.runtime.bus.publish([Message(topic, event.key, event.to_bytes())])

    async def template(self, name: str, channel: str, text: str, **extra: Any) -> None:
        locale: dict[str, str] = {"text": text}
        if channel == "email":
            locale |= {"subject": "来自{{ shop.name }}", "html": f"<p>{text}</p>"}
        body = {"name": name, "channel": channel, "locales": {"zh-CN": locale}, **extra}
        r = await self.call("POST", "/v1/templates", json=body)
        assert r.status_code == 201, r.text

    async def channel(self, channel: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.call("PUT", f"/v1/channels/{channel}", json=body)
        assert r.status_code == 200, r.text
        found: dict[str, Any] = r.json()
        return found

    def requested(
        self,
        key: str,
        *,
        channel: str,
        template: str,
        to: str,
        customer: str = "c-1",
        category: str = "transactional",
        variables: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Envelope:
        """One `notification.requested` as campaigns emits it (`extra`: its additive
        fields, e.g. the recipient's `timezone`)."""
        data = NotificationRequestedData.model_validate(
            {
                "idempotency_key": f"{self.shop}:{key}",
                "channel": channel,
                "customer_id": customer,
                "template": template,
                "to": to,
                "variables": variables or {"order": {"id": f"o-{key}"}},
                "category": category,
                **extra,
            }
        )
        return new_event(
            type="notification.requested",
            shop_id=self.shop,
            source="test",
            data=data,
            subject=customer,
            id=f"{self.shop}-{key}",
        )

    def message_id(self, key: str) -> str:
        return message_id_of(self.shop, f"{self.shop}:{key}")

    async def request(self, key: str, **kwargs: Any) -> str:
        """Publish one `notification.requested` (see `requested`); its message's id."""
        await self.publish(self.requested(key, **kwargs))
        return self.message_id(key)

    async def message(self, message_id: str) -> dict[str, Any] | None:
        r = await self.call("GET", f"/v1/messages/{message_id}")
        if r.status_code == 404:
            return None
        assert r.status_code == 200, r.text
        found: dict[str, Any] = r.json()
        return found

    async def settled(self, message_id: str, *statuses: str) -> dict[str, Any]:
        """The message once its status is one of `statuses`."""
        seen: dict[str, Any] = {}

        async def reached() -> bool:
            seen.clear()
            seen.update(await self.message(message_id) or {})
            return seen.get("status") in statuses

        await eventually(reached, within=60)
        assert seen.get("status") in statuses, seen
        return seen

    def history(self, message: dict[str, Any]) -> list[str]:
        return [h["status"] for h in message["status_history"]]


SHARED: dict[str, Any] = {
    "public_url": "https://crm.example.com",
    "notifier_retry_base_s": 0.2,
    "notifier_reconcile_after_s": 2,
}
"""The shared app's settings: links on a public URL of their own, and retries and
reconciliations in fractions of the defaults (the same code paths)."""


@dataclass
class NotifierApp:
    client: httpx.AsyncClient
    runtime: Any
    settings: Settings

    async def new_shop(self) -> Notifier:
        """A shop of its own on the shared app (tests never see each other's data)."""
        notifier = Notifier(self.client, self.runtime, self.settings)
        await notifier.register()
        return notifier


@asynccontextmanager
async def serving_notifier(settings: Settings) -> AsyncIterator[NotifierApp]:
    """The notifier service in this process, on the mode's bus and database."""
    app = build_app(settings, [SPEC])
    async with serving(app) as client:
        yield NotifierApp(client, app.state.runtime, settings)

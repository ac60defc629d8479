"""Receiving a delivery: read, verify, normalise, publish once, answer.

Every route that takes events from outside (platform webhooks, carrier pushes, the
canonical API) goes through `publish_once`: events already published within the
senders' retry horizon (the ledger, keyed by CloudEvents source + id) are dropped, the
rest are published and acknowledged by the bus, and only then recorded and answered 2xx.
If the bus does not acknowledge, the answer is 503 with `Retry-After` and nothing is
recorded, so the sender's retry publishes again (a partial publish is completed by that
retry and deduplicated downstream by event id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus import BusUnavailable
from libs.common.db import Database
from libs.common.db.dialect import insert_ignore
from libs.common.db.group_commit import GroupCommitter
from libs.common.events import Envelope
from libs.common.problems import Problem
from libs.common.service import ServiceContext
from libs.common.timers import Recurring
from services.ingest import metrics
from services.ingest.handlers import active_secrets, publish_events
from services.ingest.models import ingest_ledger, shops
from services.ingest.platforms.aftership import AfterShipAdapter
from services.ingest.platforms.base import PlatformAdapter, ShopContext
from services.ingest.platforms.kuaidi100 import Kuaidi100Adapter
from services.ingest.platforms.shopify import ShopifyAdapter
from services.ingest.platforms.taobao import TaobaoAdapter
from services.ingest.platforms.woocommerce import WooCommerceAdapter

RETRY_AFTER_S = "5"
log = logging.getLogger(__name__)

PLATFORMS: Mapping[str, PlatformAdapter] = {
    "shopify": ShopifyAdapter(),
    "woocommerce": WooCommerceAdapter(),
    "taobao": TaobaoAdapter(),
}
"""`POST /v1/webhooks/{platform}/{shop_id}`."""

CARRIERS: Mapping[str, PlatformAdapter] = {
    "kuaidi100": Kuaidi100Adapter(),
    "aftership": AfterShipAdapter(),
}
"""`POST /v1/logistics/{provider}/{shop_id}`."""


class ShopDirectory:
    """Shops and their webhook secrets as the hot path needs them, cached for a few
    seconds (shops change rarely; every request used to cost two queries). A rotation is
    seen at once by this process and within `ttl` seconds by other ingest replicas."""

    def __init__(self, db: Database, ttl: float = 5.0) -> None:
        self.db = db
        self.ttl = ttl
        self._shops: dict[str, tuple[float, ShopContext]] = {}
        self._secrets: dict[tuple[str, str], tuple[float, list[str]]] = {}

    def forget(self, shop_id: str) -> None:
        self._shops.pop(shop_id, None)
        for key in [k for k in self._secrets if k[0] == shop_id]:
            del self._secrets[key]

    async def context(self, shop_id: str) -> ShopContext:
        """The shop, or 404 (unknown shops are not cached: they may be created any time)."""
        cached = self._shops.get(shop_id)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        async with self.db.connect() as conn:
            row = (
                await conn.execute(
                    select(shops.c.shop_id, shops.c.currency, shops.c.timezone).where(
                        shops.c.shop_id == shop_id
                    )
                )
            ).first()
        if row is None:
            raise Problem(404, f"unknown shop {shop_id!r}")
        shop = ShopContext(shop_id=row.shop_id, currency=row.currency, timezone=row.timezone)
        self._shops[shop_id] = (time.monotonic() + self.ttl, shop)
        return shop

    async def secrets(self, shop_id: str, platform: str) -> list[str]:
        cached = self._secrets.get((shop_id, platform))
        if cached and cached[0] > time.monotonic():
            return cached[1]
        async with self.db.connect() as conn:
            found = await active_secrets(conn, shop_id, platform)
        self._secrets[(shop_id, platform)] = (time.monotonic() + self.ttl, found)
        return found


class Ledger:
    """Publishes events once within the dedupe horizon; ledger writes are group-committed
    (one transaction per round of concurrent requests)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.writer = GroupCommitter(ctx.db, self._record, name="ingest-ledger")
        self._pending: set[asyncio.Task[None]] = set()
        self._unrecorded: set[tuple[str, str]] = set()
        """Published in this process, ledger row not committed yet: still duplicates."""

    def _remember(self, rows: list[dict[str, Any]]) -> None:
        """Record published ids without holding the answer for it: the events are already
        durable, and a record lost to a crash costs at most a duplicate that consumers
        drop by id."""
        keys = {(row["shop_id"], row["dedupe_key"]) for row in rows}
        self._unrecorded |= keys
        task = asyncio.create_task(self.writer.submit(rows))
        self._pending.add(task)
        task.add_done_callback(lambda done: self._recorded(done, keys))

    def _recorded(self, task: asyncio.Task[None], keys: set[tuple[str, str]]) -> None:
        self._pending.discard(task)
        self._unrecorded -= keys
        if not task.cancelled() and task.exception() is not None:
            log.warning("ingest ledger write failed", extra={"error": repr(task.exception())})

    @staticmethod
    async def _record(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
        await conn.execute(insert_ignore(conn, ingest_ledger), rows)

    async def publish_once(self, events: Sequence[Envelope], platform: str) -> tuple[int, int]:
        """Publish the events not published before; returns (published, duplicates)."""
        ctx = self.ctx
        unique = list({(e.shop_id, e.dedupe_key): e for e in events}.values())
        now = datetime.now(UTC)
        async with ctx.db.connect() as conn:
            seen: set[tuple[str, str]] = set()
            for shop_id in {e.shop_id for e in unique}:
                keys = [e.dedupe_key for e in unique if e.shop_id == shop_id]
                rows = await conn.execute(
                    select(ingest_ledger.c.dedupe_key).where(
                        ingest_ledger.c.shop_id == shop_id,
                        ingest_ledger.c.dedupe_key.in_(keys),
                        ingest_ledger.c.expires_at > now,
                    )
                )
                seen.update((shop_id, key) for key in rows.scalars())
        seen |= self._unrecorded
        fresh = [e for e in unique if (e.shop_id, e.dedupe_key) not in seen]
        if fresh:
            started = time.perf_counter()
            try:
                await publish_events(ctx.bus, fresh, ctx.settings.topic_namespace)
            except BusUnavailable:
                raise Problem(
                    503,
                    "the event bus is unavailable; nothing was accepted, retry later",
                    headers={"Retry-After": RETRY_AFTER_S},
                ) from None
            metrics.BUS_ACK_SECONDS.labels(platform).observe(time.perf_counter() - started)
            expires = now + timedelta(hours=ctx.settings.dedupe_horizon_hours)
            self._remember(
                [
                    {"shop_id": e.shop_id, "dedupe_key": e.dedupe_key, "expires_at": expires}
                    for e in fresh
                ]
            )
            for e in fresh:
                metrics.EVENTS.labels(platform, e.type).inc()
        return len(fresh), len(events) - len(fresh)


async def _prune_ledger(conn: AsyncConnection, now: datetime) -> None:
    await conn.execute(delete(ingest_ledger).where(ingest_ledger.c.expires_at <= now))


PRUNE_LEDGER = Recurring("ingest.prune_ledger", timedelta(hours=1), _prune_ledger)
"""Forget published events past the senders' retry horizon, every hour."""

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
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, String, bindparam, delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus import BusUnavailable
from libs.common.db import Database
from libs.common.db.dialect import insert_ignore
from libs.common.db.group_commit import GroupCommitter
from libs.common.db.held import HeldReads
from libs.common.db.keysets import columns_of, insert_select, reused, rows_of, rows_params
from libs.common.events import BEHAVIOR_TYPES, ORDER_TYPES, Envelope
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


def foreign_money(
    events: Sequence[Envelope], currency_of: Mapping[str, str], *, numbered: bool
) -> list[dict[str, str]]:
    """The money of order and behavior events that is not in its shop's currency, as
    problem entries naming the field (`[1].data.items.0.price.currency` when `numbered`).

    One shop, one currency: a shop's RFM, member levels and overview add its amounts up,
    and amounts in two currencies cannot be added, so ingest refuses (422) money in any
    currency but the one the shop is registered with (`POST /v1/shops`, `PATCH` to change
    it), whether it comes through the canonical API or from a platform after normalising.
    """
    errors: list[dict[str, str]] = []
    for index, event in enumerate(events):
        if event.type not in ORDER_TYPES and event.type not in BEHAVIOR_TYPES:
            continue
        expected = currency_of[event.shop_id]
        data = event.data
        spots: list[tuple[str, Any]] = [(name, data.get(name)) for name in ("total", "refund")]
        spots.append(("price", data.get("price")))
        items = data.get("items")
        for number, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict):
                spots.append((f"items.{number}.price", item.get("price")))
        prefix = f"[{index}]." if numbered else ""
        for path, money in spots:
            if isinstance(money, dict) and money.get("currency", expected) != expected:
                errors.append(
                    {
                        "field": f"{prefix}data.{path}.currency",
                        "message": f"{money['currency']} is not the currency of shop "
                        f"{event.shop_id!r} ({expected}); a shop takes one currency",
                    }
                )
    return errors


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


@dataclass
class _Delivery:
    """One request's events waiting for the next publishing round."""

    events: list[Envelope]
    platform: str
    answer: asyncio.Future[tuple[int, int]]


class Ledger:
    """Publishes events once within the dedupe horizon, in rounds.

    Every request's events join the next round; a round looks up all of its keys in the
    ledger with one statement, publishes every fresh event with one bus call, records
    them (group-committed, without holding the answers) and then answers every request
    in it. Rounds run one at a time, so an event in two concurrent requests is published
    once (the later request counts it a duplicate only after the bus acknowledged it);
    under load a round grows with the number of requests waiting, and the per-request
    cost of the lookup and the bus round trip shrinks accordingly.
    """

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.writer = GroupCommitter(
            ctx.db, self._record, name="ingest-ledger", timeout=ctx.settings.bus_publish_timeout_s
        )
        self._reads = HeldReads(ctx.db)
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue()
        self._rounds: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._unrecorded: set[tuple[str, str]] = set()
        """Published in this process, ledger row not committed yet: still duplicates."""

    async def start(self) -> None:
        await self.writer.start()
        self._rounds = asyncio.create_task(self._run(), name="ingest-publish-rounds")

    async def stop(self) -> None:
        if self._rounds is not None:
            self._rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rounds
            self._rounds = None
        if self._pending:
            await asyncio.wait(self._pending)
        await self.writer.stop()
        await self._reads.close()

    async def publish_once(self, events: Sequence[Envelope], platform: str) -> tuple[int, int]:
        """Publish the events not published before; returns (published, duplicates).
        Raises 503 when the bus did not acknowledge them (then none counts as published)."""
        if self._rounds is None or self._rounds.done():
            raise Problem(503, "ingest is not running", headers={"Retry-After": RETRY_AFTER_S})
        answer: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Delivery(list(events), platform, answer))
        return await answer

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._round(batch)
            except Exception as exc:  # a failed lookup: every request of the round retries
                log.warning("ingest publishing round failed", extra={"error": repr(exc)})
                for delivery in batch:
                    if not delivery.answer.done():
                        delivery.answer.set_exception(
                            Problem(
                                503,
                                "ingest could not check or publish the events; retry later",
                                headers={"Retry-After": RETRY_AFTER_S},
                            )
                        )

    async def _round(self, batch: list[_Delivery]) -> None:
        now = datetime.now(UTC)
        keys = {(e.shop_id, e.dedupe_key) for d in batch for e in d.events}
        # Taken before the ledger's snapshot: a key whose row commits during the lookup
        # (after its snapshot began) leaves `_unrecorded` then, yet is still counted here.
        unrecorded = keys & self._unrecorded
        seen = await self._published_before(keys, now) | unrecorded
        fresh: list[tuple[_Delivery, list[Envelope]]] = []
        for delivery in batch:
            mine: list[Envelope] = []
            for event in delivery.events:
                key = (event.shop_id, event.dedupe_key)
                if key not in seen:
                    seen.add(key)
                    mine.append(event)
            fresh.append((delivery, mine))
        to_publish = [e for _, mine in fresh for e in mine]
        if to_publish:
            started = time.perf_counter()
            try:
                await publish_events(self.ctx.bus, to_publish, self.ctx.settings.topic_namespace)
            except BusUnavailable:
                unavailable = Problem(
                    503,
                    "the event bus is unavailable; nothing was accepted, retry later",
                    headers={"Retry-After": RETRY_AFTER_S},
                )
                for delivery in batch:
                    if not delivery.answer.done():
                        delivery.answer.set_exception(unavailable)
                return
            elapsed = time.perf_counter() - started
            expires = now + timedelta(hours=self.ctx.settings.dedupe_horizon_hours)
            self._remember(
                [
                    {"shop_id": e.shop_id, "dedupe_key": e.dedupe_key, "expires_at": expires}
                    for e in to_publish
                ]
            )
        for delivery, mine in fresh:
            if mine:
                metrics.BUS_ACK_SECONDS.labels(delivery.platform).observe(elapsed)
                for type_, count in Counter(e.type for e in mine).items():
                    metrics.EVENTS.labels(delivery.platform, type_).inc(count)
            if not delivery.answer.done():
                delivery.answer.set_result((len(mine), len(delivery.events) - len(mine)))

    async def _published_before(
        self, keys: set[tuple[str, str]], now: datetime
    ) -> set[tuple[str, str]]:
        """The keys already in the ledger: one statement of a fixed shape for any number
        of keys (see `keysets`), so it is compiled and prepared once."""
        async with self._reads.connection() as conn:
            rows = await conn.execute(
                reused(conn, "ingest.published_before", lambda: _published_before(conn)),
                {**rows_params(conn, "k", _KEY_COLUMNS, list(keys)), "now": now},
            )
            return {(row[0], row[1]) for row in rows}

    def _remember(self, rows: list[dict[str, Any]]) -> None:
        """Record published ids without holding the answers for it: the events are
        already durable, and a record lost to a crash costs at most a duplicate that
        consumers drop by id."""
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
        """One statement for the whole group (`keysets`), not one row per execution."""
        stmt = reused(
            conn,
            "ingest.ledger.insert",
            lambda: insert_ignore(
                conn, ingest_ledger, insert_select(conn, ingest_ledger, _LEDGER_ROW, None)
            ),
        )
        values = [tuple(row[c] for c in _LEDGER_ROW) for row in rows]
        await conn.execute(
            stmt, rows_params(conn, "new", columns_of(ingest_ledger, _LEDGER_ROW), values)
        )


_KEY_COLUMNS = [("shop_id", String()), ("dedupe_key", String())]
_LEDGER_ROW = ("shop_id", "dedupe_key", "expires_at")


def _published_before(conn: AsyncConnection) -> Select[Any]:
    """The ledger's unexpired rows among a set of keys given as `rows_params("k", …)`:
    one statement of a fixed shape for any number of keys (see `keysets`)."""
    led = ingest_ledger.c
    keys = rows_of(conn, "k", _KEY_COLUMNS, None)
    return select(led.shop_id, led.dedupe_key).where(
        tuple_(led.shop_id, led.dedupe_key).in_(select(keys.c.shop_id, keys.c.dedupe_key)),
        led.expires_at > bindparam("now"),
    )


async def _prune_ledger(conn: AsyncConnection, now: datetime) -> None:
    await conn.execute(delete(ingest_ledger).where(ingest_ledger.c.expires_at <= now))


PRUNE_LEDGER = Recurring("ingest.prune_ledger", timedelta(hours=1), _prune_ledger)
"""Forget published events past the senders' retry horizon, every hour."""

"""Huitou as a user runs it: real processes started with the `huitou` CLI.

Embedded: one `huitou up` process. Distributed: `huitou serve <service>` for each of the
four services, on PostgreSQL and the Kafka broker. Either way the test talks HTTP to it
and can kill (SIGKILL) and restart a service to prove nothing is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from aiokafka.partitioner import murmur2
from sqlalchemy import and_, or_, select

from libs.common.bus.embedded import bus_messages, bus_offsets, partition_for
from libs.common.db import Database
from libs.common.db.tables import processed_events
from libs.common.events import parse_event, topic_name
from libs.common.settings import Settings
from tests.servers import free_port, wait_for_port

SERVICES = ("ingest", "lifecycle", "campaigns", "notifier")
ROUTES = {
    "ingest": ("/v1/shops", "/v1/events", "/v1/webhooks", "/v1/logistics"),
    "lifecycle": (
        "/v1/customers",
        "/v1/overview",
        "/v1/tags",
        "/v1/segments",
        "/v1/policy",
        "/v1/models",
        "/v1/forecasts",
    ),
    "campaigns": ("/v1/journeys", "/v1/playbooks", "/v1/promotions"),
    "notifier": (
        "/v1/messages",
        "/v1/channels",
        "/v1/templates",
        "/v1/consent",
        "/v1/notifier",
        "/v1/callbacks",
        "/v1/unsubscribe",
    ),
}


class Platform:
    """Started processes plus an HTTP client that routes each path to its service."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.embedded = settings.database_url is None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.admin_key = settings.admin_key or "test-admin-key"
        self._settle_key: str | None = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUITOU_")}
        s = self.settings
        env.update(
            HUITOU_DATA_DIR=str(s.data_dir),
            HUITOU_ADMIN_KEY=self.admin_key,
            HUITOU_TOPIC_NAMESPACE=s.topic_namespace,
            HUITOU_TOPIC_PARTITIONS=str(s.topic_partitions),
            HUITOU_EMBEDDED_PARTITIONS=str(s.embedded_partitions),
            HUITOU_KAFKA_IDEMPOTENCE=str(s.kafka_idempotence).lower(),
            HUITOU_TOPIC_REPLICATION_FACTOR=str(s.topic_replication_factor),
            HUITOU_TOPIC_MIN_INSYNC_REPLICAS=str(s.topic_min_insync_replicas),
            HUITOU_TIMER_POLL_INTERVAL_S="0.2",
            HUITOU_CONSUMER_BATCH_SIZE=str(s.consumer_batch_size),
            HUITOU_CONSUMER_SESSION_TIMEOUT_MS=str(s.consumer_session_timeout_ms),
            HUITOU_TIMER_BATCH_SIZE=str(s.timer_batch_size),
            HUITOU_BUS_PUBLISH_TIMEOUT_S=str(s.bus_publish_timeout_s),
            HUITOU_NOTIFIER_RECONCILE_AFTER_S=str(s.notifier_reconcile_after_s),
        )
        if s.database_url:
            env["HUITOU_DATABASE_URL"] = s.database_url
        if not self.embedded and "lifecycle" in self.ports:
            env["HUITOU_LIFECYCLE_URL"] = f"http://127.0.0.1:{self.ports['lifecycle']}"
        if not self.embedded and "notifier" in self.ports:
            env["HUITOU_NOTIFIER_URL"] = f"http://127.0.0.1:{self.ports['notifier']}"
        if not self.embedded and "campaigns" in self.ports:
            env["HUITOU_CAMPAIGNS_URL"] = f"http://127.0.0.1:{self.ports['campaigns']}"
        if s.bus_url:
            env["HUITOU_BUS_URL"] = s.bus_url
        return env

    def names(self) -> tuple[str, ...]:
        return ("platform",) if self.embedded else SERVICES

    async def start(self, name: str | None = None) -> None:
        """Start `name` (or every process) and wait until each answers `/readyz`; the
        processes start together (each joins its consumer groups on its own)."""
        names = [name] if name else list(self.names())
        for n in names:  # every port first: a service is told where the others listen
            self.ports.setdefault(n, free_port())
        for n in names:
            args = ["up"] if n == "platform" else ["serve", n.split("#", 1)[0]]
            self.processes[n] = self._spawn(n, [*args, "--port", str(self.ports[n])])

        async def ready(n: str) -> None:
            await asyncio.to_thread(wait_for_port, self.ports[n], 60)
            await self.wait_ready(n)

        await asyncio.gather(*(ready(n) for n in names))

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "services.cli", *args],
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_ready(self, name: str) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                try:
                    r = await client.get(f"http://127.0.0.1:{self.ports[name]}/readyz")
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{name} never became ready; see {self.workdir}/{name}.log")

    async def start_member(self, service: str) -> str:
        """Start one more process of `service` (another member of its consumer groups),
        named `service#n`; `take_over` makes it the one the client routes to."""
        n = 2
        while f"{service}#{n}" in self.processes:
            n += 1
        await self.start(f"{service}#{n}")
        return f"{service}#{n}"

    def take_over(self, member: str) -> None:
        """After the process of `member`'s service is gone, `member` serves the service."""
        service = member.split("#", 1)[0]
        assert service not in self.processes, "kill the service's own process first"
        self.processes[service] = self.processes.pop(member)
        self.ports[service] = self.ports.pop(member)

    def pause(self, name: str | None = None) -> None:
        """SIGSTOP: the process does nothing more until `resume`, mid-way wherever it was."""
        self.processes[name or self.names()[0]].send_signal(signal.SIGSTOP)

    def resume(self, name: str | None = None) -> None:
        self.processes[name or self.names()[0]].send_signal(signal.SIGCONT)

    def kill(self, name: str | None = None) -> None:
        """SIGKILL: no shutdown hook runs, in-flight batches are simply lost mid-way."""
        name = name or self.names()[0]
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGCONT)  # one a test left paused
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def url(self, path: str) -> str:
        if self.embedded:
            return f"http://127.0.0.1:{self.ports['platform']}{path}"
        for service, prefixes in ROUTES.items():
            if path.startswith(prefixes):
                return f"http://127.0.0.1:{self.ports[service]}{path}"
        raise ValueError(f"no service serves {path}")

    def service_url(self, name: str, path: str) -> str:
        port = self.ports["platform" if self.embedded else name]
        return f"http://127.0.0.1:{port}{path}"

    async def request(
        self, method: str, path: str, *, key: str | None = None, **kw: Any
    ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.request(method, self.url(path), headers=headers, **kw)

    async def create_shop(self, shop_id: str, **extra: Any) -> str:
        """Register a shop and return a fresh shop key, once every service knows it."""
        body = {
            "shop_id": shop_id,
            "name": shop_id.title(),
            "timezone": "Asia/Shanghai",
            "currency": "CNY",
            **extra,
        }
        r = await self.request("POST", "/v1/shops", key=self.admin_key, json=body)
        assert r.status_code == 201, r.text
        r = await self.request("POST", f"/v1/shops/{shop_id}/keys", key=self.admin_key)
        assert r.status_code == 201, r.text
        key: str = r.json()["key"]

        async def lifecycle_knows_key() -> bool:
            r = await self.request("GET", "/v1/overview", key=key)
            return r.status_code == 200

        await until(lifecycle_knows_key)
        return key

    # What the bus and the databases hold, for tests that must know where a message is.

    def partition_of(self, key: str) -> int:
        """The partition a message keyed `key` lands on (the embedded bus's crc32, or the
        Kafka client's default murmur2 partitioner), among `partitions()`."""
        if self.embedded:
            return partition_for(key, self.partitions())
        hashed: int = murmur2(key.encode())
        return (hashed & 0x7FFFFFFF) % self.partitions()

    def partitions(self) -> int:
        s = self.settings
        return s.embedded_partitions if self.embedded else s.topic_partitions

    async def settle(self, types: Sequence[str] = ("order.created",)) -> None:
        """Wait until lifecycle has consumed everything published before this call on the
        topics of `types`, instead of sleeping and hoping.

        A marker event of each type goes to every partition of its topic: an event of a
        shop of markers only (so no tested shop sees them) whose partition key (the one
        ingest publishes it with, `Envelope.key`: the order for order events, the
        customer otherwise) lands on that partition. Ingest answered 2xx for every earlier
        event, so each lies before the marker of its partition, and a partition is
        consumed in order: once every marker is applied, so is everything before it.
        """
        if self._settle_key is None:
            self._settle_key = await self.create_shop(_SETTLE_SHOP)
        token = uuid.uuid4().hex[:8]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        events: list[dict[str, Any]] = []
        for type_ in types:
            chosen: dict[int, dict[str, Any]] = {}
            n = 0
            while len(chosen) < self.partitions():
                marker = _marker(_SETTLE_SHOP, f"{token}-{type_.split('.')[0]}-{n}", type_, now)
                chosen.setdefault(self.partition_of(parse_event(marker).key), marker)
                n += 1
            events += chosen.values()
        key = self._settle_key
        r = await self.request("POST", "/v1/events", key=key, json=events)
        assert r.status_code == 202, r.text
        pending = {e["subject"] for e in events}

        async def all_applied() -> bool:
            for cid in list(pending):
                r = await self.request("GET", f"/v1/customers/{cid}", key=key)
                if r.status_code == 200:
                    pending.discard(cid)
            return not pending

        await until(all_applied)

    def database(self, service: str) -> Database:
        """The service's own database (dispose it after use)."""
        return Database(self.settings.database_url_for(service), service)

    async def uncommitted(self, group: str, logical_topics: Sequence[str]) -> list[bytes]:
        """The messages of `logical_topics` past `group`'s committed position on the
        embedded bus: what the group gets again when it starts (read while it is down)."""
        assert self.embedded, "the embedded bus only"
        topics = [topic_name(t, self.settings.topic_namespace) for t in logical_topics]
        db = Database(f"sqlite+aiosqlite:///{(self.settings.data_dir / 'bus.db').resolve()}", "bus")
        try:
            async with db.connect() as conn:
                committed = {
                    (t, p): pos
                    for t, p, pos in await conn.execute(
                        select(
                            bus_offsets.c.topic, bus_offsets.c.partition, bus_offsets.c.position
                        ).where(bus_offsets.c.group_id == group)
                    )
                }
                m = bus_messages.c
                past = [
                    and_(m.topic == t, m.partition == p, m.seq > committed.get((t, p), 0))
                    for t in topics
                    for p in range(self.partitions())
                ]
                rows = await conn.execute(select(m.value).where(or_(*past)).order_by(m.seq))
                return [bytes(v) for v in rows.scalars()]
        finally:
            await db.dispose()


async def processed(db: Database, consumer: str, keys: Collection[str]) -> set[str]:
    """Which of the dedupe `keys` the inbox of `consumer` in `db` has recorded: the events
    that consumer applied, in transactions that committed."""
    found: set[str] = set()
    batch = list(keys)
    async with db.connect() as conn:
        for start in range(0, len(batch), 500):
            found.update(
                (
                    await conn.execute(
                        select(processed_events.c.event_id).where(
                            processed_events.c.consumer == consumer,
                            processed_events.c.event_id.in_(batch[start : start + 500]),
                        )
                    )
                ).scalars()
            )
    return found


async def until(check: Callable[[], Awaitable[bool]], within: float = 60.0) -> None:
    """Poll `check` until it holds (waits for asynchronous work; asserts no speed), for at
    most `within` seconds of wall time however long each check takes."""
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.1)


_SETTLE_SHOP = "settle-markers"
"""The shop `Platform.settle` sends its markers as."""


def _marker(shop_id: str, customer: str, type_: str, now: str) -> dict[str, Any]:
    """A canonical event of `type_` (an order or a behaviour type) by `customer`."""
    if type_.startswith("order."):
        data: dict[str, Any] = {
            "order_id": f"{customer}-order",
            "customer": {"id": customer},
            "status": type_.split(".", 1)[1],
            "total": {"amount_minor": 1, "currency": "CNY"},
            "created_at": now,
        }
    else:
        data = {"customer": {"id": customer}, "sku": "settle-marker", "occurred_at": now}
    return {
        "specversion": "1.0",
        "id": f"{customer}-{type_}",
        "source": f"settle/{shop_id}",
        "type": type_,
        "time": now,
        "shop_id": shop_id,
        "subject": customer,
        "data": data,
    }

"""What an operator relies on: `/readyz` names a dead or stuck consumer, dead letters and
dead timers have a way back through the CLI (both modes), and `/docs` needs no CDN."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus import Message, Received, create_bus
from libs.common.bus.base import dead_letter_topic
from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.db.tables import dead_timers, timers
from libs.common.events import topic_name
from libs.common.http import build_app
from libs.common.service import ServiceParts, ServiceSpec, Subscription
from libs.common.settings import Settings
from tests.common import plumbing_migrations
from tests.conftest import eventually, make_settings

ROOT = Path(__file__).resolve().parents[2]


def spec(handler: Callable[[list[Received]], Any], topic: str = "ops") -> ServiceSpec:
    """A service of one consumer (group `ops.work`) and the usual timer worker."""

    def build(_ctx: Any) -> ServiceParts:
        return ServiceParts(
            router=APIRouter(), subscriptions=[Subscription("ops.work", [topic], handler)]
        )

    return ServiceSpec("ops", plumbing_migrations, build, projects_shops=False)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://huitou.test") as c:
            yield c


async def readyz(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/readyz")


async def test_readyz_names_a_stuck_consumer(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handler(batch: list[Received]) -> None:
        if any(r.value == b"hang" for r in batch):
            await release.wait()

    settings = make_settings("embedded", tmp_path, consumer_stuck_after_s=0.5)
    app = build_app(settings, [spec(handler)])
    async with serving(app) as client:
        r = await readyz(client)
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["consumer:ops.work"] == "ok"
        assert r.json()["checks"]["timers:ops"] == "ok"
        await app.state.runtime.bus.publish([Message("ops", "k", b"hang")])

        async def reported() -> bool:
            return (await readyz(client)).status_code == 503

        await eventually(reported)
        r = await readyz(client)
        assert r.status_code == 503
        assert r.json()["checks"]["consumer:ops.work"].startswith("stuck")
        assert r.json()["checks"]["timers:ops"] == "ok"
        release.set()
        await eventually(lambda: _is(readyz(client), 200))
        assert (await readyz(client)).status_code == 200


async def test_readyz_names_a_dead_consumer(tmp_path: Path) -> None:
    async def handler(batch: list[Received]) -> None:
        pass

    settings = make_settings("embedded", tmp_path)
    app = build_app(settings, [spec(handler)])
    async with serving(app) as client:
        assert (await readyz(client)).status_code == 200
        [consumer] = app.state.runtime.services[0].consumers

        def broken() -> dict[tuple[str, int], int]:
            raise RuntimeError("lost its partitions for good")

        consumer._source.lag = broken  # an unexpected error escapes the consumer loop
        await eventually(lambda: _is(readyz(client), 503))
        r = await readyz(client)
        assert r.status_code == 503
        assert r.headers["content-type"].startswith("application/problem+json")
        check = r.json()["checks"]["consumer:ops.work"]
        assert check.startswith("dead") and "lost its partitions for good" in check


async def test_docs_need_no_other_host(tmp_path: Path) -> None:
    app = build_app(make_settings("embedded", tmp_path), [spec(_ignore)])
    async with serving(app) as client:
        for page in ("/docs", "/redoc"):
            r = await client.get(page)
            assert r.status_code == 200
            urls = re.findall(r"https?://[^\s\"'<>)]+", r.text)
            assert urls == [], f"{page} refers to other hosts: {urls}"
            assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
            assert assets, page
            for asset in assets:
                got = await client.get(asset)
                assert got.status_code == 200, asset
                assert got.content
        scripts = re.findall(r'src="([^"]+)"', (await client.get("/docs")).text)
        assert [src for src in scripts if src.endswith("/swagger-ui-bundle.js")], scripts
        assert (await client.get(app.openapi_url or "")).status_code == 200


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`huitou …` as an operator runs it, with the environment of `settings`."""
    s = settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUITOU_")}
    env.update(
        HUITOU_DATA_DIR=str(s.data_dir),
        HUITOU_ADMIN_KEY="test-admin-key",
        HUITOU_TOPIC_NAMESPACE=s.topic_namespace,
        HUITOU_TOPIC_PARTITIONS=str(s.topic_partitions),
        HUITOU_TOPIC_REPLICATION_FACTOR=str(s.topic_replication_factor),
        HUITOU_TOPIC_MIN_INSYNC_REPLICAS=str(s.topic_min_insync_replicas),
        HUITOU_KAFKA_IDEMPOTENCE=str(s.kafka_idempotence).lower(),
        HUITOU_CONSUMER_SESSION_TIMEOUT_MS=str(s.consumer_session_timeout_ms),
        HUITOU_LOG_LEVEL="WARNING",
    )
    if s.database_url:
        env["HUITOU_DATABASE_URL"] = s.database_url
    if s.bus_url:
        env["HUITOU_BUS_URL"] = s.bus_url
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


async def test_dlt_replay_republishes_each_dead_letter_once(settings: Settings) -> None:
    orders = topic_name("orders", settings.topic_namespace)
    bus = create_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics([orders])
        dead = [
            Message(dead_letter_topic(orders), f"shop:c{i}", f"e{i}".encode(), {"ce_id": f"e{i}"})
            for i in range(2)
        ]
        await bus.publish([_dead(m) for m in dead])
        first = await asyncio.to_thread(cli, settings, "dlt", "replay", "orders")
        assert f"replayed 2 messages from {orders}.dlt to {orders}" in first.stdout
        again = await asyncio.to_thread(cli, settings, "dlt", "replay", orders)
        assert "replayed 0 messages" in again.stdout

        got: list[Received] = []

        async def collect(batch: list[Received]) -> None:
            got.extend(batch)

        reader = bus.consumer("ops-reader", [orders], collect)
        await reader.start()
        await eventually(lambda: _true(len(got) >= 2))
        await asyncio.sleep(0.5)
        await reader.stop()
    finally:
        await bus.stop()
    assert sorted(r.value for r in got) == [b"e0", b"e1"]
    for record in got:
        assert record.headers["ce_id"] == record.value.decode()
        assert "dlt_error" not in record.headers
        assert "dlt_replayed_from" in record.headers


async def test_timers_retry_makes_dead_timers_due_again(settings: Settings) -> None:
    db = Database(settings.database_url_for("notifier"), "notifier")
    await migrate(db, plumbing_migrations)  # the tables timers retry works on
    long_ago = datetime.now(UTC) - timedelta(days=3)
    try:
        async with db.begin() as conn:
            await conn.execute(
                dead_timers.insert(),
                [
                    {
                        "key": f"shop|t{i}",
                        "kind": "remind",
                        "shop_id": "shop",
                        "due_at": long_ago,
                        "payload": f'{{"n": {i}}}',
                        "attempts": 10,
                        "last_error": "ValueError('boom')",
                        "died_at": long_ago,
                    }
                    for i in range(3)
                ],
            )
            await _schedule_raw(conn, "shop|t2", long_ago + timedelta(days=10))
        before = datetime.now(UTC)
        done = await asyncio.to_thread(cli, settings, "timers", "retry", "--service", "notifier")
        assert "notifier: 2 dead timers due again, 1 dropped" in done.stdout
        async with db.connect() as conn:
            assert (await conn.execute(select(dead_timers))).all() == []
            rows = {r.key: r for r in (await conn.execute(select(timers))).all()}
    finally:
        await db.dispose()
    assert set(rows) == {"shop|t0", "shop|t1", "shop|t2"}
    for key in ("shop|t0", "shop|t1"):
        assert rows[key].attempts == 0
        assert before - timedelta(minutes=1) <= rows[key].due_at <= datetime.now(UTC)
    assert rows["shop|t0"].payload == '{"n": 0}'
    assert rows["shop|t2"].due_at > datetime.now(UTC), "the pending one was kept"


async def _schedule_raw(conn: AsyncConnection, key: str, due: datetime) -> None:
    await conn.execute(
        timers.insert().values(
            key=key, kind="remind", shop_id="shop", due_at=due, payload="{}", attempts=0
        )
    )


def _dead(message: Message) -> Message:
    headers = {**message.headers, "dlt_error": "ValueError('x')", "dlt_group": "g"}
    return Message(message.topic, message.key, message.value, headers)


async def _ignore(batch: list[Received]) -> None:
    pass


async def _is(response: Any, status: int) -> bool:
    return bool((await response).status_code == status)


async def _true(value: bool) -> bool:
    return value

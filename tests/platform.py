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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from libs.common.settings import Settings
from tests.servers import free_port, wait_for_port

SERVICES = ("ingest", "lifecycle", "campaigns", "notifier")
ROUTES = {
    "ingest": ("/v1/shops", "/v1/events", "/v1/webhooks", "/v1/logistics"),
    "lifecycle": ("/v1/customers", "/v1/overview", "/v1/tags", "/v1/segments", "/v1/policy"),
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

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUITOU_")}
        s = self.settings
        env.update(
            HUITOU_DATA_DIR=str(s.data_dir),
            HUITOU_ADMIN_KEY=self.admin_key,
            HUITOU_TOPIC_NAMESPACE=s.topic_namespace,
            HUITOU_TOPIC_PARTITIONS=str(s.topic_partitions),
            HUITOU_KAFKA_IDEMPOTENCE=str(s.kafka_idempotence).lower(),
            HUITOU_TIMER_POLL_INTERVAL_S="0.2",
            HUITOU_CONSUMER_BATCH_SIZE=str(s.consumer_batch_size),
            HUITOU_BUS_PUBLISH_TIMEOUT_S=str(s.bus_publish_timeout_s),
        )
        if s.database_url:
            env["HUITOU_DATABASE_URL"] = s.database_url
        if s.bus_url:
            env["HUITOU_BUS_URL"] = s.bus_url
        return env

    def names(self) -> tuple[str, ...]:
        return ("platform",) if self.embedded else SERVICES

    async def start(self, name: str | None = None) -> None:
        for n in [name] if name else self.names():
            port = self.ports.setdefault(n, free_port())
            args = ["up"] if n == "platform" else ["serve", n]
            self.processes[n] = self._spawn(n, [*args, "--port", str(port)])
            await asyncio.to_thread(wait_for_port, port, 60)
            await self.wait_ready(n)

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

    def kill(self, name: str | None = None) -> None:
        """SIGKILL: no shutdown hook runs, in-flight batches are simply lost mid-way."""
        name = name or self.names()[0]
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
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


async def until(check: Callable[[], Awaitable[bool]], within: float = 60.0) -> None:
    """Poll `check` until it holds (waits for asynchronous work; asserts no speed)."""
    for _ in range(int(within / 0.1)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition never became true")

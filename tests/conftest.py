"""Fixtures: the real servers, fresh databases, and settings for both modes."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from libs.common.settings import Settings
from tests.metrics_check import cardinality_problems, scrape
from tests.platform import Platform
from tests.servers import SINGLE_BROKER, Broker, fresh_database, kafka_broker, postgres

MODES = ["embedded", "distributed"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def pg_url(workdir: Path) -> Iterator[str]:
    with postgres(workdir) as url:
        yield url


@pytest.fixture(scope="session")
def broker(workdir: Path) -> Iterator[Broker]:
    with kafka_broker(workdir) as b:
        yield b


def make_settings(
    mode: str, tmp_path: Path, *, pg: str | None = None, bus: str | None = None, **extra: Any
) -> Settings:
    """Settings for a test: embedded (SQLite + embedded bus in tmp_path) or distributed
    (the given PostgreSQL database and broker, topics in a namespace of their own)."""
    base: dict[str, Any] = {
        "data_dir": tmp_path,
        "admin_key": "test-admin-key",
        "consumer_retry_backoff_s": 0.01,
        "timer_poll_interval_s": 0.05,
    }
    if mode == "distributed":
        base.update(
            database_url=pg,
            bus_url=bus,
            topic_partitions=4,
            # Tansu holds a group join for half the session: joins take 2 s, not 5 s.
            consumer_session_timeout_ms=4_000,
            topic_namespace=f"t{uuid.uuid4().hex[:8]}.",
            kafka_idempotence=os.environ.get("HUITOU_TEST_KAFKA_IDEMPOTENCE") == "1",
            **SINGLE_BROKER,
        )
    base.update(extra)
    return Settings(**base)


@pytest.fixture(params=MODES)
async def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings in each mode; the distributed one starts PostgreSQL and the broker."""
    if request.param == "embedded":
        return make_settings("embedded", tmp_path)
    pg = await fresh_database(request.getfixturevalue("pg_url"))
    broker: Broker = request.getfixturevalue("broker")
    return make_settings("distributed", tmp_path, pg=pg, bus=broker.url)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 30.0, every: float = 0.05
) -> None:
    """Wait until `check()` is true; fail with the test's own assertion afterwards if not.

    This waits for asynchronous work to finish; it asserts nothing about speed."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(every)


@asynccontextmanager
async def running_platform(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    **extra: Any,
) -> AsyncIterator[Platform]:
    """A platform in `request.param`'s mode with these settings, stopped afterwards."""
    workdir = tmp_path_factory.mktemp(f"{name}-{request.param}")
    if request.param == "embedded":
        settings = make_settings("embedded", workdir, **extra)
    else:
        pg = await fresh_database(request.getfixturevalue("pg_url"))
        bus = request.getfixturevalue("broker").url
        settings = make_settings("distributed", workdir, pg=pg, bus=bus, **extra)
    started = Platform(settings, workdir)
    await started.start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session", params=MODES)
async def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    """Huitou started as a user starts it: `huitou up` (embedded), or `huitou serve` per
    service on PostgreSQL and the broker (distributed). Small consumer batches make a
    backlog (of events or due timers) take many transactions, so a kill lands in the
    middle of one."""
    async with running_platform(
        request,
        tmp_path_factory,
        "platform",
        consumer_batch_size=10,
        timer_batch_size=20,
        bus_publish_timeout_s=2,
        # A provider call cut off by a kill is asked about after 3 s, not a minute.
        notifier_reconcile_after_s=3,
    ) as started:
        yield started
        # After every test that used it: each process's metrics stay bounded.
        problems = await scrape_problems(started)
        assert not problems, "\n".join(problems)


async def scrape_problems(platform: Platform) -> list[str]:
    """Cardinality problems in the `/metrics` of every running process of the platform."""
    return [
        problem
        for name, exposition in (await scrape(platform)).items()
        for problem in cardinality_problems(exposition, name)
    ]


@pytest.fixture(scope="module", params=MODES)
async def replay_platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    """A platform with the default (production) batch sizes, one per test module, for
    replays of thousands of events: the session's platform consumes ten per transaction."""
    async with running_platform(request, tmp_path_factory, "replay") as started:
        yield started


EARLY = ("test_bench_smoke",)
"""Modules whose long runs (minutes of mostly waiting on processes they start) begin with
the session, beside the other tests; their tests then wait for what they check. (The
fuzz was tried too: the suite took no less, the tests beside it only ran slower.)"""


def pytest_collection_finish(session: pytest.Session) -> None:
    factory: pytest.TempPathFactory = getattr(session.config, "_tmp_path_factory")  # noqa: B009
    for name in EARLY:
        if any(item.nodeid.startswith(f"tests/{name}.py") for item in session.items):
            module = importlib.import_module(f"tests.{name}")
            module.start(factory.mktemp(name.removeprefix("test_")))


def pytest_sessionfinish(session: pytest.Session) -> None:
    for name in EARLY:
        module = sys.modules.get(f"tests.{name}")
        if module is not None:
            module.stop()


def pytest_configure(config: pytest.Config) -> None:
    """Log hygiene (tests/log_capture.py): record the in-process logs and, when the session
    ends, scan every log it wrote for phones, emails, secrets and keys."""
    from tests.log_capture import LogHygiene

    config.pluginmanager.register(LogHygiene(config), "huitou-log-hygiene")

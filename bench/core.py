"""What every path shares: sizes, measurements, the run, the servers of a mode, profiling."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import infra
from bench.profiles import summarize
from bench.stats import Stat
from libs.common.settings import Settings
from tests.servers import SINGLE_BROKER

MODES = ("embedded", "distributed")
PATHS = (
    "ingest",
    "lifecycle",
    "e2e",
    "timers",
    "campaigns",
    "notifier",
    "memory",
    "soak",
    "prediction",
    "celery",
)
EMBEDDED_ONLY = ("prediction",)
"""Paths that never touch the stack: measured once, in the embedded mode."""


@dataclass(frozen=True)
class Size:
    """How big and how long each path runs; `smoke` < `quick` < `full`."""

    name: str
    repeats: int
    ingest_seconds: float
    connections: int
    lifecycle_events: int
    lifecycle_customers: int
    lifecycle_history_events: int
    """Events of each run at 1, 10 and 100 orders per customer (at most lifecycle_events)."""
    e2e_rate: int
    """Steady webhooks per second in distributed mode."""
    e2e_seconds: float
    e2e_ladder: tuple[int, ...]
    """Rates tried in embedded mode, lowest first; the highest one held is reported."""
    e2e_step_seconds: float
    timers_pending: int
    timers_backlog: int
    """Due timers drained per fire-rate measurement (on top of the pending ones)."""
    timers_skew_seconds: float
    celery_hold: int
    celery_fire: int
    celery_hold_seconds: float
    """Longest the run waits for Celery's worker to take in `celery_hold` reminders."""
    memory_events: int
    memory_checkpoints: int
    prediction_customers: int
    soak_seconds: float
    soak_rate: tuple[int, int]
    """Steady webhooks per second of the soak: embedded, distributed."""
    soak_sample_s: float
    distributed_paths: tuple[str, ...] = PATHS
    warmup_s: float = 1.0
    """Load before each measured ingest run (and once before the end-to-end runs)."""
    timer_phases: tuple[str, ...] = ("x1", "raw1", "x2", "raw2", "cancel", "skew")


SIZES = {
    "smoke": Size(
        name="smoke",
        repeats=1,
        ingest_seconds=1,
        connections=32,
        lifecycle_events=1_000,
        lifecycle_customers=100,
        lifecycle_history_events=1_000,
        e2e_rate=25,
        e2e_seconds=2,
        e2e_ladder=(25,),
        e2e_step_seconds=2,
        timers_pending=5_000,
        timers_backlog=1_000,
        timers_skew_seconds=1,
        celery_hold=0,
        celery_fire=0,
        celery_hold_seconds=0,
        memory_events=2_000,
        memory_checkpoints=2,
        prediction_customers=20_000,
        soak_seconds=5,
        soak_rate=(20, 20),
        soak_sample_s=1,
        distributed_paths=("timers",),
        timer_phases=("x1", "raw1", "skew"),
        warmup_s=0,
    ),
    "quick": Size(
        name="quick",
        repeats=3,
        ingest_seconds=2,
        connections=64,
        lifecycle_events=5_000,
        lifecycle_customers=500,
        lifecycle_history_events=5_000,
        e2e_rate=1_000,
        e2e_seconds=5,
        e2e_ladder=(100, 250, 500, 1_000),
        e2e_step_seconds=3,
        timers_pending=50_000,
        timers_backlog=20_000,
        timers_skew_seconds=2,
        celery_hold=5_000,
        celery_fire=2_000,
        celery_hold_seconds=30,
        memory_events=10_000,
        memory_checkpoints=3,
        prediction_customers=200_000,
        soak_seconds=60,
        soak_rate=(100, 200),
        soak_sample_s=5,
        warmup_s=0.5,
    ),
    "full": Size(
        name="full",
        repeats=3,
        ingest_seconds=10,
        connections=64,
        lifecycle_events=200_000,
        lifecycle_customers=20_000,
        lifecycle_history_events=50_000,
        e2e_rate=1_000,
        e2e_seconds=60,
        e2e_ladder=(100, 250, 500, 750, 1_000, 1_500),
        e2e_step_seconds=10,
        timers_pending=1_000_000,
        timers_backlog=100_000,
        timers_skew_seconds=10,
        # Celery keeps every countdown reminder in the worker's RAM (≈ 9 kB each): 200,000
        # is ~2 GB; a million would need ~9 GB. The hold figure reports what it took in.
        celery_hold=200_000,
        celery_fire=20_000,
        celery_hold_seconds=300,
        memory_events=1_000_000,
        memory_checkpoints=5,
        prediction_customers=1_000_000,
        soak_seconds=600,
        soak_rate=(100, 200),
        soak_sample_s=10,
    ),
}


@dataclass
class Measurement:
    """One row of the table: our figure against the raw limit beneath it."""

    path: str
    mode: str
    unit: str
    ours: Stat
    raw: Stat | None = None
    raw_label: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mb: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        if self.raw is None or not self.raw.samples or not self.raw.median:
            return None
        return self.ours.median / self.raw.median

    @property
    def key(self) -> str:
        return f"{self.path}|{self.mode}"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "mode": self.mode,
            "unit": self.unit,
            "ours": self.ours.to_json(),
            "raw": self.raw.to_json() if self.raw else None,
            "raw_label": self.raw_label,
            "ratio": round(self.ratio, 3) if self.ratio is not None else None,
            "p50_ms": _round(self.p50_ms),
            "p99_ms": _round(self.p99_ms),
            "rss_mb": _round(self.rss_mb),
            "note": self.note,
            "extra": self.extra,
            "higher_is_better": self.higher_is_better,
        }


def _round(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def mb(n_bytes: float) -> float:
    return n_bytes / (1024 * 1024)


class Profiler:
    """py-spy attached to a process for the span of a measurement, once per target."""

    def __init__(self, binary: str, out_dir: Path) -> None:
        self.binary = binary
        self.out_dir = out_dir
        self.done: set[str] = set()
        self.summaries: dict[str, dict[str, Any]] = {}

    def wanted(self, name: str) -> bool:
        return name not in self.done

    @contextlib.asynccontextmanager
    async def attach(self, name: str, pid: int) -> AsyncIterator[None]:
        """Sample `pid` while the block runs (idle time excluded), then summarise."""
        self.done.add(name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        raw = self.out_dir / f"{name}.collapsed.txt"
        process = infra.spawn(
            [
                self.binary,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                "--nonblocking",
                "--function",
                "--format",
                "raw",
                "--output",
                str(raw),
            ]
        )
        await asyncio.sleep(0.5)
        try:
            yield
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                _, err = await asyncio.to_thread(process.communicate, timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            if raw.exists():
                summary = summarize(raw.read_text())
                self.summaries[name] = summary
                (self.out_dir / f"{name}.summary.txt").write_text(summary["text"])
            else:
                self.summaries[name] = {"error": (err or b"").decode()[-500:], "text": ""}


@dataclass
class Run:
    """One invocation of the suite."""

    size: Size
    workdir: Path
    results_dir: Path
    wrk: str | None
    install: bool
    profiler: Profiler | None = None
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(self, measurement: Measurement) -> None:
        self.measurements.append(measurement)
        ratio = f"  ratio {measurement.ratio:.2f}" if measurement.ratio is not None else ""
        self.log(
            f"  {measurement.path} [{measurement.mode}]: {measurement.ours.median:,.1f} "
            f"{measurement.unit}{ratio}"
        )

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.log(f"  note: {text}")

    def log(self, text: str) -> None:
        elapsed = time.time() - self.started
        sys.stderr.write(f"[{elapsed:6.1f}s] {text}\n")
        sys.stderr.flush()

    def profile(self, name: str, pid: int) -> contextlib.AbstractAsyncContextManager[None]:
        if self.profiler is None or not self.profiler.wanted(name):
            return contextlib.nullcontext()
        return self.profiler.attach(name, pid)


class Stack:
    """The servers of one mode: nothing for embedded; PostgreSQL and Tansu for distributed."""

    def __init__(self, mode: str, workdir: Path) -> None:
        self.mode = mode
        self.workdir = workdir
        self.pg_url: str | None = None
        self.bus_url: str | None = None
        self.versions: dict[str, str] = {}
        self._exit = contextlib.ExitStack()

    @property
    def embedded(self) -> bool:
        return self.mode == "embedded"

    async def __aenter__(self) -> Stack:
        if not self.embedded:
            self.pg_url = self._exit.enter_context(infra.postgres(self.workdir))
            broker = self._exit.enter_context(infra.kafka_broker(self.workdir))
            self.bus_url = broker.url
            self.versions["postgresql"] = await infra.postgres_version(self.pg_url)
            self.versions["broker"] = broker.version
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._exit.close()

    def dir(self, name: str) -> Path:
        path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    async def database(self) -> str | None:
        """A fresh PostgreSQL database (distributed) or None (SQLite files, embedded)."""
        if self.pg_url is None:
            return None
        return await infra.fresh_database(self.pg_url)

    def namespace(self) -> str:
        return f"b{uuid.uuid4().hex[:8]}."

    def bus_settings(self, data_dir: Path, namespace: str) -> Settings:
        """Settings reaching the bus of a process started with `env` (to publish onto its
        topics from the bench)."""
        return Settings(
            data_dir=data_dir,
            bus_url=self.bus_url,
            topic_namespace=namespace,
            kafka_idempotence=False,
            topic_partitions=Settings().topic_partitions,
            **SINGLE_BROKER,  # the one test broker
        )

    def env(
        self, data_dir: Path, database_url: str | None, namespace: str = "", **extra: str
    ) -> dict[str, str]:
        return infra.huitou_env(
            data_dir,
            database_url=database_url,
            bus_url=self.bus_url,
            namespace=namespace,
            **extra,
        )

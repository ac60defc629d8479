"""Durable timers (`libs.common.timers`) with `timers_pending` timers in the table.

1. insert: the pending timers through `schedule()` (10,000 per transaction), against the
   raw bulk insert of the same rows into a copy of the table (COPY on PostgreSQL,
   executemany on SQLite); then the bytes each pending timer costs (table + indexes).
2. fire rate: `timers_backlog` timers made due, drained by one `TimerWorker` process,
   then by two; against the raw claim-and-delete loop on the same table (one, then two
   processes). The pending timers stay in the table throughout.
3. cancel while firing: one worker drains a backlog while `cancel()` deletes pending
   timers by key, one per transaction: cancels per second, their latency, and the fire
   rate meanwhile against the fire rate alone.
4. skew: timers coming due at a steady rate (5,000/s, or 80 % of the measured one-worker
   rate if lower) for `timers_skew_seconds`, fired by one worker with the product's
   defaults (batch 500, poll 0.5 s); the lateness of each fire.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from sqlalchemy import text

from bench import infra
from bench.core import Measurement, Run, Stack, mb
from bench.stats import Stat, percentile
from bench.timer_worker import KIND
from libs.common.db import Database
from libs.common.db.tables import metadata
from libs.common.settings import Settings
from libs.common.timers import Timer, cancel, schedule

SCHEMA = "bench_timers"
CHUNK = 10_000
SKEW_RATE = 5_000


class Workers:
    """Timer-firing processes (`bench/timer_worker.py`) reporting their progress."""

    def __init__(self, url: str, engine: str, processes: int, **options: Any) -> None:
        self.url = url
        self.engine = engine
        self.count = processes
        self.options = options
        self.procs: list[asyncio.subprocess.Process] = []
        self.latest: list[dict[str, Any]] = []
        self._readers: list[asyncio.Task[None]] = []
        self.firing = asyncio.Event()
        """Set once any process has fired a timer."""

    async def start(self) -> None:
        settings = Settings()
        args = [
            sys.executable,
            "-m",
            "bench.timer_worker",
            "--url",
            self.url,
            "--schema",
            SCHEMA,
            "--engine",
            self.engine,
            "--batch",
            str(self.options.get("batch", settings.timer_batch_size)),
            "--poll",
            str(self.options.get("poll", settings.timer_poll_interval_s)),
        ]
        if self.options.get("skew_file"):
            args += ["--skew-file", str(self.options["skew_file"])]
        for i in range(self.count):
            proc = await asyncio.create_subprocess_exec(
                *args, cwd=infra.ROOT, stdout=asyncio.subprocess.PIPE
            )
            self.procs.append(proc)
            self.latest.append({"fired": 0, "first": None, "last": None})
            self._readers.append(asyncio.create_task(self._read(i, proc)))

    async def _read(self, index: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            self.latest[index] = orjson.loads(line)
            if self.latest[index]["fired"]:
                self.firing.set()

    async def ready(self, within: float = 60) -> None:
        """Until every process has reported once (imported, connected, firing)."""
        deadline = time.monotonic() + within
        while not all(s.get("ready") for s in self.latest):
            if time.monotonic() > deadline:
                raise TimeoutError("timer workers did not start")
            await asyncio.sleep(0.02)

    @property
    def fired(self) -> int:
        return sum(int(s["fired"]) for s in self.latest)

    async def until(self, target: int, within: float) -> None:
        deadline = time.monotonic() + within
        while self.fired < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"timer workers fired {self.fired}/{target}")
            if any(p.returncode is not None for p in self.procs):
                raise RuntimeError("a timer worker exited early")
            await asyncio.sleep(0.05)

    def rss_mb(self) -> float:
        return sum(mb(infra.rss_bytes(p.pid)) for p in self.procs)

    async def stop(self) -> dict[str, Any]:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        firsts = [s["first"] for s in self.latest if s["first"]]
        lasts = [s["last"] for s in self.latest if s["last"]]
        span = max(lasts) - min(firsts) if firsts and lasts else 0.0
        return {"fired": self.fired, "seconds": span, "rate": self.fired / span if span else 0.0}


def _timers(prefix: str, count: int, due: Any) -> list[Timer]:
    return [
        Timer(f"bench-shop|{prefix}|{i}", KIND, "bench-shop", due(i), {"customer_id": f"c{i}"})
        for i in range(count)
    ]


async def _insert(db: Database, timers: Sequence[Timer]) -> float:
    """Insert through `schedule()`, CHUNK per transaction; returns timers/s."""
    started = time.perf_counter()
    for i in range(0, len(timers), CHUNK):
        async with db.begin() as conn:
            await schedule(conn, timers[i : i + CHUNK])
    return len(timers) / (time.perf_counter() - started)


def _row(t: Timer, sqlite: bool) -> tuple[Any, ...]:
    due: Any = t.due_at
    if sqlite:
        due = t.due_at.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return (t.key, t.kind, t.shop_id, due, orjson.dumps(t.payload).decode(), 0, None)


async def _raw_insert(url: str, db: Database, timers: Sequence[Timer]) -> float:
    """The same rows into an empty copy of the table (indexes included)."""
    rows = [_row(t, not db.is_postgres) for t in timers]
    columns = ["key", "kind", "shop_id", "due_at", "payload", "attempts", "last_error"]
    if db.is_postgres:
        conn = await asyncpg.connect(
            **infra.asyncpg_kwargs(url), server_settings={"search_path": SCHEMA}
        )
        try:
            await conn.execute("CREATE TABLE timers_copy (LIKE timers INCLUDING ALL)")
            started = time.perf_counter()
            for i in range(0, len(rows), CHUNK):
                await conn.copy_records_to_table(
                    "timers_copy", records=rows[i : i + CHUNK], columns=columns
                )
            rate = len(rows) / (time.perf_counter() - started)
            await conn.execute("DROP TABLE timers_copy")
            return rate
        finally:
            await conn.close()
    path = url.split("///", 1)[1]

    def write() -> float:
        import sqlite3

        conn = sqlite3.connect(path, isolation_level=None, timeout=60)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'timers'").fetchone()[0]
            conn.execute(ddl.replace("timers", "timers_copy", 1))
            conn.execute("CREATE INDEX ix_timers_copy_due_at ON timers_copy (due_at)")
            statement = f"INSERT INTO timers_copy ({', '.join(columns)}) VALUES (?,?,?,?,?,?,?)"
            started = time.perf_counter()
            for i in range(0, len(rows), CHUNK):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(statement, rows[i : i + CHUNK])
                conn.execute("COMMIT")
            rate = len(rows) / (time.perf_counter() - started)
            conn.execute("DROP TABLE timers_copy")
            return rate
        finally:
            conn.close()

    return await asyncio.to_thread(write)


async def _bytes_per_timer(db: Database, path: Path | None, pending: int) -> float:
    async with db.connect() as conn:
        if db.is_postgres:
            size = (await conn.execute(text("SELECT pg_total_relation_size('timers')"))).scalar()
            return float(size or 0) / pending
        try:
            size = (
                await conn.execute(
                    text(
                        "SELECT sum(pgsize) FROM dbstat WHERE name IN ('timers', "
                        "'ix_timers_due_at') OR name LIKE 'sqlite_autoindex_timers%'"
                    )
                )
            ).scalar()
        except Exception:
            size = (await asyncio.to_thread(path.stat)).st_size if path else 0
        return float(size or 0) / pending


async def _make_due(db: Database, prefix: str, count: int) -> None:
    now = datetime.now(UTC)
    await _insert(db, _timers(prefix, count, lambda i: now - timedelta(seconds=i % 10)))


async def _drain(
    run: Run,
    url: str,
    db: Database,
    engine: str,
    processes: int,
    phase: str,
    *,
    profile: str | None = None,
    while_draining: Any = None,
) -> dict[str, Any]:
    backlog = run.size.timers_backlog * (3 if profile else 1)
    workers = Workers(url, engine, processes)
    side: asyncio.Task[Any] | None = None
    try:
        if profile:
            # Sample the firing only: the workers start idle, the backlog comes after.
            await workers.start()
            await workers.ready()
            async with run.profile(profile, workers.procs[0].pid):
                await _make_due(db, phase, backlog)
                await workers.until(backlog, within=backlog / 200 + 120)
        else:
            await _make_due(db, phase, backlog)
            await workers.start()
            if while_draining is not None:
                side = asyncio.create_task(while_draining(workers))
            await workers.until(backlog, within=backlog / 200 + 120)
        rss = workers.rss_mb()
    finally:
        result = await workers.stop()
        if side is not None:
            side.cancel()
    result["rss_mb"] = rss
    if side is not None and not side.cancelled():
        result["side"] = side.result() if side.done() else None
    return result


async def measure(run: Run, stack: Stack) -> None:
    size = run.size
    mode = stack.mode
    phases = size.timer_phases
    if stack.embedded:
        path: Path | None = stack.dir("timers") / "timers.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        path = None
        fresh = await stack.database()
        assert fresh is not None
        url = fresh
    db = Database(url, SCHEMA)
    await db.ensure_schema()
    async with db.begin() as conn:
        await conn.run_sync(metadata.create_all)
    try:
        await _measure(run, stack, url, db, path, phases, mode)
    finally:
        await db.dispose()


async def _measure(
    run: Run,
    stack: Stack,
    url: str,
    db: Database,
    path: Path | None,
    phases: Sequence[str],
    mode: str,
) -> None:
    size = run.size
    pending = size.timers_pending
    now = datetime.now(UTC)
    rng = random.Random(5)
    far = _timers("pending", pending, lambda i: now + timedelta(days=1 + rng.random() * 60))
    run.log(f"  inserting {pending:,} pending timers")
    insert_rate = await _insert(db, far)
    raw_insert_rate = await _raw_insert(url, db, far)
    per_timer = await _bytes_per_timer(db, path, pending)
    run.add(
        Measurement(
            path="timers.insert",
            mode=mode,
            unit="timers/s",
            ours=Stat([insert_rate]),
            raw=Stat([raw_insert_rate]),
            raw_label="COPY" if not stack.embedded else "executemany",
            note=f"{pending:,} pending timers via schedule(), {CHUNK:,} per transaction",
        )
    )
    run.add(
        Measurement(
            path="timers.bytes_per_pending",
            mode=mode,
            unit="B/timer",
            ours=Stat([per_timer]),
            note="table + indexes / pending timers",
            higher_is_better=False,
        )
    )
    stats: dict[str, Stat] = {p: Stat() for p in ("x1", "raw1", "x2", "raw2")}
    rss: dict[str, list[float]] = {p: [] for p in stats}
    engines = {"x1": ("library", 1), "raw1": ("raw", 1), "x2": ("library", 2), "raw2": ("raw", 2)}
    if run.profiler is not None:
        await _drain(run, url, db, "library", 1, "profile", profile=f"timers-{mode}")
    for repeat in range(size.repeats):
        for phase, (engine, processes) in engines.items():
            if phase not in phases:
                continue
            result = await _drain(run, url, db, engine, processes, f"{phase}-{repeat}")
            stats[phase].add(result["rate"])
            rss[phase].append(result["rss_mb"])
    backlog = f"{size.timers_backlog:,} due of {pending + size.timers_backlog:,} in the table"
    for ours, raw, label in (("x1", "raw1", "one worker"), ("x2", "raw2", "two workers")):
        if ours not in phases:
            continue
        run.add(
            Measurement(
                path=f"timers.fire.{ours}",
                mode=mode,
                unit="fires/s",
                ours=stats[ours],
                raw=stats[raw] if raw in phases else None,
                raw_label=f"claim-and-delete loop, {label}",
                rss_mb=max(rss[ours]) if rss[ours] else None,
                note=f"{label} process(es); {backlog}",
            )
        )
    if "cancel" in phases:
        await _cancel_phase(run, url, db, far, stats["x1"], mode)
    if "skew" in phases:
        await _skew_phase(run, url, db, stats["x1"], mode)


class Canceller:
    """Cancels pending timers by key, one per transaction, from the first fire on."""

    def __init__(self, db: Database, keys: list[str]) -> None:
        self.db = db
        self.keys = keys
        self.latencies: list[float] = []
        self.found = 0
        self.started = self.ended = 0.0

    @property
    def rate(self) -> float | None:
        span = self.ended - self.started
        return len(self.latencies) / span if span > 0 else None

    async def __call__(self, workers: Workers) -> None:
        await workers.firing.wait()
        self.started = self.ended = time.perf_counter()
        for key in self.keys:
            began = time.perf_counter()
            async with self.db.begin() as conn:
                found = await cancel(conn, [key])
            self.found += found
            self.ended = time.perf_counter()
            self.latencies.append(self.ended - began)


async def _cancel_phase(
    run: Run, url: str, db: Database, far: Sequence[Timer], alone: Stat, mode: str
) -> None:
    keys = [t.key for t in far]
    random.Random(7).shuffle(keys)
    rates, fire_rates = Stat(), Stat()
    latencies: list[float] = []
    found = 0
    rss = 0.0
    for repeat in range(run.size.repeats):
        canceller = Canceller(db, keys[len(latencies) :])
        result = await _drain(
            run, url, db, "library", 1, f"cancel-{repeat}", while_draining=canceller
        )
        if canceller.rate is not None:
            rates.add(canceller.rate)
        latencies += canceller.latencies
        found += canceller.found
        fire_rates.add(result["rate"])
        rss = result["rss_mb"]
    fire_alone = alone.median if alone.samples else None
    slowdown = (1 - fire_rates.median / fire_alone) * 100 if fire_alone else None
    run.add(
        Measurement(
            path="timers.cancel_while_firing",
            mode=mode,
            unit="cancels/s",
            ours=rates,
            p50_ms=_ms(percentile(latencies, 50)),
            p99_ms=_ms(percentile(latencies, 99)),
            rss_mb=rss,
            note=(
                f"cancel(key), one per transaction, while one worker fires: fire rate "
                f"{fire_rates.median:,.0f}/s"
                + (f" ({slowdown:.0f}% lower than alone)" if slowdown is not None else "")
                + f"; {found} of {len(latencies)} cancels found their timer"
            ),
            extra={
                "fire_rate_while_cancelling": fire_rates.to_json(),
                "slowdown_pct": slowdown,
            },
        )
    )


def _ms(seconds: float | None) -> float | None:
    return seconds * 1000 if seconds is not None else None


async def _skew_phase(run: Run, url: str, db: Database, alone: Stat, mode: str) -> None:
    rate = float(SKEW_RATE)
    if alone.samples and alone.median * 0.8 < rate:
        rate = alone.median * 0.8
    count = max(1, int(rate * run.size.timers_skew_seconds))
    lead = 2 + count / 20_000
    start = datetime.now(UTC) + timedelta(seconds=lead)
    timers = _timers("skew", count, lambda i: start + timedelta(seconds=i / rate))
    await _insert(db, timers)
    skew_file = run.workdir / f"skew-{mode}.json"
    workers = Workers(url, "library", 1, skew_file=skew_file)
    await workers.start()
    try:
        await workers.until(count, within=lead + run.size.timers_skew_seconds + 120)
        rss = workers.rss_mb()
    finally:
        await workers.stop()
    skews = orjson.loads(skew_file.read_bytes()) if skew_file.exists() else []
    run.add(
        Measurement(
            path="timers.skew",
            mode=mode,
            unit="fires/s",
            ours=Stat([rate]),
            p50_ms=_ms(percentile(skews, 50)),
            p99_ms=_ms(percentile(skews, 99)),
            rss_mb=rss,
            note=(
                f"{count:,} timers due at {rate:,.0f}/s with {run.size.timers_pending:,} pending;"
                " p50/p99 = fire skew; product defaults (batch 500, poll 0.5 s)"
            ),
            extra={"max_skew_ms": _ms(max(skews, default=0.0)), "fired": len(skews)},
        )
    )
    if skews and (percentile(skews, 99) or 0) > 1:
        run.note(f"timers.skew {mode}: p99 {percentile(skews, 99):.2f} s exceeds the 1 s target")

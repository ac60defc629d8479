"""What a Python team would pick instead: Celery `countdown` tasks and `revoke` on a local
Redis, on the timers' workload.

Celery lives in its own venv (`bench/.venv-celery`, created here); Redis is Debian's
`redis-server` (installed here when missing), started on a free port without
persistence. One worker (prefork, 2 processes: the machine's cores).
1. hold: `celery_hold` reminders due in an hour. Redis hands ETA tasks to the worker at
   once, which keeps each in memory until due: how many it took in within
   `celery_hold_seconds`, its resident memory, and the publish rate.
2. fire rate: `celery_fire` reminders all due at one instant; fires per second.
3. skew and revoke: reminders coming due at a steady rate (our skew rate, capped at 80 %
   of Celery's fire rate) for `timers_skew_seconds`; some revoked before they are due.
4. duplicates: Redis redelivers a message not acknowledged within the visibility timeout,
   and a worker acknowledges an ETA task only when it runs it. With the timeout shortened
   to 5 s, kombu's sweep for such messages to every second (by default every 100 s), and
   a countdown of 25 s (in production: a one-hour timeout and a reminder a day later),
   the run counts reminders that fired more than once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson

from bench import infra, tools
from bench.core import Measurement, Run, mb
from bench.stats import Stat

WORKER_PROCESSES = 2
VISIBILITY_TIMEOUT_S = 5
RESTORE_INTERVAL_S = 1
DUPLICATE_COUNTDOWN_S = 25
DUPLICATE_REMINDERS = 50


class CelerySide:
    def __init__(self, run: Run, python: Path, redis_url: str, workdir: Path) -> None:
        self.run = run
        self.python = python
        self.workdir = workdir
        self.env = {
            **os.environ,
            "BENCH_REDIS_URL": redis_url,
            "PYTHONPATH": str(infra.ROOT),
        }
        self.worker: subprocess.Popen[bytes] | None = None

    async def driver(self, *args: str, limit_s: float = 3600) -> dict[str, Any]:
        done = await asyncio.to_thread(
            subprocess.run,
            [str(self.python), "-m", "bench.celery_side.driver", *args],
            cwd=infra.ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=limit_s,
        )
        if done.returncode != 0:
            raise RuntimeError(f"celery driver {args[0]} failed: {done.stderr[-1500:]}")
        result: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
        return result

    async def start_worker(
        self, visibility_timeout: float = 3600, restore_interval: float | None = None
    ) -> None:
        log_path = self.workdir / f"worker-{int(time.time() * 1000)}.log"
        env = {**self.env, "BENCH_VISIBILITY_TIMEOUT": str(visibility_timeout)}
        if restore_interval is not None:
            env["BENCH_RESTORE_INTERVAL"] = str(restore_interval)
        self.worker = infra.spawn(
            [
                str(self.python.parent / "celery"),
                "-A",
                "bench.celery_side.reminders",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(WORKER_PROCESSES),
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"bench{int(time.time())}@%h",
            ],
            log_path,
            cwd=infra.ROOT,
            env=env,
        )
        deadline = time.monotonic() + 60
        while b"ready." not in await asyncio.to_thread(log_path.read_bytes):
            if time.monotonic() > deadline or self.worker.poll() is not None:
                raise RuntimeError(f"celery worker did not start; see {log_path}")
            await asyncio.sleep(0.2)

    def worker_rss_mb(self) -> float:
        return mb(infra.tree_rss_bytes(self.worker.pid)) if self.worker else 0.0

    def stop_worker(self) -> None:
        if self.worker is not None:
            infra.stop_process(self.worker, timeout=30)
            self.worker = None

    async def wait_fired(self, prefix: str, count: int, until: float) -> dict[str, Any]:
        while True:
            result = await self.driver("collect", "--prefix", prefix)
            if result["distinct"] >= count or time.time() > until:
                return result
            await asyncio.sleep(0.5)


async def measure(run: Run) -> None:
    redis_bin, redis_note = tools.apt_binary("redis-server", "redis-server", install=run.install)
    python, venv_note = tools.celery_venv(install=run.install)
    run.tools["redis"] = redis_note
    run.tools["celery"] = venv_note
    if redis_bin is None or python is None:
        run.note(f"Celery comparison skipped: {redis_note}; {venv_note}")
        return
    run.tools["redis_version"] = tools.version_of([redis_bin, "--version"]) or "?"
    run.tools["celery_version"] = (
        tools.version_of([str(python), "-c", "import celery; print(celery.__version__)"]) or "?"
    )
    workdir = run.workdir / "celery"
    workdir.mkdir(parents=True, exist_ok=True)
    with infra.redis_server(redis_bin, workdir) as redis_url:
        side = CelerySide(run, python, redis_url, workdir)
        try:
            details = await _phases(run, side)
        finally:
            side.stop_worker()
    run.details["celery"] = details


async def _phases(run: Run, side: CelerySide) -> dict[str, Any]:
    size = run.size
    details: dict[str, Any] = {"worker_processes": WORKER_PROCESSES}
    await side.start_worker()
    await asyncio.sleep(1)
    idle = side.worker_rss_mb()

    # 1. hold
    far = time.time() + 3600
    published = await side.driver(
        "publish", "--prefix", "hold", "--count", str(size.celery_hold), "--start", str(far)
    )
    deadline = time.monotonic() + size.celery_hold_seconds
    stats = await side.driver("stats")
    while stats["unacked"] < size.celery_hold and time.monotonic() < deadline:
        await asyncio.sleep(1)
        stats = await side.driver("stats")
    held_rss = side.worker_rss_mb()
    held = int(stats["unacked"])
    details["hold"] = {
        "asked": size.celery_hold,
        "held_by_worker": held,
        "still_in_queue": stats["queue"],
        "publish": published,
        "worker_rss_idle_mb": idle,
        "worker_rss_mb": held_rss,
        "bytes_per_held": (held_rss - idle) * 1024 * 1024 / held if held else None,
        "redis_bytes_per_reminder": stats["redis_used_memory"] / size.celery_hold,
    }
    run.add(
        Measurement(
            path="celery.hold",
            mode="redis",
            unit="reminders",
            ours=Stat([held]),
            rss_mb=held_rss,
            note=(
                f"{held:,} of {size.celery_hold:,} reminders held by the worker after "
                f"{size.celery_hold_seconds:.0f} s; published at {published['rate']:,.0f}/s; "
                f"worker RSS {idle:.0f} → {held_rss:.0f} MB"
            ),
        )
    )
    publish_rate = max(100.0, published["rate"])

    # 2. fire rate: all due at one instant
    lead = size.celery_fire / publish_rate * 1.5 + 3
    start = time.time() + lead
    await side.driver(
        "publish", "--prefix", "burst", "--count", str(size.celery_fire), "--start", str(start)
    )
    burst = await side.wait_fired("burst", size.celery_fire, start + 300)
    span = (burst["last"] or 0) - (burst["first"] or 0)
    fire_rate = burst["executions"] / span if span > 0 else 0.0
    details["fire"] = burst | {"rate": fire_rate}
    run.add(
        Measurement(
            path="celery.fire",
            mode="redis",
            unit="fires/s",
            ours=Stat([fire_rate]),
            p50_ms=burst["skew_p50_ms"],
            p99_ms=burst["skew_p99_ms"],
            rss_mb=side.worker_rss_mb(),
            note=f"{size.celery_fire:,} reminders due at one instant; p50/p99 = skew",
        )
    )

    # 3. steady skew, with revokes
    ours = [m.ours.median for m in run.measurements if m.path == "timers.skew" and m.ours.samples]
    rate = min(max(ours, default=5000.0), max(1.0, 0.8 * fire_rate))
    count = max(1, int(rate * size.timers_skew_seconds))
    lead = count / publish_rate * 1.5 + 5
    start = time.time() + lead
    ids = side.workdir / "steady.ids"
    revoked_file = side.workdir / "steady.revoked"
    await side.driver(
        "publish",
        "--prefix",
        "steady",
        "--count",
        str(count),
        "--start",
        str(start),
        "--rate",
        str(rate),
        "--ids-out",
        str(ids),
    )
    revokes = max(1, min(200, count // 10))
    revoke = await side.driver(
        "revoke",
        "--ids-file",
        str(ids),
        "--count",
        str(revokes),
        "--revoked-out",
        str(revoked_file),
    )
    await asyncio.sleep(max(0.0, start + size.timers_skew_seconds - time.time()))
    steady = await side.wait_fired("steady", count - revokes, time.time() + 120)
    steady = await side.driver("collect", "--prefix", "steady", "--revoked-file", str(revoked_file))
    details["skew"] = steady | {"rate": rate, "count": count}
    details["revoke"] = revoke
    run.add(
        Measurement(
            path="celery.skew",
            mode="redis",
            unit="fires/s",
            ours=Stat([rate]),
            p50_ms=steady["skew_p50_ms"],
            p99_ms=steady["skew_p99_ms"],
            rss_mb=side.worker_rss_mb(),
            note=f"{count:,} reminders due at {rate:,.0f}/s with {held:,} held; p50/p99 = skew",
        )
    )
    run.add(
        Measurement(
            path="celery.revoke",
            mode="redis",
            unit="revokes/s",
            ours=Stat([revoke["revoked"] / revoke["seconds"] if revoke["seconds"] else 0.0]),
            p50_ms=revoke["p50_ms"],
            p99_ms=revoke["p99_ms"],
            note=(
                f"app.control.revoke(id) broadcast; {steady['revoked_fired']} of "
                f"{revoke['revoked']} revoked reminders fired anyway; revoked ids live in "
                "each worker's memory"
            ),
        )
    )
    side.stop_worker()

    # 4. duplicates past the visibility timeout
    await side.driver("flush")
    await side.start_worker(
        visibility_timeout=VISIBILITY_TIMEOUT_S, restore_interval=RESTORE_INTERVAL_S
    )
    start = time.time() + DUPLICATE_COUNTDOWN_S
    await side.driver(
        "publish", "--prefix", "dup", "--count", str(DUPLICATE_REMINDERS), "--start", str(start)
    )
    await asyncio.sleep(max(0.0, start - time.time()) + 15)
    dup = await side.driver("collect", "--prefix", "dup")
    details["duplicates"] = dup | {
        "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
        "countdown_s": DUPLICATE_COUNTDOWN_S,
    }
    run.add(
        Measurement(
            path="celery.duplicates",
            mode="redis",
            unit="extra fires",
            ours=Stat([dup["duplicates"]]),
            note=(
                f"visibility_timeout shortened to {VISIBILITY_TIMEOUT_S} s, countdown "
                f"{DUPLICATE_COUNTDOWN_S} s: {DUPLICATE_REMINDERS} reminders fired "
                f"{dup['executions']} times (up to {dup['max_executions']}× each)"
            ),
            higher_is_better=False,
        )
    )
    run.note(
        "Celery duplicates reproduced deliberately: Redis' visibility timeout was shortened to "
        f"{VISIBILITY_TIMEOUT_S} s (kombu's sweep to every {RESTORE_INTERVAL_S} s) and the "
        f"countdown to {DUPLICATE_COUNTDOWN_S} s so the "
        "redelivery Celery documents for countdowns longer than the timeout shows within the "
        f"run ({dup['duplicates']} extra fires of {DUPLICATE_REMINDERS} reminders)"
    )
    return details


def comparison(run: Run) -> str:
    """Our timers against Celery on the same workload, side by side."""
    celery = run.details.get("celery")
    if not celery:
        return ""
    rows = [
        ("", "pending held", "fire rate", "skew p50/p99", "worker RSS", "bytes/pending", "dups")
    ]

    def find(path: str, mode: str) -> Measurement | None:
        return next((m for m in run.measurements if m.path == path and m.mode == mode), None)

    for mode in ("embedded", "distributed"):
        fire = find("timers.fire.x1", mode)
        skew = find("timers.skew", mode)
        per = find("timers.bytes_per_pending", mode)
        if fire is None:
            continue
        rows.append(
            (
                f"Huitou timers ({mode})",
                f"{run.size.timers_pending:,} (in the DB)",
                f"{fire.ours.median:,.0f}/s",
                f"{skew.p50_ms or 0:,.0f}/{skew.p99_ms or 0:,.0f} ms" if skew else "-",
                f"{fire.rss_mb or 0:,.0f} MB",
                f"{per.ours.median:,.0f} B (disk)" if per else "-",
                "0 by design",
            )
        )
    for mode in ("embedded", "distributed"):
        reminders = find("campaigns.fire", mode)
        if reminders is None:
            continue
        rows.append(
            (
                f"Huitou reminders, send requested ({mode})",
                f"{run.size.timers_pending:,} (in the DB)",
                f"{reminders.ours.median:,.0f}/s",
                "-",
                "-",
                "-",
                "0 by design",
            )
        )
    hold, fire_c, skew_c = celery.get("hold", {}), celery.get("fire", {}), celery.get("skew", {})
    dup = celery.get("duplicates", {})
    per_held = hold.get("bytes_per_held")
    rows.append(
        (
            "Celery + Redis",
            f"{hold.get('held_by_worker', 0):,} of {hold.get('asked', 0):,} (in RAM)",
            f"{fire_c.get('rate', 0):,.0f}/s",
            f"{skew_c.get('skew_p50_ms', 0):,.0f}/{skew_c.get('skew_p99_ms', 0):,.0f} ms",
            f"{hold.get('worker_rss_mb', 0):,.0f} MB",
            f"{per_held:,.0f} B (RAM)" if per_held else "-",
            f"{dup.get('duplicates', '?')} of {DUPLICATE_REMINDERS}",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["Celery comparison (same timer workload; Celery on Redis, prefork ×2):"]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    if skew_c:
        lines.append(f"  (Celery skew measured at {skew_c.get('rate', 0):,.0f}/s)")
    return "\n".join(lines)

"""Drives the Celery side from `bench/.venv-celery`: publish reminders with `countdown`,
revoke some, read Redis' queues and the fired list. Each command prints one JSON line.

    python -m bench.celery_side.driver publish --prefix P --count N --start T --rate R
    python -m bench.celery_side.driver revoke --ids-file F --count K
    python -m bench.celery_side.driver stats | flush
    python -m bench.celery_side.driver collect --prefix P [--revoked-file F]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.celery_side.reminders import _fired_list, app, remind
from bench.stats import percentile


def publish(args: argparse.Namespace) -> dict[str, Any]:
    ids = []
    started = time.perf_counter()
    for i in range(args.count):
        due = args.start + (i / args.rate if args.rate else 0.0)
        reminder = f"{args.prefix}:{i}"
        result = remind.apply_async(
            args=(reminder, due), countdown=max(0.0, due - time.time()), task_id=reminder
        )
        ids.append(result.id)
    elapsed = time.perf_counter() - started
    if args.ids_out:
        Path(args.ids_out).write_text("\n".join(ids))
    return {"published": len(ids), "seconds": elapsed, "rate": len(ids) / elapsed}


def revoke(args: argparse.Namespace) -> dict[str, Any]:
    ids = Path(args.ids_file).read_text().split()
    chosen = random.Random(3).sample(ids, min(args.count, len(ids)))
    latencies = []
    for task_id in chosen:
        started = time.perf_counter()
        app.control.revoke(task_id)
        latencies.append(time.perf_counter() - started)
    if args.revoked_out:
        Path(args.revoked_out).write_text("\n".join(chosen))
    return {
        "revoked": len(chosen),
        "seconds": sum(latencies),
        "p50_ms": (percentile(latencies, 50) or 0) * 1000,
        "p99_ms": (percentile(latencies, 99) or 0) * 1000,
    }


def stats(_args: argparse.Namespace) -> dict[str, Any]:
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        return {
            "queue": client.llen("celery"),
            "unacked": client.hlen("unacked"),
            "redis_used_memory": client.info("memory")["used_memory"],
            "fired": _fired_list().llen("fired"),
        }


def flush(_args: argparse.Namespace) -> dict[str, Any]:
    with app.connection_for_write() as conn:
        conn.default_channel.client.flushall()
    return {"flushed": True}


def collect(args: argparse.Namespace) -> dict[str, Any]:
    entries = [e.decode().split() for e in _fired_list().lrange("fired", 0, -1)]
    mine = [
        (rid, float(skew), float(at))
        for rid, skew, at in entries
        if rid.startswith(args.prefix + ":")
    ]
    executions = Counter(rid for rid, _, _ in mine)
    skews = [skew for _, skew, _ in mine]
    times = [at for _, _, at in mine]
    revoked = set(Path(args.revoked_file).read_text().split()) if args.revoked_file else set()
    return {
        "executions": len(mine),
        "distinct": len(executions),
        "duplicates": len(mine) - len(executions),
        "max_executions": max(executions.values(), default=0),
        "skew_p50_ms": (percentile(skews, 50) or 0) * 1000,
        "skew_p99_ms": (percentile(skews, 99) or 0) * 1000,
        "first": min(times, default=None),
        "last": max(times, default=None),
        "revoked_fired": sum(1 for rid in executions if rid in revoked),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("publish")
    p.add_argument("--prefix", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--start", type=float, required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--ids-out")
    r = commands.add_parser("revoke")
    r.add_argument("--ids-file", required=True)
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--revoked-out")
    commands.add_parser("stats")
    commands.add_parser("flush")
    c = commands.add_parser("collect")
    c.add_argument("--prefix", required=True)
    c.add_argument("--revoked-file")
    args = parser.parse_args()
    handlers = {"publish": publish, "revoke": revoke, "stats": stats, "flush": flush}
    result = handlers.get(args.command, collect)(args)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""A timer-firing process for the timers benchmark.

`--engine library`: `libs.common.timers.TimerWorker` (its own loop, batch size and poll
interval) with a handler that only counts, so the figure is the primitive's own cost.
`--engine raw`: the same claim statement on the same table in a bare loop, one
transaction per batch, no ORM, no payload decoding, no metrics, no handler.

Prints a JSON line `{"fired", "first", "last"}` whenever the count changes, and once more
on SIGTERM before exiting; `--skew-file` receives every fire's lateness in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import uvloop
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db import Database
from libs.common.timers import Timer, TimerWorker

KIND = "bench.reminder"
CLAIM = (
    "DELETE FROM timers WHERE key IN (SELECT key FROM timers WHERE due_at <= {now} "
    "ORDER BY due_at LIMIT {limit}{lock}) "
    "RETURNING key, kind, shop_id, due_at, payload, attempts"
)


class Tally:
    def __init__(self, keep_skews: bool) -> None:
        self.fired = 0
        self.first: float | None = None
        self.last: float | None = None
        self.skews: list[float] | None = [] if keep_skews else None

    def add(self, count: int, now: float) -> None:
        self.fired += count
        self.first = self.first or now
        self.last = now

    def line(self) -> str:
        return orjson.dumps(
            {"fired": self.fired, "first": self.first, "last": self.last, "ready": True}
        ).decode()


async def _library(args: argparse.Namespace, tally: Tally, stop: asyncio.Event) -> None:
    db = Database(args.url, args.schema)

    async def handler(_conn: AsyncConnection, fired: list[Timer]) -> None:
        now = time.time()
        if tally.skews is not None:
            tally.skews.extend(now - t.due_at.timestamp() for t in fired)
        tally.add(len(fired), now)

    workers = [
        TimerWorker(db, "bench", {KIND: handler}, batch_size=args.batch, poll_interval=args.poll)
        for _ in range(args.workers)
    ]
    for worker in workers:
        await worker.start()
    await stop.wait()
    for worker in workers:
        await worker.stop()
    await db.dispose()


async def _raw_postgres(args: argparse.Namespace, tally: Tally, stop: asyncio.Event) -> None:
    u = make_url(args.url)
    kwargs: dict[str, Any] = {
        "user": u.username,
        "password": u.password or None,
        "host": u.query.get("host") or u.host,
        "port": u.port,
        "database": u.database,
        "server_settings": {"search_path": args.schema},
    }
    statement = CLAIM.format(now="$1", limit="$2", lock=" FOR UPDATE SKIP LOCKED")

    async def loop() -> None:
        conn = await asyncpg.connect(**kwargs)
        try:
            while not stop.is_set():
                async with conn.transaction():
                    rows = await conn.fetch(statement, datetime.now(UTC), args.batch)
                if rows:
                    tally.add(len(rows), time.time())
                if len(rows) < args.batch:
                    await asyncio.sleep(args.poll)
        finally:
            await conn.close()

    tasks = [asyncio.create_task(loop()) for _ in range(args.workers)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _raw_sqlite_loop(
    path: str, args: argparse.Namespace, tally: Tally, halt: threading.Event
) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=60000")
    statement = CLAIM.format(now="?", limit="?", lock="")
    try:
        while not halt.is_set():
            now = datetime.now(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(statement, (now, args.batch)).fetchall()
            conn.execute("COMMIT")
            if rows:
                tally.add(len(rows), time.time())
            if len(rows) < args.batch:
                time.sleep(args.poll)
    finally:
        conn.close()


async def _raw_sqlite(args: argparse.Namespace, tally: Tally, stop: asyncio.Event) -> None:
    path = args.url.split("///", 1)[1]
    halt = threading.Event()
    threads = [
        asyncio.create_task(asyncio.to_thread(_raw_sqlite_loop, path, args, tally, halt))
        for _ in range(args.workers)
    ]
    await stop.wait()
    halt.set()
    await asyncio.gather(*threads)


async def main_async(args: argparse.Namespace) -> None:
    tally = Tally(keep_skews=args.skew_file is not None)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if args.engine == "library":
        runner = _library(args, tally, stop)
    elif args.url.startswith("sqlite"):
        runner = _raw_sqlite(args, tally, stop)
    else:
        runner = _raw_postgres(args, tally, stop)
    task = asyncio.create_task(runner)
    reported = -1
    while not stop.is_set():
        if tally.fired != reported:
            reported = tally.fired
            sys.stdout.write(tally.line() + "\n")
            sys.stdout.flush()
        await asyncio.sleep(0.05)
    await task
    if args.skew_file is not None and tally.skews is not None:
        await asyncio.to_thread(Path(args.skew_file).write_bytes, orjson.dumps(tally.skews))
    sys.stdout.write(tally.line() + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--engine", choices=("library", "raw"), required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--skew-file")
    uvloop.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

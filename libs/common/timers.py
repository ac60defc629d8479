"""Durable timers: rows with a due time, claimed in batches and fired in a transaction.

A timer has a unique `key` (scheduling the same key again replaces it: "one pending timer
per customer"), a `kind` that picks its handler, and a JSON payload. A worker claims due
timers with one `DELETE … WHERE key IN (SELECT … ORDER BY due_at LIMIT n FOR UPDATE SKIP
LOCKED) RETURNING …` and runs the handlers in that same transaction, so a timer fires
exactly when its effect commits; several workers share the load without blocking each
other (SQLite, single-process, ignores the locking clause). Nothing is held in memory
per timer: millions pending cost one indexed row each.

A handler that fails makes the batch roll back; the timers are then fired one at a time so
only the failing one is retried, with backoff, and after `timer_max_attempts` it moves to
`dead_timers` with its error instead of blocking the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common import metrics
from libs.common.db.dialect import insert_ignore, upsert
from libs.common.db.engine import Database
from libs.common.db.tables import dead_timers, timers
from libs.common.errors import is_infrastructure_error


@dataclass(frozen=True)
class Timer:
    """A pending or firing timer."""

    key: str
    kind: str
    shop_id: str
    due_at: datetime
    payload: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0


TimerHandler = Callable[[AsyncConnection, list[Timer]], Awaitable[None]]
"""Applies the effect of fired timers inside the claiming transaction."""

Clock = Callable[[], datetime]

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


async def schedule(
    conn: AsyncConnection, pending: Sequence[Timer], *, replace: bool = True
) -> None:
    """Create timers by key in the caller's transaction, replacing pending ones with the
    same key (or, with `replace=False`, leaving those as they are)."""
    if not pending:
        return
    rows = {
        t.key: {
            "key": t.key,
            "kind": t.kind,
            "shop_id": t.shop_id,
            "due_at": t.due_at,
            "payload": orjson.dumps(t.payload).decode(),
            "attempts": 0,
            "last_error": None,
        }
        for t in pending
    }
    statement = (
        upsert(
            conn,
            timers,
            ["key"],
            ["kind", "shop_id", "due_at", "payload", "attempts", "last_error"],
        )
        if replace
        else insert_ignore(conn, timers)
    )
    await conn.execute(statement, list(rows.values()))


async def cancel(conn: AsyncConnection, keys: Sequence[str]) -> int:
    """Delete pending timers by key; returns how many were pending."""
    if not keys:
        return 0
    result = await conn.execute(delete(timers).where(timers.c.key.in_(list(keys))))
    return int(result.rowcount)


def _claim_statement(now: datetime, limit: int, key: str | None = None) -> Any:
    due = select(timers.c.key).where(timers.c.due_at <= now)
    if key is not None:
        due = due.where(timers.c.key == key)
    due = due.order_by(timers.c.due_at).limit(limit).with_for_update(skip_locked=True)
    return (
        delete(timers)
        .where(timers.c.key.in_(due.scalar_subquery()))
        .returning(
            timers.c.key,
            timers.c.kind,
            timers.c.shop_id,
            timers.c.due_at,
            timers.c.payload,
            timers.c.attempts,
        )
    )


class TimerWorker:
    """Fires due timers of one service; start several (or several processes) to scale."""

    def __init__(
        self,
        db: Database,
        service: str,
        handlers: Mapping[str, TimerHandler],
        *,
        batch_size: int = 500,
        poll_interval: float = 0.5,
        max_attempts: int = 10,
        clock: Clock = utcnow,
    ) -> None:
        self.db = db
        self.service = service
        self.handlers = dict(handlers)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"timers:{self.service}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                fired = await self.fire_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer round failed", extra={"service": self.service})
                fired = 0
            if fired < self.batch_size:
                await asyncio.sleep(self.poll_interval)

    async def fire_due(self) -> int:
        """Claim and fire one batch of due timers; returns how many were claimed."""
        now = self.clock()
        try:
            async with self.db.begin() as conn:
                claimed = await self._claim(conn, now, self.batch_size)
                await self._fire(conn, claimed, now)
                return len(claimed)
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise
            log.warning("timer batch failed; firing one by one", extra={"error": repr(exc)})
        return await self._fire_one_by_one(now)

    async def _claim(
        self, conn: AsyncConnection, now: datetime, limit: int, key: str | None = None
    ) -> list[Timer]:
        rows = (await conn.execute(_claim_statement(now, limit, key))).all()
        return [
            Timer(r.key, r.kind, r.shop_id, r.due_at, orjson.loads(r.payload), r.attempts)
            for r in rows
        ]

    async def _fire(self, conn: AsyncConnection, claimed: list[Timer], now: datetime) -> None:
        by_kind: dict[str, list[Timer]] = {}
        for timer in claimed:
            by_kind.setdefault(timer.kind, []).append(timer)
        for kind, batch in by_kind.items():
            handler = self.handlers.get(kind)
            if handler is None:
                raise LookupError(f"no handler for timer kind {kind!r}")
            await handler(conn, batch)
            metrics.TIMERS_FIRED.labels(self.service, kind).inc(len(batch))
            skew = metrics.TIMER_FIRE_SKEW.labels(self.service, kind)
            for timer in batch:
                skew.observe(max(0.0, (now - timer.due_at).total_seconds()))

    async def _fire_one_by_one(self, now: datetime) -> int:
        async with self.db.connect() as conn:
            keys = list(
                (
                    await conn.execute(
                        select(timers.c.key)
                        .where(timers.c.due_at <= now)
                        .order_by(timers.c.due_at)
                        .limit(self.batch_size)
                    )
                ).scalars()
            )
        for key in keys:
            try:
                async with self.db.begin() as conn:
                    await self._fire(conn, await self._claim(conn, now, 1, key), now)
            except Exception as exc:
                await self._record_failure(key, exc, now)
        return len(keys)

    async def _record_failure(self, key: str, exc: Exception, now: datetime) -> None:
        async with self.db.begin() as conn:
            row = (await conn.execute(select(timers).where(timers.c.key == key))).first()
            if row is None:
                return
            metrics.TIMER_FAILURES.labels(self.service, row.kind).inc()
            attempts = row.attempts + 1
            error = repr(exc)[:2000]
            if attempts >= self.max_attempts:
                await conn.execute(delete(timers).where(timers.c.key == key))
                await conn.execute(
                    upsert(
                        conn,
                        dead_timers,
                        ["key"],
                        [
                            "kind",
                            "shop_id",
                            "due_at",
                            "payload",
                            "attempts",
                            "last_error",
                            "died_at",
                        ],
                    ),
                    {
                        "key": key,
                        "kind": row.kind,
                        "shop_id": row.shop_id,
                        "due_at": row.due_at,
                        "payload": row.payload,
                        "attempts": attempts,
                        "last_error": error,
                        "died_at": now,
                    },
                )
                log.error("timer dead", extra={"key": key, "kind": row.kind, "error": error})
                return
            backoff = timedelta(seconds=min(300, 2**attempts))
            await conn.execute(
                update(timers)
                .where(timers.c.key == key)
                .values(attempts=attempts, last_error=error, due_at=now + backoff)
            )


@dataclass(frozen=True)
class Recurring:
    """A job that runs every `every` on one of the service's timer workers (whichever
    claims it), in the claiming transaction; the timer reschedules itself."""

    kind: str
    every: timedelta
    job: Callable[[AsyncConnection, datetime], Awaitable[None]]

    def timer(self, now: datetime) -> Timer:
        return Timer(self.kind, self.kind, "-", now + self.every)

    async def handler(self, conn: AsyncConnection, fired: list[Timer]) -> None:
        now = utcnow()
        await self.job(conn, now)
        await schedule(conn, [self.timer(now)])

    async def ensure(self, conn: AsyncConnection) -> None:
        """Schedule the first run unless one is pending (idempotent across replicas)."""
        await schedule(conn, [self.timer(utcnow())], replace=False)

"""Durable timers: rows with a due time, claimed in batches and fired in a transaction.

A timer has a unique `key` (scheduling the same key again replaces it: "one pending timer
per customer"), a `kind` that picks its handler, and a JSON payload. A worker claims due
timers with one `DELETE … WHERE key IN (SELECT … ORDER BY due_at LIMIT n FOR UPDATE SKIP
LOCKED) RETURNING …` and runs the handlers in that same transaction, so a timer fires
exactly when its effect commits; several workers share the load without blocking each
other (SQLite, single-process, ignores the locking clause). Nothing is held in memory
per timer: millions pending cost one indexed row each. Between partial batches a worker
sleeps until the earliest pending timer is due (one indexed `min(due_at)`), at most its
poll interval, and a timer scheduled in its own process that is due earlier wakes it.

A handler that fails makes the batch roll back; the timers are then fired one at a time so
only the failing one is retried, with backoff, and after `timer_max_attempts` it moves to
`dead_timers` with its error instead of blocking the rest. Transient failures (database
or network outages, PostgreSQL deadlocks and serialization failures: see
`libs.common.bus.base.is_transient_error`) count no attempt: the timers stay due and the
next round fires them again. `retry_dead_timers` (`huitou timers retry`) moves dead
timers back, due at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, event, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common import metrics
from libs.common.bus.base import is_transient_error, task_health
from libs.common.db.dialect import upsert
from libs.common.db.engine import Database
from libs.common.db.tables import dead_timers, timers
from libs.common.db.types import sqlite_utc_text


@dataclass(frozen=True)
class Timer:
    """A pending or firing timer."""

    key: str
    kind: str
    shop_id: str
    due_at: datetime
    payload: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0

    def __post_init__(self) -> None:
        # One shop's timer must never replace or cancel another's: keys carry the shop.
        if not self.key.startswith(f"{self.shop_id}|"):
            raise ValueError(f"timer key {self.key!r} is not scoped by shop {self.shop_id!r}")


GLOBAL = "-"
"""The `shop_id` of jobs that belong to no shop (recurring maintenance)."""


def timer_key(shop_id: str, *parts: str) -> str:
    """A timer key scoped by its shop: `<shop_id>|<part>|<part>…`."""
    return "|".join((shop_id, *parts))


_ROW_FIELDS = ("key", "kind", "shop_id", "due_at", "payload", "attempts")
if tuple(f.name for f in fields(Timer)) != _ROW_FIELDS:  # TimerWorker._claim sets these
    raise RuntimeError("Timer's fields changed: update TimerWorker._claim")

TimerHandler = Callable[[AsyncConnection, list[Timer]], Awaitable[None]]
"""Applies the effect of fired timers inside the claiming transaction."""

Clock = Callable[[], datetime]

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _from_sqlite_time(value: str) -> datetime:
    return datetime.fromisoformat(value + "+00:00")


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime given; Huitou stores aware UTC times only")
    return value


# Plain SQL for the hot statements, run with `exec_driver_sql`: no statement building,
# cache-key computation or per-row type processing (they are plain text, integers and
# the one timestamp, converted here). Table and columns are those of `tables.timers`.
_COLUMNS = "key, kind, shop_id, due_at, payload, attempts, last_error"
_ON_KEY = " ON CONFLICT (key) DO "
_REPLACE = (
    "UPDATE SET kind = excluded.kind, shop_id = excluded.shop_id, due_at = excluded.due_at, "
    "payload = excluded.payload, attempts = excluded.attempts, last_error = excluded.last_error"
)
# One statement per call on PostgreSQL: the rows go in as five arrays.
_PG_SCHEDULE = (
    f"INSERT INTO timers ({_COLUMNS}) SELECT k, ki, s, d, p, 0, NULL FROM unnest("
    "$1::varchar[], $2::varchar[], $3::varchar[], $4::timestamptz[], $5::text[]) "
    "AS r(k, ki, s, d, p)" + _ON_KEY
)
_SQLITE_SCHEDULE = f"INSERT INTO timers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, NULL)" + _ON_KEY
_CLAIM = (
    "DELETE FROM timers WHERE key IN (SELECT key FROM timers WHERE due_at <= {now}{key} "
    "ORDER BY due_at LIMIT {limit}{lock}) "
    "RETURNING key, kind, shop_id, due_at, payload, attempts"
)
_PG_CLAIM = _CLAIM.format(now="$1", limit="$2", key="", lock=" FOR UPDATE SKIP LOCKED")
_PG_CLAIM_KEY = _CLAIM.format(
    now="$1", limit="$2", key=" AND key = $3", lock=" FOR UPDATE SKIP LOCKED"
)
_PG_CLAIM_LANE = _CLAIM.format(
    now="$1", limit="$2", key=" AND kind = ANY($3::varchar[])", lock=" FOR UPDATE SKIP LOCKED"
)
_SQLITE_CLAIM = _CLAIM.format(now="?1", limit="?2", key="", lock="")
_SQLITE_CLAIM_KEY = _CLAIM.format(now="?1", limit="?2", key=" AND key = ?3", lock="")
_SQLITE_CLAIM_LANE = _CLAIM.format(
    now="?1", limit="?2", key=" AND kind IN (SELECT value FROM json_each(?3))", lock=""
)
_NEXT_DUE = "SELECT min(due_at) FROM timers"


async def schedule(
    conn: AsyncConnection, pending: Sequence[Timer], *, replace: bool = True
) -> None:
    """Create timers by key in the caller's transaction, replacing pending ones with the
    same key (or, with `replace=False`, leaving those as they are)."""
    if not pending:
        return
    latest = {t.key: t for t in pending}  # one row per key; the last one given wins
    batch = latest.values()
    dumps = orjson.dumps
    conflict = _REPLACE if replace else "NOTHING"
    if conn.dialect.name == "postgresql":
        dues = [t.due_at for t in batch]
        if any(due.tzinfo is None for due in dues):
            raise ValueError("naive datetime given; Huitou stores aware UTC times only")
        await conn.exec_driver_sql(
            _PG_SCHEDULE + conflict,
            (
                list(latest),
                [t.kind for t in batch],
                [t.shop_id for t in batch],
                dues,
                [dumps(t.payload).decode() for t in batch],
            ),
        )
    else:
        when = sqlite_utc_text
        await conn.exec_driver_sql(
            _SQLITE_SCHEDULE + conflict,
            [(t.key, t.kind, t.shop_id, when(t.due_at), dumps(t.payload).decode()) for t in batch],
        )
    if _watched:
        _hint(conn, min(t.due_at for t in batch))


async def cancel(conn: AsyncConnection, keys: Sequence[str]) -> int:
    """Delete pending timers by key; returns how many were pending."""
    if not keys:
        return 0
    result = await conn.execute(delete(timers).where(timers.c.key.in_(list(keys))))
    return int(result.rowcount)


# In-process wake-ups. A worker sleeps until the earliest pending timer (at most its poll
# interval); a timer scheduled meanwhile through the same engine that is due earlier wakes
# it. The hint is noted on the connection and delivered when the connection goes back to
# the pool, i.e. after the scheduling transaction committed (or rolled back: one
# needless round, which is harmless), so the worker never looks before the row is there.
_HINT = "huitou.timers.earliest"
_NAP = 0.01
"""The shortest sleep after firing a partial batch (seconds)."""
_SLACK = 0.001
"""Added to sleeps that end at a due time: the loop's timers may fire up to 1 ms early."""


class _Watch:
    """The started workers on one engine, and the pool listener that wakes them."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.workers: set[TimerWorker] = set()
        event.listen(engine.pool, "checkin", self.on_checkin)

    def on_checkin(self, _dbapi_connection: Any, record: Any) -> None:
        due = record.info.pop(_HINT, None) if record is not None else None
        if due is not None:
            for worker in list(self.workers):
                worker._notify(due)

    def close(self) -> None:
        event.remove(self.engine.pool, "checkin", self.on_checkin)


_watched: dict[Any, _Watch] = {}
"""Sync engine -> its watch, while a worker on it runs in this process."""


def _hint(conn: AsyncConnection, due: datetime) -> None:
    if conn.sync_engine not in _watched:
        return
    info = conn.info
    earliest = info.get(_HINT)
    if earliest is None or due < earliest:
        info[_HINT] = due


def _watch(worker: TimerWorker) -> None:
    engine = worker.db.engine.sync_engine
    watch = _watched.get(engine)
    if watch is None:
        watch = _watched[engine] = _Watch(engine)
    watch.workers.add(worker)


def _unwatch(worker: TimerWorker) -> None:
    engine = worker.db.engine.sync_engine
    watch = _watched.get(engine)
    if watch is None:
        return
    watch.workers.discard(worker)
    if not watch.workers:
        del _watched[engine]
        watch.close()


def _observe_many(histogram: Any, values: list[float]) -> None:
    """`histogram.observe(v)` for each value, in one update per bucket when the client
    exposes its buckets (prometheus_client's `Histogram` child), else one by one."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bound >= value, as observe()
    for bucket, n in zip(buckets, counts, strict=True):
        if n:
            bucket.inc(n)
    total.inc(sum(values))


_COMMITTED: dict[int, list[Callable[[], Awaitable[None]]]] = {}
"""after_commit jobs by the id of the connection whose round registered them (not in
`conn.info`: reading that after a failed transaction may have to reconnect)."""


def after_commit(conn: AsyncConnection, job: Callable[[], Awaitable[None]]) -> None:
    """Run `job` once the timer round on `conn` has committed (never if it rolls back):
    work a handler must not do inside the claiming transaction, such as calling an
    outside system whose effect cannot be rolled back. The job should be quick (hand the
    work to a task of its own); a process that dies before it runs loses it, so the
    handler records in the transaction what a later timer must check."""
    _COMMITTED.setdefault(id(conn), []).append(job)


@contextlib.asynccontextmanager
async def _committing(conn: AsyncConnection) -> AsyncIterator[None]:
    """A transaction on `conn` whose `after_commit` jobs run once it committed and are
    dropped if it rolls back."""
    try:
        async with conn.begin():
            yield
    except BaseException:
        _COMMITTED.pop(id(conn), None)
        raise
    for job in _COMMITTED.pop(id(conn), []):
        try:
            await job()
        except Exception:
            log.exception("after-commit job failed")


class TimerWorker:
    """Fires due timers of one service; start several (or several processes) to scale.

    It fires batches back to back while full ones come back, then sleeps until the
    earliest pending timer is due (at most `poll_interval`, which also bounds how late a
    timer scheduled by another process can fire), or until a timer scheduled in this
    process through the same database is due earlier than that.
    """

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
        lanes: Sequence[Sequence[str]] = (),
    ) -> None:
        self.db = db
        self.service = service
        self.handlers = dict(handlers)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.clock = clock
        self.lanes: list[list[str] | None] = [None]
        """Kinds claimed apart, each lane in its own batches: with `lanes` given, every
        round claims one batch per lane (the kinds in no lane make one more), so timers of
        one lane coming due by the million never delay another's by more than a batch."""
        if lanes:
            named = [list(lane) for lane in lanes]
            rest = sorted(set(self.handlers) - {k for lane in named for k in lane})
            self.lanes = [*named, *([rest] if rest else [])]
        self._task: asyncio.Task[None] | None = None
        self._postgres = db.is_postgres
        self._nap = min(_NAP, poll_interval)
        self._not_before = 0.0
        """Loop time before which a hint does not wake the sleeping worker."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sleeping: asyncio.Timeout | None = None
        self._hint_due: datetime | None = None
        """The earliest due time hinted since the current round began."""
        self._progress_at = time.monotonic()
        """When the worker last finished a round (fired, found nothing, or failed)."""
        self._stopping = False
        self._idle = asyncio.Event()
        """Set while no round is in hand (the worker sleeps, or has not started)."""
        self._idle.set()

    async def start(self) -> None:
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        _watch(self)
        self._progress_at = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"timers:{self.service}")

    def health(self, stuck_after: float) -> str | None:
        """None while the worker works; otherwise why not (`/readyz` reports it)."""
        return task_health(
            self._task,
            self._progress_at,
            max(stuck_after, self.poll_interval * 2),
            "no round finished",
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop: a round in hand finishes and commits (for up to `grace` seconds), then
        the worker is cancelled where it sleeps. Cancelling a round instead rolls it back,
        and on SQLite a cancel landing while `BEGIN IMMEDIATE` runs on aiosqlite's thread
        left the write lock held by a connection nobody used any more."""
        _unwatch(self)
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        if not self._idle.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def _notify(self, due: datetime) -> None:
        """A timer due at `due` was scheduled in this process and its transaction ended
        (called from wherever that connection went back to the pool)."""
        loop = self._loop
        if loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._hinted(due)
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._hinted, due)

    def _hinted(self, due: datetime) -> None:
        if self._hint_due is None or due < self._hint_due:
            self._hint_due = due
        sleeping = self._sleeping
        if sleeping is None or self._loop is None:
            return  # working: the delay after this round takes the hint into account
        delay = max(_SLACK, (due - self.clock()).total_seconds() + _SLACK)
        wake_at = max(self._loop.time() + delay, self._not_before)
        planned = sleeping.when()
        if not sleeping.expired() and (planned is None or wake_at < planned):
            with contextlib.suppress(RuntimeError):  # expiring already: waking anyway
                sleeping.reschedule(wake_at)

    async def _run(self) -> None:
        while not self._stopping:
            self._hint_due = None
            now = self.clock()
            self._idle.clear()
            try:
                fired, next_due, now = await self._drain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_transient_error(exc):
                    log.warning(
                        "timer round failed transiently; retrying",
                        extra={"service": self.service, "error": repr(exc)},
                    )
                else:
                    log.exception("timer round failed", extra={"service": self.service})
                fired, next_due = 0, None
            finally:
                self._idle.set()
            self._progress_at = time.monotonic()
            delay = self._delay(now, fired, next_due)
            loop = asyncio.get_running_loop()
            # Hints may bring the wake-up forward, but not before the nap after a firing.
            self._not_before = loop.time() + (self._nap if fired else 0.0)
            await self._sleep(delay)

    async def _drain(self) -> tuple[int, datetime | None, datetime]:
        """Fire batches back to back on one connection (one pool checkout, and its
        liveness check, per wake-up rather than per batch) until one is not full; returns
        the last round's claim count, its next due time and when it claimed."""
        async with self.db.engine.connect() as conn:
            while True:
                now = self.clock()
                fired = 0
                next_due: datetime | None = None
                full = False
                for lane in self.lanes:
                    claimed, due = await self._round(now, conn, lane)
                    self._progress_at = time.monotonic()
                    fired += claimed
                    full = full or claimed >= self.batch_size
                    if due is not None and (next_due is None or due < next_due):
                        next_due = due
                if not full or self._stopping:
                    return fired, next_due, now

    def _delay(self, claimed_at: datetime, fired: int, next_due: datetime | None) -> float:
        """How long to sleep after a partial batch claimed at `claimed_at`."""
        now = self.clock()
        delay = self.poll_interval
        if next_due is not None:
            if next_due <= claimed_at and not fired:
                # Due when we claimed yet not claimed: another worker holds it (or it
                # committed just after our claim); look again shortly.
                delay = self.poll_interval / 10
            else:
                delay = min(delay, (next_due - now).total_seconds() + _SLACK)
        if self._hint_due is not None:
            delay = min(delay, (self._hint_due - now).total_seconds() + _SLACK)
        # After firing, never quite 0: timers coming due continuously are fired in small
        # batches at most every `_NAP` rather than one round trip (and commit) each.
        return max(delay, self._nap if fired else _SLACK)

    async def _sleep(self, delay: float) -> None:
        never = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(delay) as self._sleeping:
                await never
        except TimeoutError:
            pass
        finally:
            self._sleeping = None

    async def fire_due(self) -> int:
        """Claim and fire one batch of due timers (one per lane); returns how many were
        claimed."""
        now = self.clock()
        return sum([(await self._round(now, None, lane))[0] for lane in self.lanes])

    async def _round(
        self, now: datetime, conn: AsyncConnection | None = None, lane: list[str] | None = None
    ) -> tuple[int, datetime | None]:
        """Fire one batch due at `now` (in a transaction on `conn` if given); returns how
        many were claimed and, after a partial batch, when the earliest timer left is due
        (None if none is, or after a failure)."""
        try:
            if conn is None:
                async with self.db.engine.connect() as own:
                    return await self._in_transaction(own, now, lane)
            return await self._in_transaction(conn, now, lane)
        except Exception as exc:
            if is_transient_error(exc):
                raise  # nothing wrong with the timers: the next round fires them again
            log.warning("timer batch failed; firing one by one", extra={"error": repr(exc)})
        return await self._fire_one_by_one(now), None

    async def _in_transaction(
        self, conn: AsyncConnection, now: datetime, lane: list[str] | None
    ) -> tuple[int, datetime | None]:
        """One round in a transaction of its own, then its `after_commit` jobs."""
        async with _committing(conn):
            fired = await self._claim_and_fire(conn, now, lane)
        return fired

    async def _claim_and_fire(
        self, conn: AsyncConnection, now: datetime, lane: list[str] | None = None
    ) -> tuple[int, datetime | None]:
        claimed = await self._claim(conn, now, self.batch_size, lane=lane)
        await self._fire(conn, claimed, now)
        next_due = None
        if len(claimed) < self.batch_size:
            next_due = await self._next_due(conn)
        return len(claimed), next_due

    async def _next_due(self, conn: AsyncConnection) -> datetime | None:
        due: Any = (await conn.exec_driver_sql(_NEXT_DUE)).scalar()
        if due is None or self._postgres:
            return due  # type: ignore[no-any-return]
        return _from_sqlite_time(due)

    async def _claim(
        self,
        conn: AsyncConnection,
        now: datetime,
        limit: int,
        key: str | None = None,
        *,
        lane: list[str] | None = None,
    ) -> list[Timer]:
        if self._postgres:
            params: tuple[Any, ...] = (_aware(now), limit)
            statement = _PG_CLAIM if key is None else _PG_CLAIM_KEY
            if lane is not None:
                statement = _PG_CLAIM_LANE
                params += (lane,)
        else:
            params = (sqlite_utc_text(now), limit)
            statement = _SQLITE_CLAIM if key is None else _SQLITE_CLAIM_KEY
            if lane is not None:
                statement = _SQLITE_CLAIM_LANE
                params += (orjson.dumps(lane).decode(),)
        if key is not None:
            params += (key,)
        rows: Sequence[Any] = (await conn.exec_driver_sql(statement, params)).all()
        # Built field by field, as the frozen dataclass's __init__ would (which sets each
        # field through object.__setattr__, the bulk of the per-row cost here).
        claimed: list[Timer] = []
        append, new, loads, postgres = claimed.append, object.__new__, orjson.loads, self._postgres
        for k, kind, shop_id, due, payload, attempts in rows:
            timer: Timer = new(Timer)
            fields = timer.__dict__
            fields["key"] = k
            fields["kind"] = kind
            fields["shop_id"] = shop_id
            fields["due_at"] = due if postgres else datetime.fromisoformat(due + "+00:00")
            fields["payload"] = loads(payload)
            fields["attempts"] = attempts
            append(timer)
        return claimed

    async def _fire(self, conn: AsyncConnection, claimed: list[Timer], now: datetime) -> None:
        if not claimed:
            return
        kinds = {timer.kind for timer in claimed}
        if len(kinds) == 1:
            by_kind = {kinds.pop(): claimed}
        else:
            by_kind = {kind: [] for kind in kinds}
            for timer in claimed:
                by_kind[timer.kind].append(timer)
        for kind in by_kind:
            if kind not in self.handlers:
                raise LookupError(f"no handler for timer kind {kind!r}")
        now_ts = now.timestamp()
        for kind, batch in by_kind.items():
            await self.handlers[kind](conn, batch)
            metrics.TIMERS_FIRED.labels(self.service, kind).inc(len(batch))
            skews = [
                skew if (skew := now_ts - timer.due_at.timestamp()) > 0.0 else 0.0
                for timer in batch
            ]
            _observe_many(metrics.TIMER_FIRE_SKEW.labels(self.service, kind), skews)

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
                async with self.db.engine.connect() as conn, _committing(conn):
                    await self._fire(conn, await self._claim(conn, now, 1, key), now)
            except Exception as exc:
                if is_transient_error(exc):
                    # Not the timer's fault: it stays due, uncounted, for the next round.
                    log.warning(
                        "timer failed transiently; retrying",
                        extra={"service": self.service, "key": key, "error": repr(exc)},
                    )
                    continue
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
        return Timer(timer_key(GLOBAL, self.kind), self.kind, GLOBAL, now + self.every)

    async def handler(self, conn: AsyncConnection, fired: list[Timer]) -> None:
        now = utcnow()
        await self.job(conn, now)
        await schedule(conn, [self.timer(now)])

    async def ensure(self, conn: AsyncConnection) -> None:
        """Schedule the first run unless one is pending (idempotent across replicas)."""
        await schedule(conn, [self.timer(utcnow())], replace=False)


async def retry_dead_timers(db: Database, *, now: datetime | None = None) -> tuple[int, int]:
    """Move every row of `dead_timers` back to `timers`, due `now` (default: at once) with
    its attempts reset and its last error kept; returns (moved, superseded). A dead timer
    whose key was scheduled again since is superseded by that pending one (scheduling a key
    replaces it) and only dropped. Runs in transactions of a few hundred rows."""
    when = now or utcnow()
    moved = superseded = 0
    while True:
        async with db.begin() as conn:
            rows = (
                await conn.execute(select(dead_timers).order_by(dead_timers.c.key).limit(500))
            ).all()
            if not rows:
                return moved, superseded
            keys = [row.key for row in rows]
            pending = set(
                (await conn.execute(select(timers.c.key).where(timers.c.key.in_(keys)))).scalars()
            )
            back = [
                {
                    "key": row.key,
                    "kind": row.kind,
                    "shop_id": row.shop_id,
                    "due_at": when,
                    "payload": row.payload,
                    "attempts": 0,
                    "last_error": row.last_error,
                }
                for row in rows
                if row.key not in pending
            ]
            if back:
                await conn.execute(timers.insert(), back)
            await conn.execute(delete(dead_timers).where(dead_timers.c.key.in_(keys)))
        moved += len(back)
        superseded += len(rows) - len(back)

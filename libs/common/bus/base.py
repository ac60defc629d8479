"""The bus contract and the consumer loop both implementations share.

Contract (held by `tests/common/test_bus_contract.py` against every implementation):
- `publish` returns only once every message is durably stored (Kafka `acks=all`, the
  embedded bus after its SQLite commit) and raises `BusUnavailable` otherwise.
- Messages with the same key land on the same partition and are consumed in order.
- Consumer groups: each group sees every message; members of one group split partitions.
- At least once: a group's position moves only after its handler returned for the batch,
  so a consumer stopped or killed mid-batch gets the batch again.
- A message whose handler keeps failing is retried a bounded number of times, then
  published to `<topic>.dlt` with the error in its headers, and consumption moves on.
  Only the failing message goes there: a failed batch is split in halves until the
  failures are narrowed down to single messages, and only a message failing on its own
  counts attempts, so a poison message never takes a healthy neighbour (of its shop or
  another's) with it.
- Transient failures are retried without bound and never count as attempts: the
  infrastructure itself (database unreachable, network) and lock conflicts between
  concurrent transactions (PostgreSQL deadlocks, SQLSTATE 40P01, and serialization
  failures, 40001; see `is_transient_error`). The partition waits rather than
  dead-lettering healthy messages.
- `replay_dead_letters` puts what is in `<topic>.dlt` back on `<topic>` once (`huitou dlt
  replay`); idempotent consumers skip what they had applied already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from libs.common import metrics
from libs.common.errors import is_infrastructure_error
from libs.common.settings import Settings

log = logging.getLogger(__name__)


class BusUnavailable(Exception):
    """The bus did not durably accept a publish; the caller must not acknowledge."""


class BusConfigurationError(Exception):
    """The bus refuses how it is configured (e.g. a broker rejecting the idempotent
    producer); retrying will not help, a setting must change. The message says which."""


LOCK_CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})
"""serialization_failure and deadlock_detected: the transaction lost a race with another
one and succeeds when run again."""


def is_lock_conflict(exc: BaseException) -> bool:
    """True for a PostgreSQL deadlock or serialization failure, however wrapped: SQLAlchemy's
    `DBAPIError` keeps the driver's error in `orig`, which carries the SQLSTATE as `sqlstate`
    (asyncpg) or `pgcode` (psycopg); the exception's cause and context are searched too."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        for attribute in ("sqlstate", "pgcode"):
            if getattr(current, attribute, None) in LOCK_CONFLICT_SQLSTATES:
                return True
        orig = getattr(current, "orig", None)
        pending += [
            orig if isinstance(orig, BaseException) else None,
            current.__cause__,
            current.__context__,
        ]
    return False


def is_transient_error(exc: BaseException) -> bool:
    """Failures that say nothing about the message or timer being handled: retried without
    bound, never counted towards a dead-letter topic or `dead_timers`."""
    return is_infrastructure_error(exc) or is_lock_conflict(exc)


@dataclass(frozen=True)
class Message:
    """A message to publish."""

    topic: str
    key: str
    value: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Received:
    """A message as a consumer receives it, with its position."""

    topic: str
    partition: int
    offset: int
    key: str
    value: bytes
    headers: dict[str, str]
    timestamp: float = 0.0
    """When the bus appended it (epoch seconds): Kafka's record timestamp, the embedded
    bus's commit time."""


BatchHandler = Callable[[list[Received]], Awaitable[None]]
"""Handles a batch in one database transaction; raising means nothing was applied."""

ProgressHandler = Callable[[dict[tuple[str, int], float]], Awaitable[None]]
"""Told, now and then, each partition's watermark: the instant (epoch seconds) before which
every message appended to it has been handled by this member (see `Consumer.watermarks`)."""


def dead_letter_topic(topic: str) -> str:
    return f"{topic}.dlt"


class Source(ABC):
    """What an implementation provides to the shared consumer loop."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def fetch(self, max_records: int, max_wait: float) -> list[Received]:
        """The next records after the ones already fetched (not yet committed)."""

    @abstractmethod
    async def commit(self, records: Sequence[Received]) -> None:
        """Move the group's committed position past `records`."""

    @abstractmethod
    def lag(self) -> dict[tuple[str, int], int]:
        """Messages behind the end of each assigned partition, where known."""

    @abstractmethod
    def fetched_through(self) -> dict[tuple[str, int], float]:
        """Assigned partitions whose last fetch reached their end, each with the instant
        (epoch seconds) as of which it did: every message appended before it is fetched."""

    @abstractmethod
    async def caught_up(self) -> bool:
        """Whether every partition of the topics is assigned to this member and nothing
        lies beyond what it fetched (for one-shot readers such as the dead-letter replay)."""


class Bus(ABC):
    """Publishes messages durably and runs consumer groups over topics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def publish(self, messages: Sequence[Message]) -> None:
        """Store every message durably before returning; raise BusUnavailable if not."""

    @abstractmethod
    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics (and their dead-letter topics) when missing."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise when the bus cannot be reached (used by `/readyz`)."""

    @abstractmethod
    def _source(self, group: str, topics: Sequence[str]) -> Source: ...

    def consumer(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        batch_size: int | None = None,
        progress: ProgressHandler | None = None,
    ) -> Consumer:
        """A consumer of `topics` in `group`; call `start()` to run it."""
        return Consumer(
            self,
            group,
            list(topics),
            handler,
            batch_size=batch_size or self.settings.consumer_batch_size,
            progress=progress,
        )


class Consumer:
    """Runs fetch → handle → commit for one group member, with retries and dead letters."""

    def __init__(
        self,
        bus: Bus,
        group: str,
        topics: list[str],
        handler: BatchHandler,
        *,
        batch_size: int,
        progress: ProgressHandler | None = None,
    ) -> None:
        self.bus = bus
        self.progress = progress
        self._through: dict[tuple[str, int], float] = {}
        self._reported_at = 0.0
        self.group = group
        self.topics = topics
        self.handler = handler
        self.batch_size = batch_size
        self.max_attempts = bus.settings.consumer_max_attempts
        self.backoff = bus.settings.consumer_retry_backoff_s
        self.stuck_after = bus.settings.consumer_stuck_after_s
        self._last_error: BaseException | None = None
        self._source: Source | None = None
        self._task: asyncio.Task[None] | None = None
        self._lag_reported: set[tuple[str, int]] = set()
        self._in_hand = False
        """Whether a batch is being handled or committed (a stop lets it finish)."""
        self._stopping = asyncio.Event()
        """Set by `stop`: the loop ends after the batch in hand."""
        self._progress_at = time.monotonic()
        """When the loop last completed something: a fetch, or a handler call."""

    async def start(self) -> None:
        self._stopping.clear()
        for topic in self.topics:  # at 0 from the start: a first dead letter is an increase
            metrics.DEAD_LETTERS.labels(self.group, topic)
        self._source = self.bus._source(self.group, self.topics)
        await self._source.start()
        self._progress_at = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.group}")
        self._task.add_done_callback(self._ended)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop: let the batch in hand finish (handled and committed) for up to `grace`
        seconds, then cancel — a batch cut short is rolled back and delivered again — and
        leave the group (Kafka: its partitions move to the other members at once)."""
        task, self._task = self._task, None
        if task is not None:
            task.remove_done_callback(self._ended)
            self._stopping.set()
            if grace > 0 and self._in_hand:  # idle (waiting on a fetch): nothing to finish
                with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), grace)
            task.cancel()
            # A loop that died has been logged already (`_ended`).
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._source is not None:
            await self._source.stop()
            self._source = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def health(self) -> str | None:
        """None while the consumer works; otherwise why not (`/readyz` reports it)."""
        return task_health(
            self._task, self._progress_at, self.stuck_after, "nothing fetched or handled"
        )

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The loop never ends by itself: if it did, say so loudly (`/readyz` shows it)."""
        error = None if task.cancelled() else task.exception()
        log.error(
            "consumer died",
            extra={"group": self.group, "error": repr(error) if error else "cancelled"},
            exc_info=error,
        )

    def watermarks(self) -> dict[tuple[str, int], float]:
        """Per assigned partition, the instant (epoch seconds) before which every message
        appended to it has been handled: the newest handled message's append time, or,
        once a fetch reached the partition's end and everything fetched was handled, the
        instant as of which it did (an idle, caught-up partition counts as current)."""
        return dict(self._through)

    async def _run(self) -> None:
        assert self._source is not None
        source = self._source
        while not self._stopping.is_set():
            try:
                batch = await source.fetch(self.batch_size, max_wait=1.0)
                reached = source.fetched_through()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fetch failed", extra={"group": self.group})
                await asyncio.sleep(1.0)
                continue
            finally:
                self._progress_at = time.monotonic()
            if self._stopping.is_set():
                break  # stopping: a batch fetched meanwhile is not started (nor committed)
            self._report_lag(source)
            if batch:
                self._in_hand = True
                try:
                    await self._handle(batch)
                    await self._commit(source, batch)
                finally:
                    self._in_hand = False
            await self._advance(batch, reached)

    async def _advance(self, batch: list[Received], reached: dict[tuple[str, int], float]) -> None:
        """Move the watermarks past what was just handled; report them every 0.2 s."""
        through = self._through
        for record in batch:
            pair = (record.topic, record.partition)
            if record.timestamp > through.get(pair, 0.0):
                through[pair] = record.timestamp
        for pair, instant in reached.items():
            if instant > through.get(pair, 0.0):
                through[pair] = instant
        if self.progress is None or time.monotonic() - self._reported_at < 0.2:
            return
        self._reported_at = time.monotonic()
        try:
            await self.progress(dict(through))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("progress report failed", extra={"group": self.group, "error": repr(exc)})

    async def _commit(self, source: Source, batch: list[Received]) -> None:
        try:
            await source.commit(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Lost the partitions in a rebalance: the new owner gets the batch again and
            # the handlers' idempotence absorbs the repeat.
            log.warning("commit failed; batch will be redelivered", exc_info=True)
        for record in batch:
            metrics.CONSUMED.labels(self.group, record.topic).inc()

    async def _handle(self, batch: list[Received]) -> None:
        if await self._attempt(batch, attempts=2):
            return
        # Something in the batch fails: narrow it down (halves, in order, so each key
        # keeps its order), and count attempts only against a message failing on its own.
        await self._isolate(batch)

    async def _isolate(self, records: list[Received]) -> None:
        if len(records) == 1:
            if not await self._attempt(records, attempts=self.max_attempts):
                await self._dead_letter(records[0])
            return
        middle = len(records) // 2
        for part in (records[:middle], records[middle:]):
            if not await self._attempt(part, attempts=1):
                await self._isolate(part)

    async def _attempt(self, batch: list[Received], attempts: int) -> bool:
        """Run the handler on `batch` until it succeeds (True) or failed `attempts` times
        for reasons of its own (False). Transient failures are retried without bound."""
        tries = 0
        conflicts = 0
        while True:
            started = time.perf_counter()
            try:
                await self.handler(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._progress_at = time.monotonic()
                self._last_error = exc
                metrics.CONSUMER_RETRIES.labels(self.group).inc()
                if is_lock_conflict(exc):
                    # Lost a race with another transaction: run it again shortly, with
                    # jitter so the two do not collide in step again.
                    conflicts += 1
                    log.info("lock conflict, retrying", extra={"group": self.group})
                    await asyncio.sleep(random.uniform(0, 0.01 * 2 ** min(conflicts, 7)))
                    continue
                if is_infrastructure_error(exc):
                    log.warning("infrastructure error, retrying", extra={"group": self.group})
                    await asyncio.sleep(max(self.backoff, 0.5))
                    continue
                tries += 1
                log.warning(
                    "handler failed",
                    extra={"group": self.group, "attempt": tries, "error": repr(exc)},
                )
                if tries >= attempts:
                    return False
                await asyncio.sleep(self.backoff * tries)
                continue
            self._progress_at = time.monotonic()
            metrics.CONSUMER_BATCH_SECONDS.labels(self.group).observe(time.perf_counter() - started)
            return True

    async def _dead_letter(self, record: Received) -> None:
        headers = {
            **record.headers,
            "dlt_error": repr(self._last_error)[:2000],
            "dlt_group": self.group,
            "dlt_topic": record.topic,
            "dlt_partition": str(record.partition),
            "dlt_offset": str(record.offset),
        }
        message = Message(dead_letter_topic(record.topic), record.key, record.value, headers)
        while True:
            try:
                await self.bus.publish([message])
                break
            except BusUnavailable:
                await asyncio.sleep(1.0)
        metrics.DEAD_LETTERS.labels(self.group, record.topic).inc()
        log.error(
            "message dead-lettered",
            extra={"group": self.group, "topic": record.topic, "offset": record.offset},
        )

    def _report_lag(self, source: Source) -> None:
        """Lag of each assigned partition; a partition this member no longer has stops
        being reported (its new owner reports it), so no stale series keeps an alert or
        an autoscaler high."""
        current = source.lag()
        for topic, partition in self._lag_reported - current.keys():
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(self.group, topic, str(partition))
        for (topic, partition), lag in current.items():
            metrics.CONSUMER_LAG.labels(self.group, topic, str(partition)).set(lag)
        self._lag_reported = set(current)


DLT_HEADERS = ("dlt_error", "dlt_group", "dlt_topic", "dlt_partition", "dlt_offset")


def replay_group(topic: str) -> str:
    """The consumer group whose committed position on `<topic>.dlt` records how far
    `replay_dead_letters` got, so a second run replays only what arrived since."""
    return f"huitou.dlt-replay.{topic}"


async def replay_dead_letters(
    bus: Bus, topic: str, *, batch_size: int = 500, within: float = 120.0
) -> int:
    """Publish every message of `<topic>.dlt` not replayed before back to `<topic>` (key,
    value and original headers; the `dlt_*` headers give way to `dlt_replayed_from`), then
    commit the replay group's position past them; returns how many were replayed.

    A message is republished before its position is committed, so an interrupted replay
    may publish a message twice when run again: consumers drop repeats by event id.
    Raises TimeoutError if the dead-letter topic could not be read to its end `within`
    seconds (e.g. the broker never assigned its partitions)."""
    await bus.ensure_topics([topic])
    source = bus._source(replay_group(topic), [dead_letter_topic(topic)])
    await source.start()
    replayed = 0
    try:
        async with asyncio.timeout(within):
            while True:
                batch = await source.fetch(batch_size, max_wait=0.5)
                if not batch:
                    if await source.caught_up():
                        return replayed
                    continue
                await bus.publish(
                    [
                        Message(
                            topic,
                            record.key,
                            record.value,
                            {
                                **{k: v for k, v in record.headers.items() if k not in DLT_HEADERS},
                                "dlt_replayed_from": f"{record.partition}:{record.offset}",
                            },
                        )
                        for record in batch
                    ]
                )
                await source.commit(batch)
                replayed += len(batch)
    finally:
        await source.stop()


def task_health(
    task: asyncio.Task[None] | None, progress_at: float, stuck_after: float, idle_what: str
) -> str | None:
    """Why a background loop is not working (None while it is): not started, dead (its
    task ended), or stuck (no progress since `progress_at` for `stuck_after` seconds)."""
    if task is None:
        return "not running"
    if task.done():
        if task.cancelled():
            return "dead: its task was cancelled"
        return f"dead: {task.exception()!r}"[:300]
    idle = time.monotonic() - progress_at
    if idle > stuck_after:
        return f"stuck: {idle_what} for {idle:.0f} s"
    return None

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
  Failures of the infrastructure itself (database unreachable) are retried without bound:
  the partition waits rather than dead-lettering healthy messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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


BatchHandler = Callable[[list[Received]], Awaitable[None]]
"""Handles a batch in one database transaction; raising means nothing was applied."""


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
    ) -> Consumer:
        """A consumer of `topics` in `group`; call `start()` to run it."""
        return Consumer(
            self,
            group,
            list(topics),
            handler,
            batch_size=batch_size or self.settings.consumer_batch_size,
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
    ) -> None:
        self.bus = bus
        self.group = group
        self.topics = topics
        self.handler = handler
        self.batch_size = batch_size
        self.max_attempts = bus.settings.consumer_max_attempts
        self.backoff = bus.settings.consumer_retry_backoff_s
        self._last_error: BaseException | None = None
        self._source: Source | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._source = self.bus._source(self.group, self.topics)
        await self._source.start()
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.group}")

    async def stop(self) -> None:
        """Stop at once; an unfinished batch is rolled back and delivered again later."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._source is not None:
            await self._source.stop()
            self._source = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        assert self._source is not None
        source = self._source
        while True:
            try:
                batch = await source.fetch(self.batch_size, max_wait=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fetch failed", extra={"group": self.group})
                await asyncio.sleep(1.0)
                continue
            self._report_lag(source)
            if not batch:
                continue
            await self._handle(batch)
            await self._commit(source, batch)

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
        # Something in the batch fails: find it by handling the records one at a time.
        for record in batch:
            if not await self._attempt([record], attempts=self.max_attempts):
                await self._dead_letter(record)

    async def _attempt(self, batch: list[Received], attempts: int) -> bool:
        tries = 0
        while True:
            started = time.perf_counter()
            try:
                await self.handler(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._last_error = exc
                metrics.CONSUMER_RETRIES.labels(self.group).inc()
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
        for (topic, partition), lag in source.lag().items():
            metrics.CONSUMER_LAG.labels(self.group, topic, str(partition)).set(lag)

"""The Kafka bus (aiokafka): `acks=all`, manual commits, batch consumption.

Idempotent production is a setting (`HUITOU_KAFKA_IDEMPOTENCE`), on by default for Apache
Kafka and off against brokers that reject InitProducerId (the Tansu build used in tests);
without it a retried produce can duplicate a message, which consumers absorb by event id.
A broker rejecting it makes `start()` close the producer and raise
`BusConfigurationError` naming the setting (the CLI prints that one line and exits).

Topics are created with `HUITOU_TOPIC_PARTITIONS`, `HUITOU_TOPIC_REPLICATION_FACTOR` and
`min.insync.replicas` = `HUITOU_TOPIC_MIN_INSYNC_REPLICAS` (production: 3 and 2, so an
`acks=all` publish is on two brokers before ingest answers 2xx; a single broker: 1 and 1).
Existing topics are left as they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from libs.common import metrics
from libs.common.bus.base import (
    Bus,
    BusConfigurationError,
    BusUnavailable,
    Message,
    Received,
    Source,
    dead_letter_topic,
)
from libs.common.settings import Settings

_SENDER_LOG = logging.getLogger("aiokafka.producer.sender")


def _is_init_producer_id_error(exc: BaseException) -> bool:
    """Whether `exc` came out of the producer's InitProducerId request (its start-up
    asks the broker for a producer id only when idempotence is on)."""
    if not isinstance(exc, KafkaError):
        return False
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name in ("_maybe_wait_for_pid", "_do_init_pid"):
            return True
        frame = frame.tb_next
    return False


class _HideInitProducerIdError(logging.Filter):
    """aiokafka logs its own line before raising; the raised error is explained instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "InitProducerIdRequest" not in record.getMessage()


class KafkaBus(Bus):
    """Kafka through aiokafka; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.bootstrap = settings.kafka_bootstrap
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=self.settings.kafka_idempotence,
            linger_ms=2,
            request_timeout_ms=int(self.settings.bus_publish_timeout_s * 1000),
            max_batch_size=256 * 1024,
        )
        hide = _HideInitProducerIdError()
        _SENDER_LOG.addFilter(hide)
        try:
            await producer.start()  # an idempotent producer gets its producer id here
        except BaseException as exc:
            await producer.stop()
            if self.settings.kafka_idempotence and _is_init_producer_id_error(exc):
                raise BusConfigurationError(
                    f"the Kafka broker at {','.join(self.bootstrap)} rejected the idempotent "
                    f"producer (InitProducerId: {type(exc).__name__}); set "
                    "HUITOU_KAFKA_IDEMPOTENCE=false for a broker without idempotent "
                    "producers, or enable them on the broker"
                ) from None
            raise
        finally:
            _SENDER_LOG.removeFilter(hide)
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        if self._producer is None:
            raise BusUnavailable("producer not started")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.bus_publish_timeout_s):
                futures = [
                    await self._producer.send(
                        m.topic,
                        value=m.value,
                        key=m.key.encode(),
                        headers=[(k, v.encode()) for k, v in m.headers.items()],
                    )
                    for m in messages
                ]
                await asyncio.gather(*futures)
        except (KafkaError, TimeoutError) as exc:
            raise BusUnavailable(repr(exc)) from exc
        metrics.BUS_PUBLISH_SECONDS.observe(time.perf_counter() - started)
        for m in messages:
            metrics.BUS_PUBLISHED.labels(m.topic).inc()

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            wanted = [t for topic in topics for t in (topic, dead_letter_topic(topic))]
            missing = [t for t in dict.fromkeys(wanted) if t not in existing]
            if missing:
                s = self.settings
                try:
                    response = await admin.create_topics(
                        [
                            NewTopic(
                                t,
                                s.topic_partitions,
                                s.topic_replication_factor,
                                topic_configs={
                                    "min.insync.replicas": str(s.topic_min_insync_replicas)
                                },
                            )
                            for t in missing
                        ]
                    )
                except TopicAlreadyExistsError:
                    return
                refused = []
                for name, code, *rest in response.topic_errors:
                    if code not in (0, TopicAlreadyExistsError.errno):
                        detail = f" ({rest[0]})" if rest and rest[0] else ""
                        refused.append(f"{name}: {for_code(code).__name__}{detail}")
                if refused:
                    raise BusConfigurationError(
                        "the Kafka broker refused to create topics with "
                        f"HUITOU_TOPIC_PARTITIONS={s.topic_partitions}, "
                        f"HUITOU_TOPIC_REPLICATION_FACTOR={s.topic_replication_factor}, "
                        f"HUITOU_TOPIC_MIN_INSYNC_REPLICAS={s.topic_min_insync_replicas}: "
                        + "; ".join(refused)
                    )
        finally:
            await admin.close()

    async def ping(self) -> None:
        if self._producer is None:
            raise BusUnavailable("producer not started")
        try:
            async with asyncio.timeout(5):
                await self._producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError) as exc:
            raise BusUnavailable(repr(exc)) from exc

    def _source(self, group: str, topics: Sequence[str]) -> Source:
        return KafkaSource(self, group, list(topics))


class KafkaSource(Source):
    """One member of a Kafka consumer group with manual commits."""

    def __init__(self, bus: KafkaBus, group: str, topics: list[str]) -> None:
        self.bus = bus
        self.consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bus.bootstrap,
            # Groups carry the topic namespace, as topics do: environments sharing a
            # cluster must not join (and rebalance) each other's groups.
            group_id=bus.settings.topic_namespace + group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=bus.settings.consumer_batch_size,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=bus.settings.consumer_fetch_max_wait_ms,
            session_timeout_ms=bus.settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=bus.settings.consumer_session_timeout_ms // 3,
        )
        self._next: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def fetch(self, max_records: int, max_wait: float) -> list[Received]:
        batches = await self.consumer.getmany(
            timeout_ms=int(max_wait * 1000), max_records=max_records
        )
        for tp, records in batches.items():
            self._next[tp] = records[-1].offset + 1
        for tp in self.consumer.assignment():
            if tp not in self._next:
                try:
                    self._next[tp] = await self.consumer.position(tp)
                except Exception:  # revoked meanwhile (a rebalance): known next time
                    continue
        return [
            Received(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=(record.key or b"").decode(),
                value=record.value,
                headers={k: v.decode() for k, v in record.headers},
                timestamp=record.timestamp / 1000,
            )
            for records in batches.values()
            for record in records
        ]

    async def commit(self, records: Sequence[Received]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        await self.consumer.commit(offsets)

    async def caught_up(self) -> bool:
        assignment = self.consumer.assignment()
        if not assignment:
            return False  # the group has not assigned the partitions yet
        wanted = set()
        for topic in self.consumer.subscription():
            partitions = self.consumer.partitions_for_topic(topic)
            if not partitions:
                return False
            wanted |= {TopicPartition(topic, p) for p in partitions}
        if not wanted <= assignment:
            return False
        ends = await self.consumer.end_offsets(list(assignment))
        for tp in assignment:
            if await self.consumer.position(tp) < ends[tp]:
                return False
        return True

    def fetched_through(self) -> dict[tuple[str, int], float]:
        """Partitions whose high watermark (as of their last fetch response) the fetched
        position has reached, with that response's time."""
        out = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            polled = self.consumer.last_poll_timestamp(tp)
            if end is not None and polled and self._next.get(tp, -1) >= end:
                out[(tp.topic, tp.partition)] = polled / 1000
        return out

    def lag(self) -> dict[tuple[str, int], int]:
        """High watermark minus the next offset to fetch, per assigned partition."""
        lags = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is not None and tp in self._next:
                lags[(tp.topic, tp.partition)] = max(0, end - self._next[tp])
        return lags

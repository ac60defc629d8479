"""The Kafka bus (aiokafka): `acks=all`, manual commits, batch consumption.

Idempotent production is a setting (`HUITOU_KAFKA_IDEMPOTENCE`), on by default for Apache
Kafka and off against brokers that reject InitProducerId (the Tansu build used in tests);
without it a retried produce can duplicate a message, which consumers absorb by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from libs.common import metrics
from libs.common.bus.base import Bus, BusUnavailable, Message, Received, Source, dead_letter_topic
from libs.common.settings import Settings


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
        await producer.start()
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
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(
                        [
                            NewTopic(
                                t,
                                self.settings.topic_partitions,
                                self.settings.kafka_replication_factor,
                            )
                            for t in missing
                        ]
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
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=bus.settings.consumer_batch_size,
            max_partition_fetch_bytes=4 * 1024 * 1024,
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
        return [
            Received(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=(record.key or b"").decode(),
                value=record.value,
                headers={k: v.decode() for k, v in record.headers},
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

    def lag(self) -> dict[tuple[str, int], int]:
        """High watermark minus the next offset to fetch, per assigned partition."""
        lags = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is not None and tp in self._next:
                lags[(tp.topic, tp.partition)] = max(0, end - self._next[tp])
        return lags

"""Read what a running platform published on a topic, from the bus itself: the embedded
bus's SQLite file, or every partition of a Kafka topic read from the beginning without a
consumer group. Duplicates stay in (a relay that crashed after publishing publishes again);
tests count distinct ids and idempotency keys."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import select

from libs.common.bus.embedded import bus_messages
from libs.common.db import Database
from libs.common.events import Envelope, decode_event, topic_name
from tests.platform import Platform


async def published(platform: Platform, logical: str, shop_id: str) -> list[Envelope]:
    """Every message of `shop_id` on the logical topic, in partition order."""
    topic = topic_name(logical, platform.settings.topic_namespace)
    values = await (_embedded(platform, topic) if platform.embedded else _kafka(platform, topic))
    events = [decode_event(v) for v in values]
    return [e for e in events if e.shop_id == shop_id]


async def _embedded(platform: Platform, topic: str) -> list[bytes]:
    path = (platform.settings.data_dir / "bus.db").resolve()
    db = Database(f"sqlite+aiosqlite:///{path}", "bus")
    try:
        async with db.connect() as conn:
            rows = await conn.execute(
                select(bus_messages.c.value)
                .where(bus_messages.c.topic == topic)
                .order_by(bus_messages.c.seq)
            )
            return [bytes(v) for v in rows.scalars()]
    finally:
        await db.dispose()


async def _kafka(platform: Platform, topic: str) -> list[bytes]:
    assert platform.settings.bus_url is not None
    bootstrap = platform.settings.bus_url.removeprefix("kafka://")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await consumer._client.fetch_all_metadata()
        wanted = [TopicPartition(topic, p) for p in partitions.partitions_for_topic(topic) or ()]
        if not wanted:
            return []
        consumer.assign(wanted)
        await consumer.seek_to_beginning(*wanted)
        ends = await consumer.end_offsets(wanted)
        values: list[bytes] = []
        while True:
            positions = [await consumer.position(tp) for tp in wanted]
            if all(pos >= ends[tp] for pos, tp in zip(positions, wanted, strict=True)):
                break
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                values += [r.value for r in records if r.value is not None]
        return values
    finally:
        await consumer.stop()

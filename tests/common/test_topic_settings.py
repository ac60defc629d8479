"""Topics are created with the configured replication factor and `min.insync.replicas`
(production defaults 3 and 2; the single test broker runs with 1 and 1)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from pydantic import ValidationError

from libs.common.bus import create_bus
from libs.common.settings import Settings
from tests.conftest import make_settings
from tests.servers import Broker


def test_production_defaults_and_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HUITOU_TOPIC_REPLICATION_FACTOR", "HUITOU_TOPIC_MIN_INSYNC_REPLICAS"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    assert (defaults.topic_replication_factor, defaults.topic_min_insync_replicas) == (3, 2)
    monkeypatch.setenv("HUITOU_TOPIC_REPLICATION_FACTOR", "1")
    monkeypatch.setenv("HUITOU_TOPIC_MIN_INSYNC_REPLICAS", "1")
    single = Settings()
    assert (single.topic_replication_factor, single.topic_min_insync_replicas) == (1, 1)
    with pytest.raises(ValidationError, match="MIN_INSYNC_REPLICAS"):
        Settings(topic_replication_factor=1, topic_min_insync_replicas=2)


async def describe(broker: Broker, topic: str) -> tuple[set[int], str | None]:
    """(replica counts of the topic's partitions, its min.insync.replicas)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.url.split("://", 1)[1])
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    replicas = {len(p["replicas"]) for p in described["partitions"]}
    entries: list[Any] = response.resources[0][4]
    insync = next((e[1] for e in entries if e[0] == "min.insync.replicas"), None)
    return replicas, insync


@pytest.mark.parametrize(("replication", "insync"), [(1, 1), (2, 2)])
async def test_topics_are_created_with_the_settings(
    broker: Broker, tmp_path: Path, replication: int, insync: int
) -> None:
    settings = make_settings(
        "distributed",
        tmp_path,
        bus=broker.url,
        topic_replication_factor=replication,
        topic_min_insync_replicas=insync,
    )
    topic = f"{settings.topic_namespace}settings-{uuid.uuid4().hex[:6]}"
    bus = create_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics([topic])
    finally:
        await bus.stop()
    for name in (topic, f"{topic}.dlt"):
        assert await describe(broker, name) == ({replication}, str(insync))


async def test_consumer_groups_carry_the_namespace(broker: Broker, tmp_path: Path) -> None:
    """Two environments on one cluster (namespaces A and B), each with a `lifecycle` group:
    each commits under its own group id, so neither joins nor rebalances the other's."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from libs.common.bus import Message, Received
    from tests.conftest import eventually

    committed: dict[str, int | None] = {}
    for env in ("a", "b"):
        settings = make_settings("distributed", tmp_path / env, bus=broker.url)
        topic = f"{settings.topic_namespace}orders"
        bus = create_bus(settings)
        await bus.start()
        seen: list[Received] = []

        async def collect(batch: list[Received], seen: list[Received] = seen) -> None:
            seen.extend(batch)

        consumer = bus.consumer("lifecycle", [topic], collect)
        try:
            await bus.ensure_topics([topic])
            await bus.publish([Message(topic, "k", b"{}")])
            await consumer.start()

            async def consumed(seen: list[Received] = seen) -> bool:
                return bool(seen)

            await eventually(consumed)
        finally:
            await consumer.stop()
            await bus.stop()
        assert len(seen) == 1
        partition = TopicPartition(topic, seen[0].partition)
        for group in (f"{settings.topic_namespace}lifecycle", "lifecycle"):
            reader = AIOKafkaConsumer(
                bootstrap_servers=broker.url.split("://", 1)[1], group_id=group
            )
            await reader.start()
            try:
                committed[f"{env}:{group == 'lifecycle'}"] = await reader.committed(partition)
            finally:
                await reader.stop()
    assert committed == {"a:False": 1, "a:True": None, "b:False": 1, "b:True": None}

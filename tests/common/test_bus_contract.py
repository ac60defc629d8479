"""The bus contract, held by the embedded bus and by Kafka (a real broker) alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from libs.common.bus import (
    Bus,
    BusUnavailable,
    Message,
    Received,
    create_bus,
    replay_dead_letters,
)
from libs.common.bus.base import Source, dead_letter_topic
from libs.common.settings import Settings
from tests.conftest import eventually


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = create_bus(settings)
    await b.start()
    yield b
    await b.stop()


def topic(settings: Settings, name: str = "contract") -> str:
    return f"{settings.topic_namespace}{name}"


class Collector:
    """A handler that records what it handled, optionally failing on chosen values."""

    def __init__(self, poison: set[bytes] | None = None) -> None:
        self.seen: list[Received] = []
        self.poison = poison or set()

    async def __call__(self, batch: list[Received]) -> None:
        if any(r.value in self.poison for r in batch):
            raise ValueError("poison message")
        self.seen.extend(batch)

    def values(self) -> list[bytes]:
        return [r.value for r in self.seen]


def messages(t: str, n: int, keys: int = 5, start: int = 0) -> list[Message]:
    return [Message(t, f"k{i % keys}", f"m{i}".encode()) for i in range(start, start + n)]


async def test_every_message_arrives_in_key_order(bus: Bus, settings: Settings) -> None:
    t = topic(settings)
    await bus.ensure_topics([t])
    await bus.publish(messages(t, 200))
    got = Collector()
    consumer = bus.consumer("g1", [t], got, batch_size=37)
    await consumer.start()
    await eventually(lambda: _ready(len(got.seen) >= 200))
    await consumer.stop()
    assert sorted(got.values()) == sorted(m.value for m in messages(t, 200))
    for key in {r.key for r in got.seen}:
        of_key = [int(r.value[1:]) for r in got.seen if r.key == key]
        assert of_key == sorted(of_key), f"key {key} out of order"
    assert len({r.partition for r in got.seen if r.key == "k1"}) == 1


async def test_committed_position_survives_a_restart(bus: Bus, settings: Settings) -> None:
    t = topic(settings)
    await bus.ensure_topics([t])
    await bus.publish(messages(t, 50))
    first = Collector()
    consumer = bus.consumer("g-restart", [t], first)
    await consumer.start()
    await eventually(lambda: _ready(len(first.seen) >= 50))
    await consumer.stop()

    await bus.publish(messages(t, 10, start=50))
    second = Collector()
    consumer = bus.consumer("g-restart", [t], second)
    await consumer.start()
    await eventually(lambda: _ready(len(second.seen) >= 10))
    # A marker behind every key: once all are in, anything redelivered would be too.
    markers = [Message(t, f"k{i}", f"marker{i}".encode()) for i in range(5)]
    await bus.publish(markers)
    await eventually(lambda: _ready({m.value for m in markers} <= set(second.values())))
    await consumer.stop()
    delivered = [v for v in second.values() if not v.startswith(b"marker")]
    assert sorted(delivered) == sorted(m.value for m in messages(t, 10, start=50))


async def test_batch_stopped_mid_handler_is_delivered_again(bus: Bus, settings: Settings) -> None:
    t = topic(settings)
    await bus.ensure_topics([t])
    await bus.publish(messages(t, 20))
    started = asyncio.Event()

    async def stuck(batch: list[Received]) -> None:
        started.set()
        await asyncio.sleep(3600)

    consumer = bus.consumer("g-stuck", [t], stuck)
    await consumer.start()
    await asyncio.wait_for(started.wait(), 30)
    await consumer.stop()

    again = Collector()
    consumer = bus.consumer("g-stuck", [t], again)
    await consumer.start()
    await eventually(lambda: _ready(len(again.seen) >= 20))
    await consumer.stop()
    assert sorted(again.values()) == sorted(m.value for m in messages(t, 20))


async def test_a_graceful_stop_finishes_and_commits_the_batch_in_hand(
    bus: Bus, settings: Settings
) -> None:
    """SIGTERM's path (`Runtime.stop`): the batch being handled when the stop comes is
    finished and committed, no new one is begun, and the next member of the group gets
    exactly the rest — nothing handled twice."""
    t = topic(settings)
    await bus.ensure_topics([t])
    await bus.publish(messages(t, 60))
    started, release = asyncio.Event(), asyncio.Event()
    first = Collector()

    async def slow(batch: list[Received]) -> None:
        started.set()
        await release.wait()
        await first(batch)

    consumer = bus.consumer("g-graceful", [t], slow, batch_size=10)
    await consumer.start()
    await asyncio.wait_for(started.wait(), 30)
    stopping = asyncio.create_task(consumer.stop(grace=30))
    await asyncio.sleep(0)  # the stop is under way while the handler still works
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 40)
    assert 0 < len(first.seen) <= 10  # the batch in hand, and no other

    rest = Collector()
    consumer = bus.consumer("g-graceful", [t], rest)
    await consumer.start()
    expected = 60 - len(first.seen)
    await eventually(lambda: _ready(len(rest.seen) >= expected))
    markers = [Message(t, f"k{i}", f"marker{i}".encode()) for i in range(5)]
    await bus.publish(markers)
    await eventually(lambda: _ready({m.value for m in markers} <= set(rest.values())))
    await consumer.stop()
    again = [v for v in rest.values() if not v.startswith(b"marker")]
    assert sorted(first.values() + again) == sorted(m.value for m in messages(t, 60))


async def test_each_group_sees_every_message(bus: Bus, settings: Settings) -> None:
    t = topic(settings)
    await bus.ensure_topics([t])
    await bus.publish(messages(t, 30))
    a, b = Collector(), Collector()
    consumers = [bus.consumer("ga", [t], a), bus.consumer("gb", [t], b)]
    for c in consumers:
        await c.start()
    await eventually(lambda: _ready(len(a.seen) >= 30 and len(b.seen) >= 30))
    for c in consumers:
        await c.stop()
    assert sorted(a.values()) == sorted(b.values()) == sorted(m.value for m in messages(t, 30))


async def test_members_of_one_group_split_the_partitions(bus: Bus, settings: Settings) -> None:
    t = topic(settings)
    await bus.ensure_topics([t])
    a, b = Collector(), Collector()
    consumers = [bus.consumer("gsplit", [t], a), bus.consumer("gsplit", [t], b)]
    for c in consumers:
        await c.start()
    published = 0

    async def both_members_work() -> bool:
        # Keep messages coming until the group has settled with work for both members.
        nonlocal published
        await bus.publish(messages(t, 40, keys=40, start=published))
        published += 40
        return bool(a.seen and b.seen)

    await eventually(both_members_work, within=60, every=0.2)
    sent = {m.value for m in messages(t, published, keys=40)}
    await eventually(lambda: _ready(len({*a.values(), *b.values()}) >= len(sent)), within=60)
    tail = {m.value for m in messages(t, 40, keys=40, start=published - 40)}
    for c in consumers:
        await c.stop()
    assert {*a.values(), *b.values()} == sent
    assert a.seen and b.seen, "both members should own partitions"
    # Once settled, each partition belongs to one member: the last round did not overlap.
    last = [{r.partition for r in c.seen if r.value in tail} for c in (a, b)]
    assert not last[0] & last[1]


async def test_poison_message_goes_to_dead_letters_and_the_rest_flows(
    bus: Bus, settings: Settings
) -> None:
    t = topic(settings)
    await bus.ensure_topics([t])
    await bus.publish(messages(t, 10))
    handler = Collector(poison={b"m3"})
    consumer = bus.consumer("g-poison", [t], handler)
    await consumer.start()
    dead = Collector()
    dlt = bus.consumer("g-dlt", [dead_letter_topic(t)], dead)
    await dlt.start()
    await eventually(lambda: _ready(len(handler.seen) >= 9 and len(dead.seen) >= 1))
    await consumer.stop()
    await dlt.stop()
    assert sorted(handler.values()) == sorted(f"m{i}".encode() for i in range(10) if i != 3)
    assert dead.values() == [b"m3"]
    assert "poison message" in dead.seen[0].headers["dlt_error"]
    assert dead.seen[0].headers["dlt_topic"] == t


async def test_publish_on_a_stopped_bus_is_refused(settings: Settings) -> None:
    b = create_bus(settings)
    await b.start()
    await b.stop()
    with pytest.raises(BusUnavailable):
        await b.publish([Message(topic(settings), "k", b"v")])


async def _ready(value: bool) -> bool:
    return value


class LockConflict(Exception):
    """What a driver raises when a transaction lost a race (PostgreSQL SQLSTATE 40001)."""

    sqlstate = "40001"


class ShopsHandler:
    """A transactional handler over messages of several shops: a call applies all of its
    batch or, raising, none. The poison message always fails; every healthy message first
    loses `conflicts` lock races whenever it is handled without the poison (as a message
    does under contention while the batch around a poison is being narrowed down)."""

    def __init__(self, poison: bytes, conflicts: int) -> None:
        self.poison = poison
        self.conflicts = conflicts
        self.lost: dict[bytes, int] = {}
        self.applied: dict[bytes, int] = {}
        self.saw_mixed_batch = False

    async def __call__(self, batch: list[Received]) -> None:
        values = [r.value for r in batch]
        if self.poison in values:
            self.saw_mixed_batch |= len(values) > 1
            raise ValueError("poison message")
        losing = [v for v in values if self.lost.get(v, 0) < self.conflicts]
        if losing:
            for value in losing:
                self.lost[value] = self.lost.get(value, 0) + 1
            raise LockConflict("could not serialize access due to concurrent update")
        for value in values:
            self.applied[value] = self.applied.get(value, 0) + 1


async def test_a_poison_message_takes_no_other_shops_message_to_dead_letters(
    bus: Bus, settings: Settings
) -> None:
    t = topic(settings, "contract-shops")
    await bus.ensure_topics([t])
    poison = b"shop-a:poison"
    healthy = [f"shop-b:m{i}".encode() for i in range(12)]
    await bus.publish(
        [Message(t, "shop-a:cust-1", poison)]
        + [Message(t, f"shop-b:cust-{i % 3}", value) for i, value in enumerate(healthy)]
    )
    handler = ShopsHandler(poison, conflicts=settings.consumer_max_attempts)
    consumer = bus.consumer("g-shops", [t], handler, batch_size=100)
    dead = Collector()
    dlt = bus.consumer("g-shops-dlt", [dead_letter_topic(t)], dead)
    await consumer.start()
    await dlt.start()
    await eventually(lambda: _ready(len(handler.applied) >= len(healthy) and bool(dead.seen)))
    await consumer.stop()
    # Anything dead-lettered came before the consumer moved on; a marker per key published
    # now (same key, so same partition, behind it) shows the dead letters read to there.
    keys = ["shop-a:cust-1", *(f"shop-b:cust-{i}" for i in range(3))]
    await bus.publish([Message(dead_letter_topic(t), key, b"marker") for key in keys])
    await eventually(lambda: _ready(dead.values().count(b"marker") == len(keys)))
    await dlt.stop()
    assert handler.saw_mixed_batch, "the poison should share a batch with the healthy ones"
    assert [v for v in dead.values() if v != b"marker"] == [poison]
    assert handler.applied == dict.fromkeys(healthy, 1)


async def test_dead_letters_are_replayed_once_each(bus: Bus, settings: Settings) -> None:
    t = topic(settings, "contract-replay")
    await bus.ensure_topics([t])
    await bus.publish(messages(t, 6))
    handler = Collector(poison={b"m2"})
    consumer = bus.consumer("g-replay", [t], handler)
    dead = Collector()
    dlt = bus.consumer("g-replay-dlt", [dead_letter_topic(t)], dead)
    await consumer.start()
    await dlt.start()
    await eventually(lambda: _ready(len(handler.seen) >= 5 and bool(dead.seen)))
    await dlt.stop()
    handler.poison.clear()  # the bug is fixed: what was dead-lettered can go through now
    assert await replay_dead_letters(bus, t) == 1
    await eventually(lambda: _ready(b"m2" in handler.values()))
    assert await replay_dead_letters(bus, t) == 0, "a second run replays nothing again"
    await bus.publish([Message(dead_letter_topic(t), "k9", b"m9", {"dlt_error": "x"})])
    assert await replay_dead_letters(bus, t) == 1, "only what arrived since"
    await eventually(lambda: _ready(b"m9" in handler.values()))
    await consumer.stop()
    assert sorted(handler.values()) == sorted([*(f"m{i}".encode() for i in range(6)), b"m9"])
    replayed = next(r for r in handler.seen if r.value == b"m2")
    assert "dlt_error" not in replayed.headers
    assert replayed.headers["dlt_replayed_from"].count(":") == 1


class _Lagging(Source):
    """A source whose assignment the test sets (a rebalance), for the lag gauge."""

    def __init__(self) -> None:
        self.lags: dict[tuple[str, int], int] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def fetch(self, max_records: int, max_wait: float) -> list[Received]:
        return []

    async def commit(self, records: Sequence[Received]) -> None:
        return None

    def lag(self) -> dict[tuple[str, int], int]:
        return dict(self.lags)

    def fetched_through(self) -> dict[tuple[str, int], float]:
        return {}

    async def caught_up(self) -> bool:
        return True


def test_a_partition_given_up_stops_being_reported_as_lag(tmp_path: Path) -> None:
    """After a rebalance the partition's new owner reports its lag; the old member's last
    value must not linger (it would hold an autoscaler or a lag alert up)."""
    bus = create_bus(Settings(data_dir=tmp_path))
    consumer = bus.consumer("g-lag-gauge", ["t-lag"], Collector())
    source = _Lagging()

    def reported() -> dict[str, float]:
        return {
            s.labels["partition"]: s.value
            for m in REGISTRY.collect()
            if m.name == "huitou_consumer_lag"
            for s in m.samples
            if s.labels.get("group") == "g-lag-gauge"
        }

    source.lags = {("t-lag", 0): 5, ("t-lag", 1): 7}
    consumer._report_lag(source)
    assert reported() == {"0": 5.0, "1": 7.0}
    source.lags = {("t-lag", 1): 2}  # partition 0 moved to another member
    consumer._report_lag(source)
    assert reported() == {"1": 2.0}

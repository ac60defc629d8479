"""The embedded bus: Kafka's semantics in a SQLite file, for one-process deployments.

Messages live in `bus.db` under the data folder, one row each with a global sequence
number; a topic has `embedded_partitions` partitions chosen by a hash of the key, so one
key keeps its order. Consumer groups keep committed positions per partition in the same
file, so a restart resumes where the group left off and redelivers what was uncommitted.
Members of one group (in this process) split the partitions between them.

Publishing is group-committed: concurrent `publish` calls queue their messages and one
writer task stores everything queued in a single transaction (`synchronous=FULL`), then
acknowledges every caller. A publish not stored within `HUITOU_BUS_PUBLISH_TIMEOUT_S`
(`bus.db` locked or stalled) raises `BusUnavailable`, as a Kafka produce does, so ingest
answers 503 instead of hanging. Messages older than the retention that every group has
consumed are deleted in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    select,
)

from libs.common import metrics
from libs.common.bus.base import Bus, BusUnavailable, Message, Received, Source
from libs.common.db.dialect import upsert
from libs.common.db.engine import Database
from libs.common.db.group_commit import GroupCommitter
from libs.common.settings import Settings

_meta = MetaData()
bus_messages = Table(
    "bus_messages",
    _meta,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(200), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("key", String(400), nullable=False),
    Column("value", LargeBinary, nullable=False),
    Column("headers", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_bus_messages_topic_partition_seq", "topic", "partition", "seq"),
)
bus_offsets = Table(
    "bus_offsets",
    _meta,
    Column("group_id", String(200), primary_key=True),
    Column("topic", String(200), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("position", Integer, nullable=False),
)


def partition_for(key: str, partitions: int) -> int:
    """Stable partition of a key (crc32, so it survives restarts)."""
    return zlib.crc32(key.encode()) % partitions


class EmbeddedBus(Bus):
    """Durable bus in SQLite; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.partitions = settings.embedded_partitions
        url = f"sqlite+aiosqlite:///{(settings.data_dir / 'bus.db').resolve()}"
        self.db = Database(url, "bus")
        self._writer = GroupCommitter(
            self.db, self._store, name="embedded-bus", timeout=settings.bus_publish_timeout_s
        )
        self._janitor: asyncio.Task[None] | None = None
        self._published = asyncio.Condition()
        self._publications: dict[str, int] = {}
        """Committed publish calls per topic, so a consumer can wait for "anything newer
        on my topics than what I looked at" without missing a publish that lands while it
        is querying (and without waking for the other topics' messages)."""
        self._members: dict[str, list[EmbeddedSource]] = {}

    async def start(self) -> None:
        async with self.db.begin() as conn:
            await conn.run_sync(_meta.create_all)
        await self._writer.start()
        self._janitor = asyncio.create_task(self._retention_loop(), name="embedded-bus-gc")

    async def stop(self) -> None:
        await self._writer.stop()
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
            self._janitor = None
        await self.db.dispose()

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Topics need no creation here: a partition exists once a message is in it."""

    async def ping(self) -> None:
        if not self._writer.running:
            raise BusUnavailable("embedded bus writer is not running")
        await self.db.ping()

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        if not self._writer.running:
            raise BusUnavailable("embedded bus is not running")
        now = time.time()
        rows = [
            {
                "topic": m.topic,
                "partition": partition_for(m.key, self.partitions),
                "key": m.key,
                "value": m.value,
                "headers": orjson.dumps(m.headers).decode(),
                "created_at": now,
            }
            for m in messages
        ]
        started = time.perf_counter()
        try:
            await self._writer.submit(rows)
        except Exception as exc:
            raise BusUnavailable(repr(exc)) from exc
        for topic in {m.topic for m in messages}:
            self._publications[topic] = self._publications.get(topic, 0) + 1
        async with self._published:
            self._published.notify_all()
        metrics.BUS_PUBLISH_SECONDS.observe(time.perf_counter() - started)
        for m in messages:
            metrics.BUS_PUBLISHED.labels(m.topic).inc()

    @staticmethod
    async def _store(conn: Any, rows: list[dict[str, Any]]) -> None:
        await conn.execute(insert(bus_messages), rows)

    def publications(self, topics: Sequence[str]) -> int:
        """How many publish calls to any of `topics` committed so far."""
        return sum(self._publications.get(topic, 0) for topic in topics)

    async def wait_for_publish(self, topics: Sequence[str], after: int, max_wait: float) -> None:
        """Return once a publish to one of `topics` newer than count `after` committed, or
        after `max_wait`."""
        with contextlib.suppress(TimeoutError):
            async with self._published:
                await asyncio.wait_for(
                    self._published.wait_for(lambda: self.publications(topics) != after),
                    max_wait,
                )

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(60)
            await self.delete_consumed(time.time() - self.settings.embedded_retention_hours * 3600)

    async def delete_consumed(self, older_than: float) -> None:
        """Delete messages older than `older_than` that every known group has consumed."""
        async with self.db.begin() as conn:
            floors = (
                await conn.execute(
                    select(
                        bus_offsets.c.topic,
                        bus_offsets.c.partition,
                        func.min(bus_offsets.c.position),
                    ).group_by(bus_offsets.c.topic, bus_offsets.c.partition)
                )
            ).all()
            for topic, partition, floor in floors:
                await conn.execute(
                    delete(bus_messages).where(
                        and_(
                            bus_messages.c.topic == topic,
                            bus_messages.c.partition == partition,
                            bus_messages.c.seq <= floor,
                            bus_messages.c.created_at < older_than,
                        )
                    )
                )

    def _source(self, group: str, topics: Sequence[str]) -> Source:
        return EmbeddedSource(self, group, list(topics))

    def _join(self, source: EmbeddedSource) -> None:
        self._members.setdefault(source.group, []).append(source)
        self._rebalance(source.group)

    def _leave(self, source: EmbeddedSource) -> None:
        members = self._members.get(source.group, [])
        if source in members:
            members.remove(source)
        self._rebalance(source.group)

    def _rebalance(self, group: str) -> None:
        members = self._members.get(group, [])
        for member in members:
            member.assignment = []
        if not members:
            return
        topics = sorted({t for m in members for t in m.topics})
        pairs = [(t, p) for t in topics for p in range(self.partitions)]
        index = 0
        for pair in pairs:
            eligible = [m for m in members if pair[0] in m.topics]
            if eligible:
                eligible[index % len(eligible)].assignment.append(pair)
                index += 1
        for member in members:
            member.positions.clear()


class EmbeddedSource(Source):
    """One member of a consumer group on the embedded bus."""

    def __init__(self, bus: EmbeddedBus, group: str, topics: list[str]) -> None:
        self.bus = bus
        self.group = group
        self.topics = topics
        self.assignment: list[tuple[str, int]] = []
        self.positions: dict[tuple[str, int], int] = {}
        """Position of the last fetched record per partition (ahead of the committed one)."""
        self._lag: dict[tuple[str, int], int] = {}
        self._lag_measured_at = 0.0
        self._through: dict[tuple[str, int], float] = {}
        """Partitions the last fetch read to their end, and as of when."""

    async def start(self) -> None:
        self.bus._join(self)

    async def stop(self) -> None:
        self.bus._leave(self)

    async def _load_positions(self) -> None:
        missing = [pair for pair in self.assignment if pair not in self.positions]
        if not missing:
            return
        async with self.bus.db.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        bus_offsets.c.topic, bus_offsets.c.partition, bus_offsets.c.position
                    ).where(bus_offsets.c.group_id == self.group)
                )
            ).all()
        committed = {(t, p): pos for t, p, pos in rows}
        for pair in missing:
            self.positions[pair] = committed.get(pair, 0)

    async def fetch(self, max_records: int, max_wait: float) -> list[Received]:
        deadline = time.monotonic() + max_wait
        while True:
            seen = self.bus.publications(self.topics)
            records = await self._fetch_once(max_records)
            remaining = deadline - time.monotonic()
            if records or remaining <= 0:
                return records
            await self.bus.wait_for_publish(self.topics, seen, remaining)

    async def _fetch_once(self, max_records: int) -> list[Received]:
        await self._load_positions()
        records: list[Received] = []
        self._through = {}
        async with self.bus.db.connect() as conn:
            for topic, partition in await self._with_news(conn):
                if len(records) >= max_records:
                    break
                position = self.positions.get((topic, partition), 0)
                wanted = max_records - len(records)
                started = time.time()
                rows = (
                    await conn.execute(
                        select(
                            bus_messages.c.seq,
                            bus_messages.c.key,
                            bus_messages.c.value,
                            bus_messages.c.headers,
                            bus_messages.c.created_at,
                        )
                        .where(
                            bus_messages.c.topic == topic,
                            bus_messages.c.partition == partition,
                            bus_messages.c.seq > position,
                        )
                        .order_by(bus_messages.c.seq)
                        .limit(wanted)
                    )
                ).all()
                for seq, key, value, headers, created_at in rows:
                    records.append(
                        Received(
                            topic, partition, seq, key, value, orjson.loads(headers), created_at
                        )
                    )
                if rows:
                    self.positions[(topic, partition)] = rows[-1][0]
                if len(rows) < wanted:  # its end: everything stored before `started`
                    self._through[(topic, partition)] = started
            if time.monotonic() - self._lag_measured_at > 5.0:
                await self._measure_lag(conn)
        return records

    async def _with_news(self, conn: Any) -> list[tuple[str, int]]:
        """The assigned partitions holding messages past their positions, found with one
        statement (the next sequence number of each, an index seek apiece); the others
        are read to their end as of now. A fetch asked each partition in turn before: a
        consumer woken by a publish ran as many statements as it has partitions, and the
        embedded platform's consumers spent most of its CPU on them."""
        assignment = list(self.assignment)
        if not assignment:
            return []
        m = bus_messages.c
        started = time.time()
        probes = [
            select(m.seq)
            .where(m.topic == t, m.partition == p, m.seq > self.positions.get((t, p), 0))
            .order_by(m.seq)
            .limit(1)
            .scalar_subquery()
            for t, p in assignment
        ]
        nexts = (await conn.execute(select(*probes))).one()
        busy = []
        for pair, next_seq in zip(assignment, nexts, strict=True):
            if next_seq is None:
                self._through[pair] = started
            else:
                busy.append(pair)
        return busy

    async def _measure_lag(self, conn: Any) -> None:
        """Count what lies beyond each position (an index range scan as long as the lag)."""
        self._lag_measured_at = time.monotonic()
        self._lag = {}
        for topic, partition in self.assignment:
            self._lag[(topic, partition)] = (
                await conn.execute(
                    select(func.count()).where(
                        bus_messages.c.topic == topic,
                        bus_messages.c.partition == partition,
                        bus_messages.c.seq > self.positions.get((topic, partition), 0),
                    )
                )
            ).scalar_one()

    async def commit(self, records: Sequence[Received]) -> None:
        last: dict[tuple[str, int], int] = {}
        for r in records:
            last[(r.topic, r.partition)] = max(last.get((r.topic, r.partition), 0), r.offset)
        rows = [
            {"group_id": self.group, "topic": t, "partition": p, "position": pos}
            for (t, p), pos in last.items()
        ]
        async with self.bus.db.begin() as conn:
            await conn.execute(
                upsert(conn, bus_offsets, ["group_id", "topic", "partition"], ["position"]),
                rows,
            )

    def lag(self) -> dict[tuple[str, int], int]:
        return dict(self._lag)

    def fetched_through(self) -> dict[tuple[str, int], float]:
        return dict(self._through)

    async def caught_up(self) -> bool:
        await self._load_positions()
        async with self.bus.db.connect() as conn:
            for topic, partition in self.assignment:
                last = (
                    await conn.execute(
                        select(func.max(bus_messages.c.seq)).where(
                            bus_messages.c.topic == topic,
                            bus_messages.c.partition == partition,
                        )
                    )
                ).scalar()
                if last is not None and last > self.positions.get((topic, partition), 0):
                    return False
        return True

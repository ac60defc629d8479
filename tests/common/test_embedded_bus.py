"""The embedded bus's fetch costs what the news costs: a consumer wakes for its own topics
only, and a fetch reads the partitions that hold something new (one statement finds them)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import event

from libs.common.bus import Message, Received
from libs.common.bus.embedded import EmbeddedBus
from tests.conftest import eventually, make_settings


async def test_a_consumer_wakes_for_its_own_topics_only(tmp_path: Path) -> None:
    bus = EmbeddedBus(make_settings("embedded", tmp_path))
    await bus.start()
    try:
        mine = ["orders"]
        waiter = asyncio.create_task(bus.wait_for_publish(mine, bus.publications(mine), 60))
        await bus.publish([Message("notifications", "k", b"{}")])
        for _ in range(20):  # let the waiter see the notification and go back to waiting
            await asyncio.sleep(0)
        assert not waiter.done(), "another topic's message woke the consumer"
        await bus.publish([Message("orders", "k", b"{}")])
        await asyncio.wait_for(waiter, 10)
    finally:
        await bus.stop()


async def test_a_fetch_reads_only_the_partitions_with_news(tmp_path: Path) -> None:
    settings = make_settings("embedded", tmp_path, embedded_partitions=8)
    bus = EmbeddedBus(settings)
    await bus.start()
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "bus_messages" in statement and statement.lstrip().startswith("SELECT"):
            statements.append(statement)

    got: list[Received] = []

    async def collect(batch: list[Received]) -> None:
        got.extend(batch)

    consumer = bus.consumer("g", ["orders"], collect)
    try:
        await bus.publish([Message("orders", "one-key", b"{}")])
        event.listen(bus.db.engine.sync_engine, "before_cursor_execute", record)
        await consumer.start()

        async def consumed() -> bool:
            return bool(got)

        await eventually(consumed)
    finally:
        await consumer.stop()
        event.remove(bus.db.engine.sync_engine, "before_cursor_execute", record)
        await bus.stop()
    assert [r.key for r in got] == ["one-key"]
    finding = [s for s in statements if s.lstrip().startswith("SELECT (SELECT")]
    reading = [s for s in statements if s.lstrip().startswith("SELECT bus_messages.seq")]
    assert finding, "no statement found the partitions with news"
    # One partition of eight held the message: it alone was read, once (a fetch read all
    # eight in turn before, and again at every wake-up).
    assert len(reading) == 1, f"{len(reading)} partition reads for one message"

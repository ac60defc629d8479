"""A stalled `bus.db` (or ledger database) makes a publish fail within the publish timeout,
as a Kafka produce does, instead of hanging the request for SQLite's minute-long busy wait."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from libs.common.bus import BusUnavailable, Message, create_bus
from libs.common.db import Database
from libs.common.db.group_commit import GroupCommitter
from tests.conftest import make_settings

GUARD_S = 20.0
"""Far below SQLite's 60 s busy timeout: without a publish timeout the call is still
waiting when this runs out (a bound on a hang, not a speed assertion)."""

Hold = Callable[[Path], Callable[[], None]]


@pytest.fixture
def write_lock() -> Iterator[Hold]:
    """`hold(path)` takes SQLite's write lock on a database file from another connection
    (BEGIN IMMEDIATE), as a process stuck in a transaction would, and returns `release`;
    whatever is still held is released at the end."""
    held: list[sqlite3.Connection] = []

    def release(conn: sqlite3.Connection) -> None:
        if conn in held:
            held.remove(conn)
            conn.execute("ROLLBACK")
            conn.close()

    def hold(path: Path) -> Callable[[], None]:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.append(conn)
        return lambda: release(conn)

    yield hold
    for conn in list(held):
        release(conn)


async def test_embedded_publish_times_out_while_bus_db_is_locked(
    tmp_path: Path, write_lock: Hold
) -> None:
    settings = make_settings("embedded", tmp_path, bus_publish_timeout_s=0.5)
    bus = create_bus(settings)
    await bus.start()
    try:
        await bus.publish([Message("t", "k", b"before")])
        release = write_lock(tmp_path / "bus.db")
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(BusUnavailable, match=r"not committed within 0\.5 s"):
                await bus.publish([Message("t", "k", b"stalled")])
        release()
        await bus.publish([Message("t", "k", b"after")])  # the bus recovers by itself
    finally:
        await bus.stop()


async def test_group_commit_submit_times_out_while_the_database_is_locked(
    tmp_path: Path, write_lock: Hold
) -> None:
    path = tmp_path / "ledger.db"
    db = Database(f"sqlite+aiosqlite:///{path}", "ledger")
    async with db.begin() as conn:
        await conn.execute(text("CREATE TABLE ledger (id TEXT PRIMARY KEY)"))

    async def write(conn: Any, rows: list[dict[str, Any]]) -> None:
        await conn.execute(text("INSERT INTO ledger (id) VALUES (:id)"), rows)

    committer = GroupCommitter(db, write, name="ledger", timeout=0.5)
    await committer.start()
    try:
        release = write_lock(path)
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(TimeoutError, match=r"ledger: not committed within 0\.5 s"):
                await committer.submit([{"id": "a"}])
        release()
        # Recovery, not speed: on a loaded machine the writer's busy wait may outlast 0.5 s.
        committer.timeout = GUARD_S
        await committer.submit([{"id": "b"}])
    finally:
        await committer.stop()
        await db.dispose()

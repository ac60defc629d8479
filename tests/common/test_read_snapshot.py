"""`Database.connect()` reads one snapshot for the whole block in both dialects: a commit
made by another connection between two of its statements is not seen by the second (an
API view read in two statements never mixes states from before and after a commit)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from libs.common.db import Database
from tests.servers import fresh_database


async def _reads_one_snapshot(db: Database) -> None:
    await db.ensure_schema()
    async with db.begin() as conn:
        await conn.execute(text("CREATE TABLE totals (id int PRIMARY KEY, n int NOT NULL)"))
        await conn.execute(text("INSERT INTO totals VALUES (1, 0)"))
    async with db.connect() as reader:
        first = (await reader.execute(text("SELECT n FROM totals WHERE id = 1"))).scalar()
        async with db.begin() as writer:
            await writer.execute(text("UPDATE totals SET n = n + 1 WHERE id = 1"))
        second = (await reader.execute(text("SELECT n FROM totals WHERE id = 1"))).scalar()
    assert (first, second) == (0, 0), "the read block saw a commit made during it"
    async with db.connect() as later:
        assert (await later.execute(text("SELECT n FROM totals"))).scalar() == 1


async def test_postgres_reads_one_snapshot(pg_url: str) -> None:
    db = Database(await fresh_database(pg_url), "snapshot")
    try:
        await _reads_one_snapshot(db)
    finally:
        await db.dispose()


async def test_sqlite_reads_one_snapshot(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/snapshot.db", "snapshot")
    try:
        await _reads_one_snapshot(db)
    finally:
        await db.dispose()

"""`HeldReads` on a real PostgreSQL: every read goes over one held connection (no
pre-ping, BEGIN or ROLLBACK around it, and the per-execution planning set once), and a
connection the server killed costs one failed read, after which reads work again."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text

from libs.common.db import Database
from libs.common.db.held import HeldReads
from tests.servers import asyncpg_kwargs, fresh_database


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[tuple[Database, str]]:
    url = await fresh_database(pg_url)
    database = Database(url, "held")
    await database.ensure_schema()
    yield database, url
    await database.dispose()


async def _backend_and_state(reads: HeldReads) -> tuple[int, str, bool]:
    """The backend's pid, its plan_cache_mode, and whether the driver's connection was
    outside a transaction after the read (no BEGIN, no ROLLBACK to follow)."""
    async with reads.connection() as conn:
        row = (
            await conn.execute(text("SELECT pg_backend_pid(), current_setting('plan_cache_mode')"))
        ).one()
        raw = await conn.get_raw_connection()
        outside = not raw.driver_connection.is_in_transaction()  # type: ignore[union-attr]
    return int(row[0]), str(row[1]), outside


async def test_reads_share_one_connection_in_autocommit(db: tuple[Database, str]) -> None:
    database, _ = db
    reads = HeldReads(database)
    try:
        first = await _backend_and_state(reads)
        second = await _backend_and_state(reads)
        assert first[0] == second[0], "each read took another connection"
        assert first[1] == second[1] == "force_custom_plan"
        assert first[2] and second[2], "the read ran in a transaction"
    finally:
        await reads.close()


async def test_a_killed_connection_costs_one_read(db: tuple[Database, str]) -> None:
    database, url = db
    reads = HeldReads(database)
    try:
        pid, _, _ = await _backend_and_state(reads)
        admin = await asyncpg.connect(**asyncpg_kwargs(url))
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises for it
            await _backend_and_state(reads)
        again, mode, _ = await _backend_and_state(reads)
        assert again != pid
        assert mode == "force_custom_plan"
    finally:
        await reads.close()


async def test_sqlite_reads_through_the_pool(tmp_path: object) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/held.db", "held")
    reads = HeldReads(database)
    try:
        async with reads.connection() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await reads.close()
        await database.dispose()

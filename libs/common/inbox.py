"""Processed-event ids, so a handler applies each event once however often it arrives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import insert_ignore
from libs.common.db.keysets import columns_of, insert_select, reused, rows_params
from libs.common.db.tables import processed_events


async def claim_new(conn: AsyncConnection, consumer: str, event_ids: Iterable[str]) -> set[str]:
    """Record `event_ids` as processed by `consumer`; return those not seen before.

    Runs in the handler's transaction, so a rolled-back batch leaves no trace and the
    redelivered batch is applied in full.
    """
    ids = list(dict.fromkeys(event_ids))
    if not ids:
        return set()
    now = datetime.now(UTC)
    # One statement for the batch: the ids inserted are the new ones.
    stmt = reused(
        conn,
        "inbox.claim_new",
        lambda: insert_ignore(
            conn, processed_events, insert_select(conn, processed_events, _NAMES, None)
        ).returning(processed_events.c.event_id),
    )
    result = await conn.execute(
        stmt,
        rows_params(
            conn, "new", columns_of(processed_events, _NAMES), [(consumer, i, now) for i in ids]
        ),
    )
    return set(result.scalars())


_NAMES = ("consumer", "event_id", "processed_at")


def pruner(retention: timedelta) -> Callable[[AsyncConnection, datetime], Awaitable[None]]:
    """A job forgetting ids processed longer ago than `retention`: far beyond how late a
    bus can redeliver (uncommitted positions are minutes old, Kafka keeps a week)."""

    async def prune(conn: AsyncConnection, now: datetime) -> None:
        await conn.execute(
            delete(processed_events).where(processed_events.c.processed_at < now - retention)
        )

    return prune

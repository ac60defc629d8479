"""Transactional outbox: messages written with the change that caused them, relayed after.

`enqueue` inserts messages in the caller's transaction. The relay publishes them in id
order and deletes them once the bus has acknowledged. A crash between the two publishes
a message again on restart (consumers dedupe by event id); nothing is ever lost. Only one
relay per service publishes at a time (a PostgreSQL advisory lock, or SQLite's write
lock), which keeps per-key order across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
from sqlalchemy import BigInteger, ColumnElement, any_, bindparam, delete, insert, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common import metrics
from libs.common.bus.base import Bus, BusUnavailable, Message
from libs.common.db.engine import Database
from libs.common.db.keysets import columns_of, in_rows, insert_select, reused, rows_params
from libs.common.db.tables import outbox

log = logging.getLogger(__name__)


async def enqueue(conn: AsyncConnection, messages: Sequence[Message]) -> None:
    """Add messages to the outbox inside the caller's transaction."""
    if not messages:
        return
    now = datetime.now(UTC)
    dumps = orjson.dumps
    rows = [(m.topic, m.key, m.value, dumps(m.headers).decode(), now) for m in messages]
    if conn.dialect.name != "postgresql" and not all(_utf8(m.value) for m in messages):
        # SQLite passes the batch as JSON text, which cannot carry arbitrary bytes.
        await conn.execute(insert(outbox), [dict(zip(_NAMES, r, strict=True)) for r in rows])
        return
    # One statement for the batch, ids assigned in the given order (the relay's order).
    stmt = reused(
        conn,
        "outbox.enqueue",
        lambda: insert(outbox).from_select(
            _NAMES, insert_select(conn, outbox, _NAMES, None, ordered=True)
        ),
    )
    await conn.execute(stmt, rows_params(conn, "new", columns_of(outbox, _NAMES), rows))


_NAMES = ("topic", "key", "value", "headers", "created_at")


def _ids_in(conn: AsyncConnection, ids: list[int]) -> ColumnElement[bool]:
    """`id` among `ids` with a statement of one shape whatever their number (an expanded
    IN list is a new statement, prepared anew, for every batch size)."""
    if conn.dialect.name == "postgresql":
        return outbox.c.id == any_(bindparam("ids", ids, type_=ARRAY(BigInteger())))
    return in_rows(conn, "relayed", [outbox.c.id], [("id", BigInteger())], [(i,) for i in ids])


def _utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


class OutboxRelay:
    """Moves outbox rows to the bus; wake it with `notify()` after a commit."""

    def __init__(self, db: Database, bus: Bus, service: str, batch_size: int = 500) -> None:
        self.db = db
        self.bus = bus
        self.service = service
        self.batch_size = batch_size
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock_id = zlib.crc32(f"outbox:{service}".encode())

    def notify(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox:{self.service}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def relay_once(self) -> int:
        """Publish and delete up to one batch; returns how many rows were relayed."""
        async with self.db.begin() as conn:
            if self.db.is_postgres:
                got = await conn.scalar(
                    text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": self._lock_id}
                )
                if not got:
                    return 0
            rows = (
                await conn.execute(
                    select(
                        outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.value, outbox.c.headers
                    )
                    .order_by(outbox.c.id)
                    .limit(self.batch_size)
                )
            ).all()
            if not rows:
                return 0
            await self.bus.publish(
                [Message(r.topic, r.key, bytes(r.value), orjson.loads(r.headers)) for r in rows]
            )
            await conn.execute(delete(outbox).where(_ids_in(conn, [r.id for r in rows])))
        metrics.OUTBOX_RELAYED.labels(self.service).inc(len(rows))
        return len(rows)

    async def _run(self) -> None:
        while True:
            try:
                relayed = await self.relay_once()
            except asyncio.CancelledError:
                raise
            except BusUnavailable:
                log.warning("bus unavailable; outbox waits", extra={"service": self.service})
                await asyncio.sleep(1.0)
                continue
            except Exception:
                log.exception("outbox relay failed", extra={"service": self.service})
                await asyncio.sleep(1.0)
                continue
            if relayed < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                self._wake.clear()

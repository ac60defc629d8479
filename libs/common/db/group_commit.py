"""Group commit: many concurrent writers, one transaction (and one fsync) per round.

Callers `await submit(rows)`; a single writer task takes everything queued while the
previous round was committing, writes it with one executemany in one transaction, and
then wakes every caller (or hands each the round's error). Under load the rounds grow,
so the cost of durability is paid once per round instead of once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.engine import Database

Write = Callable[[AsyncConnection, list[dict[str, Any]]], Awaitable[None]]


class GroupCommitter:
    """Batches `submit` calls into shared transactions on `db`, written by `write`."""

    def __init__(self, db: Database, write: Write, *, name: str) -> None:
        self.db = db
        self.write = write
        self.name = name
        self._queue: asyncio.Queue[tuple[list[dict[str, Any]], asyncio.Future[None]]] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"group-commit:{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, rows: list[dict[str, Any]]) -> None:
        """Return once `rows` are committed; raise what the round's commit raised."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((rows, done))
        await done

    async def _run(self) -> None:
        while True:
            pending = [await self._queue.get()]
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            rows = [row for batch, _ in pending for row in batch]
            try:
                async with self.db.begin() as conn:
                    await self.write(conn, rows)
            except Exception as exc:
                for _, fut in pending:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in pending:
                if not fut.done():
                    fut.set_result(None)

"""Group commit: many concurrent writers, one transaction (and one fsync) per round.

Callers `await submit(rows)`; a single writer task takes everything queued while the
previous round was committing, writes it with one executemany in one transaction, and
then wakes every caller (or hands each the round's error). Under load the rounds grow,
so the cost of durability is paid once per round instead of once per request.

A caller waits at most `timeout` seconds (a stalled database must not hang requests:
SQLite's busy timeout alone is a minute): it then gets `TimeoutError`. Its rows are
dropped if no round has taken them yet; a round already writing them may still commit
them, as a timed-out Kafka produce may still land — the caller must treat the outcome as
unknown (ingest answers 503, and the sender's retry is deduplicated by event id).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.engine import Database

Write = Callable[[AsyncConnection, list[dict[str, Any]]], Awaitable[None]]

DEFAULT_TIMEOUT_S = 10.0
"""The default of `HUITOU_BUS_PUBLISH_TIMEOUT_S`, for writers built without settings."""


class GroupCommitter:
    """Batches `submit` calls into shared transactions on `db`, written by `write`."""

    def __init__(
        self, db: Database, write: Write, *, name: str, timeout: float | None = DEFAULT_TIMEOUT_S
    ) -> None:
        self.db = db
        self.write = write
        self.name = name
        self.timeout = timeout
        """Seconds a `submit` waits for its commit before raising TimeoutError (None: no
        limit)."""
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
        """Return once `rows` are committed; raise what the round's commit raised, or
        TimeoutError after `timeout` seconds (then the rows may or may not be committed)."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((rows, done))
        try:
            # wait_for cancels `done` on timeout, so a round not yet started skips the rows.
            await asyncio.wait_for(done, self.timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self.name}: not committed within {self.timeout:g} s (database stalled?)"
            ) from None

    async def _run(self) -> None:
        while True:
            pending = [await self._queue.get()]
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            pending = [(batch, fut) for batch, fut in pending if not fut.done()]
            if not pending:
                continue
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

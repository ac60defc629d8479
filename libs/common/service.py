"""How a service is described, started and served; the same in both modes.

A service is a `ServiceSpec`: its name, its migrations and a `build` function that, given
the service's context (settings, its own database, the bus, its authenticator, its outbox
relay), returns its routes, consumer subscriptions and timer handlers. `Runtime` starts any
set of services on one bus: all four in one process (`huitou up`), or one per process
(`huitou serve <name>`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import ModuleType
from typing import Protocol

from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.auth import Authenticator
from libs.common.bus import BatchHandler, Bus, Consumer, Received, create_bus
from libs.common.bus.base import ProgressHandler
from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.events import Envelope, decode_event, topic_name
from libs.common.inbox import claim_new, pruner
from libs.common.outbox import OutboxRelay
from libs.common.settings import Settings
from libs.common.shops import apply_shop_events
from libs.common.timers import Recurring, TimerHandler, TimerWorker

log = logging.getLogger(__name__)

LOGICAL_TOPICS = (
    "orders",
    "logistics",
    "behavior",
    "customers",
    "notifications.requested",
    "notifications.status",
    "shops",
)


@dataclass
class ServiceContext:
    """Everything a service's code may use; nothing of any other service."""

    name: str
    settings: Settings
    db: Database
    bus: Bus
    auth: Authenticator
    outbox: OutboxRelay

    def topic(self, logical: str) -> str:
        """Full topic name of a logical stream, e.g. `orders` → `huitou.orders.v1`."""
        return topic_name(logical, self.settings.topic_namespace)

    def events_handler(
        self,
        consumer: str,
        apply: Callable[[AsyncConnection, list[Envelope]], Awaitable[None]],
        *,
        types: frozenset[str] | None = None,
    ) -> BatchHandler:
        """A batch handler that decodes, drops already-processed event ids and calls
        `apply` with the new events, all in one transaction, then wakes the outbox relay.
        With `types`, events of other types are skipped before anything is recorded."""

        async def handle(batch: list[Received]) -> None:
            events = [decode_event(r.value) for r in batch]
            if types is not None:
                events = [e for e in events if e.type in types]
                if not events:
                    return
            async with self.db.begin() as conn:
                new_ids = await claim_new(conn, consumer, (e.dedupe_key for e in events))
                seen: set[str] = set()
                fresh = []
                for event in events:
                    if event.dedupe_key in new_ids and event.dedupe_key not in seen:
                        seen.add(event.dedupe_key)
                        fresh.append(event)
                if fresh:
                    await apply(conn, fresh)
            self.outbox.notify()

        return handle


@dataclass
class Subscription:
    group: str
    topics: list[str]
    handler: BatchHandler
    progress: ProgressHandler | None = None
    """Told each partition's watermark now and then (`Consumer.watermarks`)."""


@dataclass
class ServiceParts:
    router: APIRouter
    subscriptions: list[Subscription] = field(default_factory=list)
    timer_handlers: dict[str, TimerHandler] = field(default_factory=dict)
    recurring: list[Recurring] = field(default_factory=list)
    """Jobs run every so often on the service's timer workers."""
    timer_lanes: list[list[str]] = field(default_factory=list)
    """Timer kinds claimed apart (`TimerWorker.lanes`), e.g. transactional waits apart
    from marketing ones."""
    background: list[Background] = field(default_factory=list)
    """Tasks started after migrations and stopped before the database closes."""


class Background(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    migrations: ModuleType
    build: Callable[[ServiceContext], ServiceParts]
    projects_shops: bool = True
    """Whether the service keeps its own projection of shops and API keys from the bus."""


@dataclass
class _Running:
    ctx: ServiceContext
    parts: ServiceParts
    consumers: list[Consumer] = field(default_factory=list)
    timers: list[TimerWorker] = field(default_factory=list)


class Runtime:
    """Builds and runs a set of services on one bus."""

    def __init__(self, settings: Settings, specs: Sequence[ServiceSpec]) -> None:
        self.settings = settings
        self.specs = list(specs)
        self.bus = create_bus(settings)
        self.services: list[_Running] = []
        for spec in self.specs:
            db = Database(settings.database_url_for(spec.name), spec.name)
            ctx = ServiceContext(
                name=spec.name,
                settings=settings,
                db=db,
                bus=self.bus,
                auth=Authenticator(db, settings.admin_key),
                outbox=OutboxRelay(db, self.bus, spec.name, settings.outbox_batch_size),
            )
            parts = spec.build(ctx)
            prune = Recurring(
                "inbox.prune",
                timedelta(hours=1),
                pruner(timedelta(days=settings.inbox_retention_days)),
            )
            parts.recurring.append(prune)
            if spec.projects_shops:
                parts.subscriptions.append(
                    Subscription(
                        f"{spec.name}.shops",
                        [ctx.topic("shops")],
                        ctx.events_handler(f"{spec.name}.shops", apply_shop_events),
                    )
                )
            self.services.append(_Running(ctx, parts))

    @property
    def databases(self) -> list[Database]:
        return [s.ctx.db for s in self.services]

    def health(self) -> dict[str, str]:
        """Every consumer (`consumer:<group>`) and timer worker (`timers:<service>`) of
        this process: "ok", or why not ("dead: …" when its task ended, "stuck: …" when it
        finished nothing for `HUITOU_CONSUMER_STUCK_AFTER_S`). `/readyz` reports them."""
        stuck_after = self.settings.consumer_stuck_after_s
        checks: dict[str, str] = {}
        for running in self.services:
            for consumer in running.consumers:
                checks[f"consumer:{consumer.group}"] = consumer.health() or "ok"
            if running.timers:
                problems = [w.health(stuck_after) for w in running.timers]
                checks[f"timers:{running.ctx.name}"] = next(filter(None, problems), "ok")
        return checks

    async def migrate(self) -> None:
        for spec, running in zip(self.specs, self.services, strict=True):
            applied = await migrate(running.ctx.db, spec.migrations)
            if applied:
                log.info("migrations applied", extra={"service": spec.name, "versions": applied})

    async def start(self) -> None:
        await self.migrate()
        await self.bus.start()
        await self.bus.ensure_topics(
            [topic_name(t, self.settings.topic_namespace) for t in LOGICAL_TOPICS]
        )
        for running in self.services:
            async with running.ctx.db.begin() as conn:
                for job in running.parts.recurring:
                    await job.ensure(conn)
            for task in running.parts.background:
                await task.start()
            await running.ctx.outbox.start()
            running.consumers.extend(
                self.bus.consumer(sub.group, sub.topics, sub.handler, progress=sub.progress)
                for sub in running.parts.subscriptions
            )
        # Every consumer group joins at once: on Kafka each join takes seconds (the
        # coordinator's round trips and the first rebalance), one after another they added up.
        await asyncio.gather(*(c.start() for running in self.services for c in running.consumers))
        for running in self.services:
            handlers = {
                **running.parts.timer_handlers,
                **{job.kind: job.handler for job in running.parts.recurring},
            }
            if not handlers:
                continue
            # Several workers on PostgreSQL (their claims skip each other's rows); SQLite
            # has one writer, a second worker would only wait for it.
            workers = self.settings.timer_workers if running.ctx.db.is_postgres else 1
            running.timers = [
                TimerWorker(
                    running.ctx.db,
                    running.ctx.name,
                    handlers,
                    batch_size=self.settings.timer_batch_size,
                    poll_interval=self.settings.timer_poll_interval_s,
                    max_attempts=self.settings.timer_max_attempts,
                    lanes=running.parts.timer_lanes,
                )
                for _ in range(workers)
            ]
            for worker in running.timers:
                await worker.start()
        log.info("services started", extra={"services": [s.name for s in self.specs]})

    async def stop(self) -> None:
        """Stop everything: each consumer first finishes the batch in hand (at most
        `shutdown_grace_s`, all consumers at once), commits it and leaves its group; each
        timer worker, meanwhile, finishes and commits the round in hand."""
        grace = self.settings.shutdown_grace_s
        await asyncio.gather(
            *(c.stop(grace) for running in self.services for c in running.consumers),
            *(w.stop(grace) for r in self.services for w in r.timers),
        )
        for running in self.services:
            running.consumers.clear()
            await running.ctx.outbox.stop()
            for task in running.parts.background:
                await task.stop()
        await self.bus.stop()
        for db in self.databases:
            await db.dispose()

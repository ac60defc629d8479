"""The campaigns service. Journeys come with their own issue; for now it runs as a member of
the platform: it migrates its database, projects shops and keys, consumes every domain
topic (counting what it sees, per type) and serves health and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.events import Envelope
from libs.common.service import ServiceContext, ServiceParts, ServiceSpec, Subscription
from services.campaigns import migrations

GROUP = "campaigns"
EVENTS_SEEN = Counter(
    "huitou_campaigns_events_seen_total", "Domain events campaigns consumed", ["type"]
)


def build(ctx: ServiceContext) -> ServiceParts:
    async def observe(_conn: AsyncConnection, events: list[Envelope]) -> None:
        for event in events:
            EVENTS_SEEN.labels(event.type).inc()

    topics = [ctx.topic(t) for t in ("orders", "logistics", "behavior", "customers")]
    return ServiceParts(
        router=APIRouter(tags=["campaigns"]),
        subscriptions=[Subscription(GROUP, topics, ctx.events_handler(GROUP, observe))],
    )


SPEC = ServiceSpec(name="campaigns", migrations=migrations, build=build)

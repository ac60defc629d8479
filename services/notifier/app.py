"""The notifier service. Sending comes with its own issue; for now it runs as a member of the
platform: it migrates its database, projects shops and keys, consumes the notification
requests (counting them) and serves health and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.events import Envelope
from libs.common.service import ServiceContext, ServiceParts, ServiceSpec, Subscription
from services.notifier import migrations

GROUP = "notifier"
REQUESTS_SEEN = Counter(
    "huitou_notifier_requests_seen_total", "Notification requests consumed", ["channel"]
)


def build(ctx: ServiceContext) -> ServiceParts:
    async def observe(_conn: AsyncConnection, events: list[Envelope]) -> None:
        for event in events:
            REQUESTS_SEEN.labels(str(event.data.get("channel"))).inc()

    return ServiceParts(
        router=APIRouter(tags=["notifier"]),
        subscriptions=[
            Subscription(
                GROUP,
                [ctx.topic("notifications.requested")],
                ctx.events_handler(GROUP, observe),
            )
        ],
    )


SPEC = ServiceSpec(name="notifier", migrations=migrations, build=build)

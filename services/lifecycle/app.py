"""The lifecycle service: customers, orders projection, RFM, stages and levels."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.events import Envelope
from libs.common.service import ServiceContext, ServiceParts, ServiceSpec, Subscription
from libs.common.timers import Recurring, Timer
from services.lifecycle import migrations, predictions_api
from services.lifecycle.api import build_router
from services.lifecycle.derivation import (
    RESTAGE_SHOP_TIMER,
    RESTAGE_TIMER,
    on_restage_shop_timers,
    on_restage_timers,
    restage_shop_timer,
)
from services.lifecycle.handlers import apply_events
from services.lifecycle.metrics import count_stages
from services.lifecycle.repurchase import FIT_TIMER, on_fit_timers
from services.lifecycle.tagging import TAG_REQUEST_TIMER, apply_requests, on_tag_request_timers

GROUP = "lifecycle"


def build(ctx: ServiceContext) -> ServiceParts:
    namespace = ctx.settings.topic_namespace

    async def apply(conn: AsyncConnection, events: list[Envelope]) -> None:
        await apply_events(conn, events, namespace=namespace)

    async def tag_requests(conn: AsyncConnection, events: list[Envelope]) -> None:
        await apply_requests(conn, events, namespace)

    async def tag_requests_due(conn: AsyncConnection, fired: list[Timer]) -> None:
        await on_tag_request_timers(conn, fired, namespace)

    async def restage_due(conn: AsyncConnection, fired: list[Timer]) -> None:
        await on_restage_timers(conn, fired, namespace=namespace)

    async def restage_shop_due(conn: AsyncConnection, fired: list[Timer]) -> None:
        await on_restage_shop_timers(conn, fired, namespace=namespace)

    async def fit_due(conn: AsyncConnection, fired: list[Timer]) -> None:
        await on_fit_timers(
            conn, fired, restage=lambda shop, now: restage_shop_timer(shop, "", now)
        )

    router = build_router(ctx)
    router.include_router(predictions_api.build_router(ctx))
    return ServiceParts(
        router=router,
        subscriptions=[
            Subscription(
                GROUP,
                [ctx.topic("orders"), ctx.topic("behavior"), ctx.topic("logistics")],
                ctx.events_handler(GROUP, apply),
            ),
            Subscription(
                f"{GROUP}.requests",
                [ctx.topic("customers")],
                ctx.events_handler(
                    f"{GROUP}.requests",
                    tag_requests,
                    types=frozenset({"customer.tag_requested"}),
                ),
            ),
        ],
        timer_handlers={
            RESTAGE_TIMER: restage_due,
            RESTAGE_SHOP_TIMER: restage_shop_due,
            TAG_REQUEST_TIMER: tag_requests_due,
            FIT_TIMER: fit_due,
        },
        # A fit takes seconds on a large shop: apart, it never delays a restage.
        timer_lanes=[[FIT_TIMER]],
        recurring=[Recurring("lifecycle.count_stages", timedelta(seconds=60), count_stages)],
    )


SPEC = ServiceSpec(name="lifecycle", migrations=migrations, build=build)

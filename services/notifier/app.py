"""The notifier service: `notification.requested` events become messages (`intake`), sent
once each through the shop's provider on the durable timers (`sending`), with consent,
suppressions, quiet hours and rate limits applied (`rules`) and every status change
recorded and emitted (`statuses`), receipts and replies applied (`receipts`). Routes in
`api` (with a key) and `public` (providers' callbacks, unsubscribe links)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.events import Envelope
from libs.common.service import ServiceContext, ServiceParts, ServiceSpec, Subscription
from services.notifier import links, migrations
from services.notifier.api import build_router
from services.notifier.config import default_channels
from services.notifier.intake import SEND_TIMER, accept
from services.notifier.public import build_public_router
from services.notifier.registry import adapters
from services.notifier.sending import RECONCILE_TIMER, Sending

GROUP = "notifier"


class _Stop:
    """Stops the sender with the service (calls under way finish first)."""

    def __init__(self, sending: Sending) -> None:
        self.sending = sending

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.sending.stop()


def build(ctx: ServiceContext) -> ServiceParts:
    namespace = ctx.settings.topic_namespace
    found = adapters()
    public_base = links.public_base(ctx.settings)
    defaults = default_channels(ctx.settings)
    sending = Sending(
        ctx.db,
        found,
        namespace=namespace,
        public_base=public_base,
        reconcile_after=timedelta(seconds=ctx.settings.notifier_reconcile_after_s),
        retry_base=timedelta(seconds=ctx.settings.notifier_retry_base_s),
        defaults=defaults,
    )

    async def requested(conn: AsyncConnection, events: list[Envelope]) -> None:
        await accept(
            conn,
            events,
            namespace=namespace,
            now=datetime.now(UTC),
            public_base=public_base,
            defaults=defaults,
        )

    router = build_router(ctx, found, clock=lambda: datetime.now(UTC))
    router.include_router(build_public_router(ctx, found, clock=lambda: datetime.now(UTC)))
    return ServiceParts(
        router=router,
        subscriptions=[
            Subscription(
                GROUP,
                [ctx.topic("notifications.requested")],
                ctx.events_handler(GROUP, requested, types=frozenset({"notification.requested"})),
            )
        ],
        timer_handlers={SEND_TIMER: sending.fire_sends, RECONCILE_TIMER: sending.fire_reconciles},
        background=[_Stop(sending)],
    )


SPEC = ServiceSpec(name="notifier", migrations=migrations, build=build)

"""The ingest service: HTTP in, canonical events onto the bus."""

from __future__ import annotations

from libs.common.service import ServiceContext, ServiceParts, ServiceSpec
from services.ingest import migrations
from services.ingest.api import build_router
from services.ingest.deliveries import PRUNE_TIMER, prune_ledger, schedule_pruning


def build(ctx: ServiceContext) -> ServiceParts:
    async def start_pruning() -> None:
        await schedule_pruning(ctx)

    return ServiceParts(
        router=build_router(ctx),
        timer_handlers={PRUNE_TIMER: prune_ledger},
        on_start=[start_pruning],
    )


SPEC = ServiceSpec(name="ingest", migrations=migrations, build=build, projects_shops=False)

"""The ingest service: HTTP in, canonical events onto the bus."""

from __future__ import annotations

from libs.common.service import ServiceContext, ServiceParts, ServiceSpec
from services.ingest import migrations
from services.ingest.api import build_router
from services.ingest.deliveries import PRUNE_LEDGER, Ledger, ShopDirectory


def build(ctx: ServiceContext) -> ServiceParts:
    ledger = Ledger(ctx)
    return ServiceParts(
        router=build_router(ctx, ledger, ShopDirectory(ctx.db)),
        recurring=[PRUNE_LEDGER],
        background=[ledger],
    )


SPEC = ServiceSpec(name="ingest", migrations=migrations, build=build, projects_shops=False)

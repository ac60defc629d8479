"""The ingest service: HTTP in, canonical events onto the bus."""

from __future__ import annotations

import secrets

from libs.common.service import ServiceContext, ServiceParts, ServiceSpec
from services.ingest import migrations
from services.ingest.api import build_router
from services.ingest.console.backend import Backend
from services.ingest.console.pages import build_console
from services.ingest.console.sessions import Sessions
from services.ingest.deliveries import PRUNE_LEDGER, Ledger, ShopDirectory


class _Closing:
    """Closes the console's HTTP client when the service stops."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.backend.close()


def build(ctx: ServiceContext) -> ServiceParts:
    ledger = Ledger(ctx)
    router = build_router(ctx, ledger, ShopDirectory(ctx.db))
    # Sessions are sealed under the admin key (every replica has it); without one (some
    # in-process tests), under a secret of this process only.
    secret = ctx.settings.admin_key or secrets.token_urlsafe(32)
    console, backend = build_console(ctx.settings, Sessions(ctx.db, secret), ctx.auth)
    router.include_router(console)
    return ServiceParts(
        router=router,
        recurring=[PRUNE_LEDGER],
        background=[ledger, _Closing(backend)],
    )


SPEC = ServiceSpec(name="ingest", migrations=migrations, build=build, projects_shops=False)

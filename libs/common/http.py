"""The FastAPI app around a Runtime: routes, `/healthz`, `/readyz`, `/metrics`, errors, and
the API documentation (`/docs`, `/redoc`) served entirely from this process: the Swagger
UI and ReDoc assets come from the `fastapi-offline` package, so the pages work inside a
private network with no way to a public CDN."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common import metrics
from libs.common.direct_routes import DirectRoutes, direct_routes
from libs.common.gc_tuning import tune_for_service
from libs.common.openapi import document_api
from libs.common.problems import install_problem_handlers, problem_response
from libs.common.service import Runtime, ServiceSpec
from libs.common.settings import Settings

DOCS_ASSETS = "/docs/assets"
"""Where the Swagger UI and ReDoc files are served (from the `fastapi_offline` package)."""


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods kept as label values; any other a client sends is counted as `other`."""


class HttpMetrics:
    """Counts requests and their latency by route template (pure ASGI, no body copies)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
            metrics.HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - started)


def build_app(settings: Settings, specs: Sequence[ServiceSpec]) -> FastAPI:
    """One app serving the given services (all four in embedded mode, one per process
    in distributed mode); the routes are the same either way."""
    runtime = Runtime(settings, specs)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        tune_for_service()
        try:
            yield
        finally:
            await runtime.stop()

    names = ", ".join(s.name for s in specs)
    app = FastAPI(
        title="Huitou",
        version="0.1.0",
        summary=f"Marketing automation for online shops ({names})",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = runtime
    install_problem_handlers(app)
    document_api(app)
    for running in runtime.services:
        app.include_router(running.parts.router)
    # Added first, so inside HttpMetrics: direct routes are counted like the others.
    app.add_middleware(DirectRoutes, routes=direct_routes(app.routes))
    app.add_middleware(HttpMetrics)

    _serve_docs(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], response_model=None)
    async def readyz() -> Any:
        """Every database of this process and the bus answer, and every consumer and timer
        worker is alive and not stuck (`consumer:<group>`, `timers:<service>`)."""
        checks: dict[str, str] = {}

        async def check(name: str, probe: Any) -> None:
            try:
                async with asyncio.timeout(5):
                    await probe()
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"error: {exc!r}"[:300]

        await asyncio.gather(
            check("bus", runtime.bus.ping),
            *(check(f"db:{db.schema}", db.ping) for db in runtime.databases),
        )
        checks.update(runtime.health())
        ready = all(v == "ok" for v in checks.values())
        metrics.READY.set(1 if ready else 0)
        if ready:
            return {"status": "ready", "checks": checks}
        return problem_response(503, "not ready", checks=checks)

    @app.get("/metrics", tags=["ops"])
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of every metric of this process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _serve_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI) and `/redoc` with every asset served by this app: no page
    refers to another host (the validator badge, which would call one, is off)."""
    app.mount(
        DOCS_ASSETS,
        StaticFiles(packages=[("fastapi_offline", "static")]),
        name="docs-assets",
    )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )

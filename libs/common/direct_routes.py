"""Direct routes: the hottest endpoints served without FastAPI's per-request machinery.

An endpoint marked `@direct` (below its `@router.post(...)`) stays an ordinary FastAPI
route for the OpenAPI document, but requests to it are answered by `DirectRoutes`, an
ASGI layer just inside `HttpMetrics`: it matches the path itself, calls the endpoint with
the `Request` and the path parameters, and renders a raised `Problem` exactly as the
app's problem handler does. FastAPI's routing over every route, its dependency solving,
query parsing and exception middleware cost ingest's single-event request more CPU than
its own work (bench/README.md, finding 20); these endpoints need none of it.

The contract of a direct endpoint, checked when the app is built: its parameters are
`request` and string path parameters only, and it returns a `Response`. Direct routes are
matched before every other route, so their paths must not overlap another route's for the
same method; a request to a direct path with another method falls through to FastAPI
(405 with `Allow`, as before).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from libs.common.problems import Problem, problem_from, route_contexts

_MARK = "__huitou_direct__"

Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Response]])


def direct(endpoint: Endpoint) -> Endpoint:
    """Serve this endpoint through `DirectRoutes` (see the module's contract)."""
    setattr(endpoint, _MARK, True)
    return endpoint


@dataclass(frozen=True)
class _Route:
    route: Any
    """The app's route (context): put in the scope as FastAPI does, for `HttpMetrics`."""
    methods: frozenset[str]
    regex: re.Pattern[str]
    convertors: dict[str, Any]
    endpoint: Callable[..., Awaitable[Response]]


def direct_routes(routes: Iterable[Any]) -> list[_Route]:
    """The app's routes whose endpoint is marked `@direct`, checked against the contract."""
    found: list[_Route] = []
    for route in route_contexts(routes):
        endpoint = getattr(route, "endpoint", None)
        if endpoint is None or not getattr(endpoint, _MARK, False):
            continue
        regex, _, convertors = compile_path(route.path)
        params = inspect.signature(endpoint).parameters
        extra = set(params) - {"request", *convertors}
        if (
            extra
            or "request" not in params
            or any(type(c).__name__ != "StringConvertor" for c in convertors.values())
        ):
            raise TypeError(
                f"direct route {route.path}: takes `request` and string path parameters only"
            )
        found.append(_Route(route, frozenset(route.methods or ()), regex, convertors, endpoint))
    return found


def _route_path(scope: Scope) -> str:
    """The path below the app's `root_path`, as Starlette's router matches it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


class DirectRoutes:
    """Answers requests to direct routes; passes every other request to the app."""

    def __init__(self, app: ASGIApp, routes: list[_Route]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = _route_path(scope)
            for candidate in self.routes:
                if scope["method"] not in candidate.methods:
                    continue
                match = candidate.regex.match(path)
                if match is None:
                    continue
                params = {
                    name: candidate.convertors[name].convert(value)
                    for name, value in match.groupdict().items()
                }
                scope["route"] = candidate.route
                scope["path_params"] = params
                request = Request(scope, receive, send)
                try:
                    response = await candidate.endpoint(request=request, **params)
                except Problem as exc:
                    response = problem_from(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

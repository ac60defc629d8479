"""Errors as RFC 9457 problem details (`application/problem+json`), one format everywhere."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """Raise to answer with a problem document; `extra` members are added to it."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    instance: str | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def problem_from(request: Request, exc: Problem) -> JSONResponse:
    """The answer to a raised `Problem`, its instance the request's path."""
    return problem_response(
        exc.status,
        exc.detail,
        title=exc.title,
        headers=exc.headers,
        instance=request.url.path,
        **exc.extra,
    )


def field_errors(exc: ValidationError | RequestValidationError) -> list[dict[str, str]]:
    """Pydantic errors as `{"field": "data.total.amount_minor", "message": …}` entries."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        out.append({"field": ".".join(loc) or "body", "message": str(err.get("msg", ""))})
    return out


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error the app raises a problem+json response."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_from(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route matching the path.
            allowed = allowed_methods(request.app.routes, request.scope["path"])
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return problem_response(
            exc.status_code,
            str(exc.detail),
            headers=headers,
            instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug: answered as a problem too (no detail leaks); Starlette re-raises the
        # exception afterwards, so its traceback still reaches the (masked) logs.
        return problem_response(
            500, "an unexpected error; it has been logged", instance=request.url.path
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(exc)
        malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
        status = 400 if malformed else 422
        detail = "the body is not valid JSON" if malformed else "the request has invalid fields"
        return problem_response(status, detail, instance=request.url.path, errors=errors)


def route_contexts(routes: Iterable[Any]) -> Iterator[Any]:
    """Every route of an app, also those of included routers: newer FastAPI keeps those
    nested and resolves them with `iter_route_contexts` (a context reads like its route)."""
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    yield from iterate(list(routes)) if iterate is not None else routes


def allowed_methods(routes: Iterable[Any], path: str) -> list[str]:
    """The methods of every route whose path matches (for `Allow` on a 405)."""
    found: set[str] = set()
    for route in route_contexts(routes):
        regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and methods and regex.match(path):
            found |= set(methods)
    return sorted(found)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes with 413 before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)

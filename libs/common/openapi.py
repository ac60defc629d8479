"""The OpenAPI document, completed so that it describes the API a client actually meets.

FastAPI documents what it sees in the route signatures. `document_api(app)` adds, when the
document is first generated, what it cannot see:

- every error answer: RFC 9457 problem details (`application/problem+json`, the `Problem`
  schema) for the statuses each route can give, decided generically from the route —
  authenticated (401, 403, and 400 when the admin key must name the shop with
  `?shop_id=`), path parameters (404), a body (400 for JSON that does not parse, 422),
  a write (409), parameters at all (422); FastAPI's own 422 (`HTTPValidationError`, plain
  JSON) is replaced by the problem it really is;
- the bearer-key security scheme on every authenticated route;
- the canonical event schemas (`CanonicalEvent`, one per event family, built from
  `libs.common.events`) for the routes that read their body raw (`events_body()`);
- the media types FastAPI cannot infer: `/metrics` (Prometheus text), CSV exports,
  `/readyz` (its 200 body and its 503 problem).

Routes add what only they know with `problem_responses(...)` in their decorator's
`responses=` (e.g. 413 and 503 on ingest); a status a route documents itself is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from libs.common.auth import Authenticator
from libs.common.events import (
    BEHAVIOR_TYPES,
    LOGISTICS_TYPES,
    ORDER_TYPES,
    BehaviorData,
    Envelope,
    LogisticsData,
    LogisticsExceptionData,
    OrderData,
)
from libs.common.problems import PROBLEM_JSON, route_contexts

SCHEMAS = "#/components/schemas/"
BEARER = "bearerKey"
SIGNATURE = "huitouSignature"
SIGNING_SHOP = "huitouShop"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_DESCRIPTIONS = {
    400: "Bad request: the body is not valid JSON, or the admin key did not name the shop "
    "with `?shop_id=`",
    401: "Missing, unknown or revoked API key, or a signature that does not verify",
    403: "The key may not do this: another shop's data, or an admin-only operation",
    404: "No such resource in this shop (another shop's resources are not found either)",
    409: "Conflicts with the current state (already exists, wrong kind)",
    413: "The body or the batch is too large",
    415: "Unsupported media type",
    422: "Missing or mistyped fields, each named in `errors`",
    503: "Not available right now; retry after `Retry-After` seconds (nothing was accepted)",
}

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; more members may be added (e.g. `checks`).",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "`about:blank` unless stated"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string", "description": "the path of the request"},
        "errors": {
            "type": "array",
            "description": "one entry per bad field, e.g. `[1].data.total.amount_minor`",
            "items": {"$ref": f"{SCHEMAS}FieldError"},
        },
    },
    "additionalProperties": True,
}
FIELD_ERROR_SCHEMA: dict[str, Any] = {
    "title": "FieldError",
    "type": "object",
    "required": ["field", "message"],
    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
    "additionalProperties": True,
}
_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
    503: {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
}


def problem_doc(status: int, description: str | None = None) -> dict[str, Any]:
    """The OpenAPI response object of a problem answer with this status."""
    response: dict[str, Any] = {
        "description": description or _DESCRIPTIONS.get(status, "Problem"),
        "content": {PROBLEM_JSON: {"schema": {"$ref": f"{SCHEMAS}Problem"}}},
    }
    if status in _HEADERS:
        response["headers"] = copy.deepcopy(_HEADERS[status])
    return response


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """For a route decorator's `responses=`: statuses only the route knows it answers."""
    return {status: problem_doc(status) for status in statuses}


def header_params(headers: dict[str, str]) -> list[dict[str, Any]]:
    """Optional request headers (signatures, topics) as OpenAPI parameters."""
    return [
        {
            "name": name,
            "in": "header",
            "required": False,
            "description": text,
            "schema": {"type": "string"},
        }
        for name, text in headers.items()
    ]


def platform_body(description: str, media_types: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A request body read raw in a sender's own format, per media type."""
    return {
        "required": True,
        "description": description,
        "content": {media: {"schema": schema} for media, schema in media_types.items()},
    }


def delivery_answer(description: str, schema: str | None = None) -> dict[str, Any]:
    """A JSON success answer: a component's schema by name, or any JSON object."""
    body = {"$ref": SCHEMAS + schema} if schema else {"type": "object"}
    return {"description": description, "content": {"application/json": {"schema": body}}}


# -- canonical events -------------------------------------------------------------------

_FAMILIES: tuple[tuple[str, tuple[str, ...], type[Any]], ...] = (
    ("CanonicalOrderEvent", ORDER_TYPES, OrderData),
    (
        "CanonicalLogisticsEvent",
        tuple(t for t in LOGISTICS_TYPES if t != "logistics.exception"),
        LogisticsData,
    ),
    ("CanonicalLogisticsExceptionEvent", ("logistics.exception",), LogisticsExceptionData),
    ("CanonicalBehaviorEvent", BEHAVIOR_TYPES, BehaviorData),
)


def events_body(max_batch: int) -> dict[str, Any]:
    """The request body of a route that reads canonical events raw (for its decorator's
    `openapi_extra={"requestBody": …}`): one event, or a JSON array of 1 to `max_batch`."""
    ref = {"$ref": SCHEMAS + "CanonicalEvent"}
    return {
        "required": True,
        "description": f"One canonical event, or a JSON array of 1 to {max_batch:,}. The "
        "body is read raw (signatures are verified on its bytes), then validated in full: "
        "one bad event refuses the whole request, naming the field "
        "(`[1].data.total.amount_minor`).",
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        ref,
                        {"type": "array", "items": ref, "minItems": 1, "maxItems": max_batch},
                    ]
                }
            }
        },
    }


def event_schemas() -> dict[str, Any]:
    """JSON schemas of the canonical events, as OpenAPI components: one envelope per
    ingestible family with its typed `data`, and `CanonicalEvent`, their union on `type`."""
    _, top = models_json_schema(
        [(model, "validation") for _, _, model in _FAMILIES],
        ref_template=SCHEMAS + "Canonical{model}",
    )
    components = {f"Canonical{name}": schema for name, schema in top.get("$defs", {}).items()}
    envelope = Envelope.model_json_schema(ref_template=SCHEMAS + "Canonical{model}")
    mapping: dict[str, str] = {}
    for name, types, model in _FAMILIES:
        schema = copy.deepcopy(envelope)
        schema["title"] = name
        schema["description"] = (
            f"A canonical event of type {', '.join(types)} (CloudEvents 1.0 attributes, "
            "`shop_id`, `schema_version` and the typed `data`)."
        )
        schema["properties"]["type"] = {"type": "string", "enum": list(types)}
        schema["properties"]["data"] = {"$ref": f"{SCHEMAS}Canonical{model.__name__}"}
        components[name] = schema
        mapping.update(dict.fromkeys(types, f"{SCHEMAS}{name}"))
    components["CanonicalEvent"] = {
        "title": "CanonicalEvent",
        "oneOf": [{"$ref": f"{SCHEMAS}{name}"} for name, _, _ in _FAMILIES],
        "discriminator": {"propertyName": "type", "mapping": mapping},
    }
    return components


# -- completing the document ------------------------------------------------------------


def document_api(app: FastAPI) -> None:
    """Make `app.openapi()` return the completed document (generated once, on first use)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            complete(document, app.routes)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any], routes: Iterable[Any]) -> None:
    """Add problems, security, event schemas and media types to a generated document."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    schemas["FieldError"] = FIELD_ERROR_SCHEMA
    security = components.setdefault("securitySchemes", {})
    security[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A shop key (`hk_…`, sees only its shop) or the admin key "
        "(names the shop with `?shop_id=` where a route is about one shop).",
    }
    if SIGNATURE in repr(document.get("paths", {})):
        security[SIGNATURE] = {
            "type": "apiKey",
            "in": "header",
            "name": "X-Huitou-Signature",
            "description": '`t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` with the '
            "shop's `huitou` webhook secret; `t` within 5 minutes.",
        }
        security[SIGNING_SHOP] = {
            "type": "apiKey",
            "in": "header",
            "name": "X-Huitou-Shop",
            "description": "The shop whose `huitou` secret signed the request.",
        }
    paths = document.get("paths", {})
    for route in _api_routes(routes):
        if not route.include_in_schema:
            continue
        for method in route.methods:
            operation = paths.get(route.path_format, {}).get(method.lower())
            if operation is not None:
                _complete_operation(operation, route, method)
    _media_types(paths)
    if "#/components/schemas/Canonical" in repr(paths):
        for name, schema in event_schemas().items():
            schemas.setdefault(name, schema)
    if "HTTPValidationError" not in repr(paths):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


def _complete_operation(operation: dict[str, Any], route: Any, method: str) -> None:
    dependant = route.dependant
    authenticated = _uses_authenticator(dependant)
    if authenticated:
        operation.setdefault("security", [{BEARER: []}])
    elif "security" not in operation:
        operation["security"] = []
    secured = bool(operation["security"])
    query = {p.name for p in _all(dependant, "query_params")}
    has_path = bool(_all(dependant, "path_params")) or "{" in route.path_format
    has_body = bool(_all(dependant, "body_params")) or "requestBody" in operation
    has_params = bool(operation.get("parameters")) or has_body
    statuses: set[int] = set()
    if has_body or (authenticated and "shop_id" in query):
        statuses.add(400)
    if secured:
        statuses |= {401, 403}
    if has_path:
        statuses.add(404)
    if authenticated and method in WRITES:
        statuses.add(409)
    if has_params:
        statuses.add(422)
    responses = operation.setdefault("responses", {})
    for key, response in list(responses.items()):
        if _is_fastapi_validation_error(response):
            responses[key] = problem_doc(int(key))
    for status in sorted(statuses):
        responses.setdefault(str(status), problem_doc(status))


def _media_types(paths: dict[str, Any]) -> None:
    """Answers whose media type FastAPI cannot see in the route's signature."""
    metrics = paths.get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"]["content"] = {
            "text/plain": {"schema": {"type": "string"}, "description": "Prometheus text format"}
        }
    readyz = paths.get("/readyz", {}).get("get")
    if readyz is not None:
        readyz["responses"]["200"]["content"] = {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["status", "checks"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ready"]},
                        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                }
            }
        }
        readyz["responses"].setdefault(
            "503", problem_doc(503, "Not ready: `checks` names what does not answer")
        )
    for path, operations in paths.items():
        if path.endswith(".csv") and "get" in operations:
            operations["get"]["responses"]["200"]["content"] = {
                "text/csv": {"schema": {"type": "string"}}
            }


def _api_routes(routes: Iterable[Any]) -> Iterable[Any]:
    for route in route_contexts(routes):
        if isinstance(getattr(route, "original_route", route), APIRoute):
            yield route


def _is_fastapi_validation_error(response: dict[str, Any]) -> bool:
    return "HTTPValidationError" in repr(response.get("content", {}))


def _uses_authenticator(dependant: Dependant) -> bool:
    return any(
        isinstance(d.call, Authenticator) or _uses_authenticator(d) for d in dependant.dependencies
    )


def _all(dependant: Dependant, attribute: str) -> list[Any]:
    found = list(getattr(dependant, attribute))
    for sub in dependant.dependencies:
        found.extend(_all(sub, attribute))
    return found

"""Ingest routes: shops and keys (admin), and the canonical event API."""

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from libs.common.auth import Principal
from libs.common.bus import BusUnavailable
from libs.common.events import INGESTIBLE_TYPES, Envelope, parse_event
from libs.common.problems import Problem, field_errors
from libs.common.service import ServiceContext
from services.ingest import handlers
from services.ingest.schemas import Accepted, KeyOut, ShopCreate, ShopOut

MAX_BODY_BYTES = 1024 * 1024
MAX_BATCH = 1000
RETRY_AFTER_S = "5"


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
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


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}") from None


def parse_canonical(payload: Any) -> list[Envelope]:
    """One event or a JSON array of up to MAX_BATCH events, each fully validated."""
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise Problem(422, "an empty batch carries no event")
    if len(items) > MAX_BATCH:
        raise Problem(413, f"a batch holds at most {MAX_BATCH} events")
    events: list[Envelope] = []
    errors: list[dict[str, str]] = []
    for index, item in enumerate(items):
        prefix = f"[{index}]." if isinstance(payload, list) else ""
        if not isinstance(item, dict):
            errors.append({"field": prefix.rstrip(".") or "body", "message": "not an object"})
            continue
        try:
            event = parse_event(item)
        except ValidationError as exc:
            errors.extend(
                {"field": prefix + e["field"], "message": e["message"]} for e in field_errors(exc)
            )
            continue
        if event.type not in INGESTIBLE_TYPES:
            errors.append(
                {
                    "field": prefix + "type",
                    "message": f"{event.type!r} is emitted by Huitou, not ingested",
                }
            )
            continue
        events.append(event)
    if errors:
        raise Problem(422, "the request has invalid fields", errors=errors)
    return events


def build_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter(tags=["ingest"])
    Auth = Annotated[Principal, Depends(ctx.auth)]
    namespace = ctx.settings.topic_namespace

    @router.post("/v1/shops", status_code=201, response_model=ShopOut)
    async def create_shop(body: ShopCreate, principal: Auth) -> ShopOut:
        """Register a shop (admin key). Webhook secrets are write-only."""
        principal.require_admin()
        async with ctx.db.begin() as conn:
            shop = await handlers.create_shop(conn, body, namespace)
        ctx.outbox.notify()
        return shop

    @router.get("/v1/shops", response_model=list[str])
    async def list_shops(principal: Auth) -> list[str]:
        """Ids of every shop (admin key)."""
        principal.require_admin()
        async with ctx.db.connect() as conn:
            return await handlers.list_shop_ids(conn)

    @router.get("/v1/shops/{shop_id}", response_model=ShopOut)
    async def get_shop(shop_id: str, principal: Auth) -> ShopOut:
        """One shop: the admin key, or the shop's own key."""
        principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            shop = await handlers.get_shop(conn, shop_id)
        if shop is None:
            raise Problem(404, f"unknown shop {shop_id!r}")
        return shop

    @router.post("/v1/shops/{shop_id}/keys", status_code=201, response_model=KeyOut)
    async def issue_key(shop_id: str, principal: Auth) -> KeyOut:
        """Issue a shop API key (admin key). The key is shown once, in this response."""
        principal.require_admin()
        async with ctx.db.begin() as conn:
            key_id, key = await handlers.issue_key(conn, shop_id, namespace)
        ctx.outbox.notify()
        return KeyOut(key_id=key_id, key=key, shop_id=shop_id)

    @router.delete("/v1/shops/{shop_id}/keys/{key_id}", status_code=204)
    async def revoke_key(shop_id: str, key_id: str, principal: Auth) -> None:
        """Revoke a shop key (admin key); every service refuses it within seconds."""
        principal.require_admin()
        async with ctx.db.begin() as conn:
            await handlers.revoke_key(conn, shop_id, key_id, namespace)
        ctx.outbox.notify()

    @router.post("/v1/events", status_code=202, response_model=Accepted)
    async def post_events(request: Request, principal: Auth) -> Accepted:
        """Accept one canonical event or a batch of up to 1,000.

        Answers 202 only after the bus has durably stored every event; 503 with
        `Retry-After` when it cannot, and then nothing of the request was accepted.
        """
        events = parse_canonical(parse_json(await read_body(request)))
        shop_ids = {e.shop_id for e in events}
        for shop_id in shop_ids:
            principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            missing = shop_ids - await handlers.known_shops(conn, list(shop_ids))
        if missing:
            raise Problem(404, f"unknown shop(s): {sorted(missing)}")
        try:
            await handlers.publish_events(ctx.bus, events, namespace)
        except BusUnavailable:
            raise Problem(
                503,
                "the event bus is unavailable; retry later",
                headers={"Retry-After": RETRY_AFTER_S},
            ) from None
        return Accepted(accepted=len(events), ids=[e.id for e in events])

    return router

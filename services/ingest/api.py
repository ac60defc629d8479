"""Ingest routes: shops and keys (admin), and the canonical event API."""

from datetime import timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from libs.common.auth import Principal
from libs.common.direct_routes import direct
from libs.common.events import INGESTIBLE_TYPES, LOGISTICS_TYPES, Envelope, parse_event
from libs.common.openapi import (
    delivery_answer,
    events_body,
    header_params,
    platform_body,
    problem_responses,
)
from libs.common.problems import Problem, field_errors, read_body
from libs.common.service import ServiceContext
from services.ingest import deliveries, handlers, signing
from services.ingest.outcomes import measured
from services.ingest.platforms.base import InvalidPayload, PlatformAdapter
from services.ingest.schemas import (
    Accepted,
    KeyOut,
    Platform,
    SecretRotation,
    ShopCreate,
    ShopOut,
    ShopUpdate,
)

MAX_BATCH = 1000


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


def build_router(
    ctx: ServiceContext, ledger: deliveries.Ledger, directory: deliveries.ShopDirectory
) -> APIRouter:
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

    @router.patch("/v1/shops/{shop_id}", response_model=ShopOut)
    async def update_shop(shop_id: str, body: ShopUpdate, principal: Auth) -> ShopOut:
        """Change a shop's name, timezone or currency (admin key)."""
        principal.require_admin()
        async with ctx.db.begin() as conn:
            shop = await handlers.update_shop(
                conn, shop_id, body.model_dump(exclude_none=True), namespace
            )
        directory.forget(shop_id)
        ctx.outbox.notify()
        return shop

    @router.put("/v1/shops/{shop_id}/webhook_secrets/{platform}", status_code=204)
    async def rotate_secret(
        shop_id: str, platform: Platform, body: SecretRotation, principal: Auth
    ) -> None:
        """Set a platform's webhook secret (admin key). The previous secret keeps
        verifying for `grace_seconds` (default a day) while senders switch over."""
        principal.require_admin()
        async with ctx.db.begin() as conn:
            await handlers.rotate_secret(
                conn, shop_id, platform, body.secret, timedelta(seconds=body.grace_seconds)
            )
        directory.forget(shop_id)

    @router.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        responses=problem_responses(404, 413, 503),
        openapi_extra={
            "requestBody": events_body(MAX_BATCH),
            "security": [{"bearerKey": []}, {"huitouSignature": [], "huitouShop": []}],
        },
    )
    @direct
    async def post_events(request: Request) -> Response:
        """Accept one canonical event or a batch of up to 1,000.

        Authenticated by a key (`Authorization: Bearer`), or signed by the shop's own
        system with `X-Huitou-Signature` and `X-Huitou-Shop` (see `signing.py`). Answers
        202 only after the bus has durably stored every event; 503 with `Retry-After`
        when it cannot, and then nothing of the request was accepted.
        """
        accepted = await receive_canonical(request, "huitou")
        # Returned as a Response: the model was built here, FastAPI need not re-validate it.
        return Response(orjson.dumps(accepted.model_dump()), 202, media_type="application/json")

    @router.post(
        "/v1/webhooks/{platform}/{shop_id}",
        response_model=None,
        responses={
            200: delivery_answer("`{accepted, duplicates, ids}`"),
            **problem_responses(401, 413, 503),
        },
        openapi_extra={
            "requestBody": platform_body(
                "The platform's payload exactly as it sends it (verified on its bytes)",
                {
                    "application/json": {"type": "object"},
                    "application/x-www-form-urlencoded": {"type": "object"},
                },
            ),
            "parameters": header_params(
                {
                    "X-Shopify-Hmac-Sha256": "Shopify: base64 HMAC-SHA256(secret, body)",
                    "X-Shopify-Topic": "Shopify: the topic, e.g. orders/create",
                    "X-Shopify-Webhook-Id": "Shopify: the delivery id",
                    "X-Shopify-Event-Id": "Shopify: the event id",
                    "X-WC-Webhook-Signature": "WooCommerce: base64 HMAC-SHA256(secret, body)",
                    "X-WC-Webhook-Topic": "WooCommerce: the topic, e.g. order.created",
                    "X-WC-Webhook-Delivery-ID": "WooCommerce: the delivery id",
                    "sign": "Taobao TOP SPI: upper hex MD5 over the signed headers and body",
                    "top-sign-list": "Taobao TOP SPI: the headers that are signed",
                    "timestamp": "Taobao TOP SPI: yyyy-MM-dd HH:mm:ss in GMT+8",
                }
            ),
        },
    )
    @direct
    async def platform_webhook(platform: str, shop_id: str, request: Request) -> Response:
        """A shop platform's webhook, verified by that platform's own signature."""
        adapter = deliveries.PLATFORMS.get(platform)
        if adapter is None:
            raise Problem(
                404, f"unknown platform {platform!r}; known: {sorted(deliveries.PLATFORMS)}"
            )
        return await receive_platform(request, adapter, shop_id)

    @router.post(
        "/v1/logistics/{provider}/{shop_id}",
        response_model=None,
        responses={
            200: delivery_answer("the answer the carrier expects (Kuaidi100: `{result: true}`)"),
            202: delivery_answer("`generic`: the events are durably on the bus", "Accepted"),
            **problem_responses(401, 413, 503),
        },
        openapi_extra={
            "requestBody": platform_body(
                "The carrier's push exactly as it sends it (Kuaidi100: the form `param` + "
                "`sign`); `generic` takes canonical `logistics.*` events",
                {
                    "application/json": {"anyOf": [{"type": "object"}, {"type": "array"}]},
                    "application/x-www-form-urlencoded": {
                        "type": "object",
                        "properties": {"param": {"type": "string"}, "sign": {"type": "string"}},
                    },
                },
            ),
            "parameters": header_params(
                {
                    "aftership-hmac-sha256": "AfterShip: base64 HMAC-SHA256(secret, body)",
                    signing.SIGNATURE_HEADER: "generic: t=<unix>,v1=<hex HMAC-SHA256>",
                }
            ),
        },
    )
    @direct
    async def carrier_push(provider: str, shop_id: str, request: Request) -> Response:
        """A carrier or aggregator's tracking push; `generic` takes canonical logistics
        events signed with `X-Huitou-Signature`."""
        if provider == "generic":
            accepted = await receive_canonical(
                request, "generic", shop_id=shop_id, only=LOGISTICS_TYPES
            )
            return Response(orjson.dumps(accepted.model_dump()), 202, media_type="application/json")
        adapter = deliveries.CARRIERS.get(provider)
        if adapter is None:
            raise Problem(
                404,
                f"unknown provider {provider!r}; "
                f"known: {sorted([*deliveries.CARRIERS, 'generic'])}",
            )
        return await receive_platform(request, adapter, shop_id)

    async def receive_canonical(
        request: Request,
        platform: str,
        *,
        shop_id: str | None = None,
        only: tuple[str, ...] | None = None,
    ) -> Accepted:
        with measured(platform, "canonical") as outcome:
            body = await read_body(request, ctx.settings.max_body_bytes)
            if request.headers.get(signing.SIGNATURE_HEADER):
                signed_shop = shop_id or request.headers.get(signing.SHOP_HEADER)
                if not signed_shop:
                    raise Problem(400, f"{signing.SHOP_HEADER} names the signing shop")
                await directory.context(signed_shop)
                secrets = await directory.secrets(signed_shop, "huitou")
                if not signing.verify(request.headers.get(signing.SIGNATURE_HEADER), body, secrets):
                    raise Problem(401, "bad or expired X-Huitou-Signature")
                principal = Principal(shop_id=signed_shop)
            elif shop_id is None:
                principal = await ctx.auth(request)
            else:
                raise Problem(401, f"sign the request with {signing.SIGNATURE_HEADER}")
            payload = parse_json(body)
            events = parse_canonical(payload)
            if only is not None:
                wrong = [e.id for e in events if e.type not in only]
                if wrong:
                    raise Problem(422, f"only {only[0].split('.')[0]} events here: {wrong}")
            shop_ids = {e.shop_id for e in events}
            for event_shop in shop_ids:
                principal.shop(event_shop)
            currency_of: dict[str, str] = {}
            for event_shop in sorted(shop_ids):
                currency_of[event_shop] = (await directory.context(event_shop)).currency
            foreign = deliveries.foreign_money(
                events, currency_of, numbered=isinstance(payload, list)
            )
            if foreign:
                raise Problem(422, "the request has invalid fields", errors=foreign)
            published, duplicates = await ledger.publish_once(events, platform)
            outcome.set("accepted" if published else "duplicate")
            return Accepted(accepted=len(events), duplicates=duplicates, ids=[e.id for e in events])

    async def receive_platform(
        request: Request, adapter: PlatformAdapter, shop_id: str
    ) -> Response:
        with measured(adapter.name, "unknown") as outcome:
            body = await read_body(request, ctx.settings.max_body_bytes)
            shop = await directory.context(shop_id)
            secrets = await directory.secrets(shop_id, adapter.name)
            if not secrets:
                raise Problem(401, f"shop {shop_id!r} has no {adapter.name} secret configured")
            if not adapter.verify(body, request.headers, secrets):
                raise Problem(401, f"the {adapter.name} signature does not verify")
            try:
                normalized = adapter.normalize(body, request.headers, shop)
            except InvalidPayload as exc:
                raise Problem(
                    exc.status, exc.message, errors=[{"field": exc.field, "message": exc.message}]
                ) from None
            # A topic the adapter has no handler for is the sender's free text: never a label.
            outcome.topic = normalized.topic if normalized.events else "unused"
            foreign = deliveries.foreign_money(
                normalized.events, {shop_id: shop.currency}, numbered=False
            )
            if foreign:
                raise Problem(422, foreign[0]["message"], errors=foreign)
            published, duplicates = 0, 0
            if normalized.events:
                published, duplicates = await ledger.publish_once(normalized.events, adapter.name)
            outcome.set(
                "ignored" if not normalized.events else "accepted" if published else "duplicate"
            )
            if normalized.response is not None:
                return Response(normalized.response, media_type=normalized.response_media_type)
            return JSONResponse(
                {
                    "accepted": published,
                    "duplicates": duplicates,
                    "ids": [e.id for e in normalized.events],
                }
            )

    return router

"""Notifier routes: messages (the log, each with its status history), channel settings
(credentials write-only), templates with validation and preview, consent and the shop's
policy. Shop key, or the admin key naming the shop with `?shop_id=`."""

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Body, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.auth import Principal
from libs.common.db.dialect import upsert
from libs.common.problems import Problem, field_errors
from libs.common.service import ServiceContext
from services.notifier import consent, links, rules, templates
from services.notifier.config import OUTBOX, default_channels, load_channels, load_policies
from services.notifier.models import channels, history, messages, policies
from services.notifier.models import templates as template_rows
from services.notifier.providers.base import Adapter

NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
ChannelName = Literal["sms", "email"]
Status = Literal["queued", "deferred", "sending", "sent", "delivered", "failed", "suppressed"]


class HistoryOut(BaseModel):
    status: str
    reason: str | None
    at: datetime


class MessageOut(BaseModel):
    message_id: str
    idempotency_key: str
    shop_id: str
    customer_id: str
    journey_id: str | None
    channel: str
    category: str
    provider: str | None
    to: str | None
    template: str
    locale: str | None
    subject: str | None
    body: str | None
    status: str
    reason: str | None
    provider_message_id: str | None
    created_at: datetime
    updated_at: datetime
    status_history: list[HistoryOut] | None = None
    """Every status change, oldest first: given by `GET /v1/messages/{id}` (null in lists)."""


class MessagePage(BaseModel):
    items: list[MessageOut]
    next_cursor: str | None


class ProviderIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Literal["outbox", "smtp", "twilio", "aliyun", "tencent"]
    settings: dict[str, Any] = {}


class ChannelIn(ProviderIn):
    fallback: ProviderIn | None = None


class ChannelOut(BaseModel):
    channel: ChannelName
    provider: str
    fallback_provider: str | None
    settings: dict[str, Any]
    """The settings without their credentials."""
    callback_urls: dict[str, str] = {}
    """Per provider of the channel that pushes receipts and replies: the URL to enter in
    its console (Aliyun, Tencent: with the shop's token; Twilio is given it per message)."""


class ConsentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sms: bool | None = None
    email: bool | None = None


class ConsentOut(ConsentIn):
    customer_id: str


CALLBACK_PROVIDERS = frozenset({"aliyun", "tencent", "twilio"})
"""Providers that push delivery receipts and replies to `/v1/callbacks/...`."""
SECRET_FIELDS = {"password", "access_key_secret", "secret_key", "auth_token"}
PROVIDER_CHANNELS = {
    "outbox": {"sms", "email"},
    "smtp": {"email"},
    "twilio": {"sms"},
    "aliyun": {"sms"},
    "tencent": {"sms"},
}


def _message(row: Any, steps: list[HistoryOut] | None = None) -> MessageOut:
    return MessageOut(
        message_id=row.message_id,
        idempotency_key=row.idempotency_key,
        shop_id=row.shop_id,
        customer_id=row.customer_id,
        journey_id=row.journey_id,
        channel=row.channel,
        category=row.category,
        provider=row.provider,
        to=row.recipient,
        template=row.template,
        locale=row.locale,
        subject=row.subject,
        body=row.body,
        status=row.status,
        reason=row.reason,
        provider_message_id=row.provider_message_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
        status_history=steps,
    )


def _cursor(row: Any) -> str:
    return f"{row.created_at.isoformat()}|{row.message_id}"


def build_router(
    ctx: ServiceContext, adapters: dict[str, Adapter], *, clock: Callable[[], datetime]
) -> APIRouter:
    router = APIRouter(tags=["notifier"])
    Auth = Annotated[Principal, Depends(ctx.auth)]
    defaults = default_channels(ctx.settings)
    ShopParam = Annotated[
        str | None,
        Query(description="required with the admin key", max_length=64, pattern=NO_CONTROL),
    ]
    Name = Annotated[str, Path(max_length=64, pattern=r"^[a-z0-9_][a-z0-9_.-]{0,63}$")]
    CustomerPath = Annotated[str, Path(min_length=1, max_length=200, pattern=NO_CONTROL)]

    @router.get("/v1/messages", response_model=MessagePage)
    async def list_messages(
        principal: Auth,
        shop_id: ShopParam = None,
        customer_id: Annotated[str | None, Query(max_length=200, pattern=NO_CONTROL)] = None,
        journey_id: Annotated[str | None, Query(max_length=64, pattern=NO_CONTROL)] = None,
        status: Status | None = None,
        channel: ChannelName | None = None,
        cursor: Annotated[str | None, Query(max_length=120, pattern=NO_CONTROL)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> MessagePage:
        """The shop's messages, newest first; follow `next_cursor`."""
        shop = principal.shop(shop_id)
        m = messages.c
        query = select(messages).where(m.shop_id == shop)
        for column, value in (
            (m.customer_id, customer_id),
            (m.journey_id, journey_id),
            (m.status, status),
            (m.channel, channel),
        ):
            if value is not None:
                query = query.where(column == value)
        if cursor is not None:
            try:
                at_text, last = cursor.split("|", 1)
                at = datetime.fromisoformat(at_text)
            except ValueError:
                raise Problem(400, "the cursor is not one this API issued") from None
            query = query.where(
                or_(m.created_at < at, and_(m.created_at == at, m.message_id < last))
            )
        query = query.order_by(m.created_at.desc(), m.message_id.desc()).limit(limit + 1)
        async with ctx.db.connect() as conn:
            rows = list(await conn.execute(query))
        page = rows[:limit]
        return MessagePage(
            items=[_message(r) for r in page],
            next_cursor=_cursor(page[-1]) if len(rows) > limit else None,
        )

    @router.get("/v1/messages/{message_id}", response_model=MessageOut)
    async def get_message(
        message_id: Annotated[str, Path(max_length=40, pattern=r"^[0-9a-f]+$")],
        principal: Auth,
        shop_id: ShopParam = None,
    ) -> MessageOut:
        """One message with its status history."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            row = (
                await conn.execute(
                    select(messages).where(
                        messages.c.shop_id == shop, messages.c.message_id == message_id
                    )
                )
            ).first()
            if row is None:
                raise Problem(404, f"no message {message_id!r} in shop {shop!r}")
            h = history.c
            steps = [
                HistoryOut(status=s, reason=r, at=a)
                for s, r, a in await conn.execute(
                    select(h.status, h.reason, h.at)
                    .where(h.shop_id == shop, h.message_id == message_id)
                    .order_by(h.seq)
                )
            ]
        return _message(row, steps)

    def _checked(channel: str, given: ProviderIn) -> dict[str, Any]:
        if channel not in PROVIDER_CHANNELS[given.provider]:
            raise Problem(422, f"{given.provider} does not send {channel}")
        adapter = adapters.get(given.provider)
        if adapter is None:
            raise Problem(422, f"the {given.provider} provider is not available")
        try:
            model = adapter.settings_model.model_validate(given.settings)
        except ValidationError as exc:
            raise Problem(
                422, f"the {given.provider} settings are invalid", errors=field_errors(exc)
            ) from None
        dumped: dict[str, Any] = orjson.loads(
            orjson.dumps(_reveal(model.model_dump(mode="python", by_alias=True)))
        )
        return dumped

    @router.put("/v1/channels/{channel}", response_model=ChannelOut)
    async def put_channel(
        channel: ChannelName, body: ChannelIn, principal: Auth, shop_id: ShopParam = None
    ) -> ChannelOut:
        """Which provider sends the shop's `channel` (and which takes over when it fails).
        Credentials are stored and never shown again."""
        shop = principal.shop(shop_id)
        settings = _checked(channel, body)
        fallback = _checked(channel, body.fallback) if body.fallback else None
        if body.fallback and body.fallback.provider == body.provider:
            raise Problem(422, "the fallback must be another provider")
        row = {
            "shop_id": shop,
            "channel": channel,
            "provider": body.provider,
            "settings": orjson.dumps(settings).decode(),
            "fallback_provider": body.fallback.provider if body.fallback else None,
            "fallback_settings": orjson.dumps(fallback).decode() if fallback else None,
            "updated_at": clock(),
        }
        fallback_provider = body.fallback.provider if body.fallback else None
        async with ctx.db.begin() as conn:
            await conn.execute(
                upsert(
                    conn,
                    channels,
                    ["shop_id", "channel"],
                    [
                        "provider",
                        "settings",
                        "fallback_provider",
                        "fallback_settings",
                        "updated_at",
                    ],
                ),
                row,
            )
            urls = await _callback_urls(conn, shop, [body.provider, fallback_provider])
        return _channel_out(channel, body.provider, fallback_provider, settings, urls)

    @router.get("/v1/channels/{channel}", response_model=ChannelOut)
    async def get_channel(
        channel: ChannelName, principal: Auth, shop_id: ShopParam = None
    ) -> ChannelOut:
        """The channel's provider and settings, credentials left out."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            found = (await load_channels(conn, [shop], defaults)).get((shop, channel), OUTBOX)
            urls = await _callback_urls(conn, shop, [found.provider, found.fallback_provider])
        return _channel_out(channel, found.provider, found.fallback_provider, found.settings, urls)

    async def _callback_urls(
        conn: AsyncConnection, shop: str, providers: list[str | None]
    ) -> dict[str, str]:
        pushing = [p for p in providers if p in CALLBACK_PROVIDERS]
        if not pushing:
            return {}
        secret = (await links.shop_secrets(conn, [shop], now=clock()))[shop]
        base = links.public_base(ctx.settings)
        return {p: links.callback_url(base, secret, shop, p) for p in pushing}

    @router.get("/v1/consent/{customer_id}", response_model=ConsentOut)
    async def get_consent(
        customer_id: CustomerPath, principal: Auth, shop_id: ShopParam = None
    ) -> ConsentOut:
        """The customer's consent per channel (null: never asked)."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            return ConsentOut(
                customer_id=customer_id, **await consent.read(conn, shop, customer_id)
            )

    @router.put("/v1/consent/{customer_id}", response_model=ConsentOut)
    async def put_consent(
        customer_id: CustomerPath, body: ConsentIn, principal: Auth, shop_id: ShopParam = None
    ) -> ConsentOut:
        """Set the customer's consent; a channel left out keeps its value."""
        shop = principal.shop(shop_id)
        given = body.model_dump(exclude_unset=True)
        async with ctx.db.begin() as conn:
            stored = await consent.write(conn, shop, customer_id, given, clock())
        return ConsentOut(customer_id=customer_id, **stored)

    @router.get("/v1/notifier/policy", response_model=rules.Policy)
    async def get_policy(principal: Auth, shop_id: ShopParam = None) -> rules.Policy:
        """Quiet hours, consent for transactional messages, rate limits per provider."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            return (await load_policies(conn, [shop]))[shop]

    @router.put("/v1/notifier/policy", response_model=rules.Policy)
    async def put_policy(
        body: rules.Policy, principal: Auth, shop_id: ShopParam = None
    ) -> rules.Policy:
        """Replace the shop's notifier policy."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            await conn.execute(
                upsert(conn, policies, ["shop_id"], ["definition", "updated_at"]),
                {"shop_id": shop, "definition": body.model_dump_json(), "updated_at": clock()},
            )
        return body

    async def _save_template(
        conn: AsyncConnection, shop: str, template: templates.Template, *, new: bool
    ) -> None:
        problems = templates.validate(template)
        if problems:
            raise Problem(422, "the template does not render", errors=[dict(p) for p in problems])
        now = clock()
        exists = (
            await conn.execute(
                select(template_rows.c.name).where(
                    template_rows.c.shop_id == shop, template_rows.c.name == template.name
                )
            )
        ).first()
        if new and exists:
            raise Problem(409, f"a template {template.name!r} exists; PUT it to change it")
        await conn.execute(
            upsert(
                conn, template_rows, ["shop_id", "name"], ["channel", "definition", "updated_at"]
            ),
            {
                "shop_id": shop,
                "name": template.name,
                "channel": template.channel,
                "definition": template.model_dump_json(by_alias=True),
                "created_at": now,
                "updated_at": now,
            },
        )

    def _parse_template(body: Any) -> templates.Template:
        try:
            return templates.Template.model_validate(body)
        except ValidationError as exc:
            raise Problem(422, "the template is invalid", errors=field_errors(exc)) from None

    async def _load_template(conn: AsyncConnection, shop: str, name: str) -> templates.Template:
        text = (
            await conn.execute(
                select(template_rows.c.definition).where(
                    template_rows.c.shop_id == shop, template_rows.c.name == name
                )
            )
        ).scalar()
        if text is None:
            raise Problem(404, f"no template {name!r} in shop {shop!r}")
        return templates.Template.model_validate_json(text)

    @router.post("/v1/templates", status_code=201)
    async def create_template(
        principal: Auth, body: Annotated[dict[str, Any], Body()], shop_id: ShopParam = None
    ) -> dict[str, Any]:
        """Save a new template; it must render with the documented variables."""
        shop = principal.shop(shop_id)
        template = _parse_template(body)
        async with ctx.db.begin() as conn:
            await _save_template(conn, shop, template, new=True)
        return template.model_dump(mode="json", by_alias=True)

    @router.get("/v1/templates")
    async def list_templates(principal: Auth, shop_id: ShopParam = None) -> dict[str, Any]:
        """The shop's templates."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            texts = list(
                (
                    await conn.execute(
                        select(template_rows.c.definition)
                        .where(template_rows.c.shop_id == shop)
                        .order_by(template_rows.c.name)
                    )
                ).scalars()
            )
        return {"items": [orjson.loads(t) for t in texts]}

    @router.get("/v1/templates/{name}")
    async def get_template(
        name: Name, principal: Auth, shop_id: ShopParam = None
    ) -> dict[str, Any]:
        """One template."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            template = await _load_template(conn, shop, name)
        return template.model_dump(mode="json", by_alias=True)

    @router.put("/v1/templates/{name}")
    async def put_template(
        name: Name,
        principal: Auth,
        body: Annotated[dict[str, Any], Body()],
        shop_id: ShopParam = None,
    ) -> dict[str, Any]:
        """Create or replace the template `name`."""
        shop = principal.shop(shop_id)
        template = _parse_template({**body, "name": name})
        async with ctx.db.begin() as conn:
            await _save_template(conn, shop, template, new=False)
        return template.model_dump(mode="json", by_alias=True)

    @router.post("/v1/templates/{name}/preview")
    async def preview_template(
        name: Name,
        principal: Auth,
        body: Annotated[dict[str, Any], Body()],
        shop_id: ShopParam = None,
    ) -> dict[str, Any]:
        """The template rendered with `variables` (sample values where left out): for SMS
        with its encoding, billed characters (signature included) and segments."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            template = await _load_template(conn, shop, name)
        return templates.preview(template, body)

    return router


def _reveal(value: Any) -> Any:
    """Settings as stored: secrets as their plain values (pydantic masks them)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_reveal(v) for v in value]
    return value


def _channel_out(
    channel: str,
    provider: str,
    fallback: str | None,
    settings: Mapping[str, Any],
    callback_urls: dict[str, str],
) -> ChannelOut:
    return ChannelOut(
        channel=channel,
        provider=provider,
        fallback_provider=fallback,
        settings={k: v for k, v in settings.items() if k not in SECRET_FIELDS},
        callback_urls=callback_urls,
    )

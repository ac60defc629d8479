"""The notifier's routes without an API key: what providers and recipients call.

- `POST /v1/callbacks/{provider}/{shop_id}`: a provider's delivery receipts and inbound
  replies. Verified before anything is read into the shop: Twilio by its
  `X-Twilio-Signature` (HMAC of the URL it posted to, keyed with the shop's auth token;
  behind a proxy, set `HUITOU_PUBLIC_URL` so the URL is the one Twilio saw), Aliyun and
  Tencent, which do not sign their pushes, by the `token` their callback URL carries
  (`GET /v1/channels/sms` shows the URL). A request that fails verification gets 401, a
  body of the wrong shape 400, and neither changes anything; a verified one is applied
  in one transaction (`receipts.apply`) and answered as the provider expects (Aliyun
  `{"code": 0, ...}`, Tencent `{"result": 0, ...}`, Twilio an empty TwiML document), so
  it does not push the same batch again.
- `GET /v1/unsubscribe/{token}`: a page asking to confirm (a GET changes nothing: mail
  scanners follow links), `POST /v1/unsubscribe/{token}`: RFC 8058 one-click (the body
  `List-Unsubscribe=One-Click`) or the page's button. Either suppresses the message's
  address for marketing on its channel (reason `unsubscribe`); the customer's consent is
  left as it is, since an explicit no there stops transactional messages too, and the
  link only ever promised "no more marketing". Repeating it changes nothing more.
"""

import html
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import select

from libs.common.openapi import header_params, platform_body, problem_responses
from libs.common.problems import Problem, read_body
from libs.common.service import ServiceContext
from services.notifier import links, receipts
from services.notifier.config import load_channels
from services.notifier.models import messages
from services.notifier.providers import aliyun, tencent, twilio
from services.notifier.providers.base import Adapter, CallbackRejected
from services.notifier.sending import suppress

CallbackProvider = Literal["aliyun", "tencent", "twilio"]
ShopPath = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Token = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[a-z0-9_.-]+$")]
CallbackToken = Annotated[str | None, Query(max_length=64, pattern=r"^[0-9a-f]*$")]
ANSWERS: dict[str, Callable[[], Response]] = {
    "aliyun": lambda: JSONResponse(aliyun.CALLBACK_ANSWER),
    "tencent": lambda: JSONResponse(tencent.CALLBACK_ANSWER),
    "twilio": lambda: Response(twilio.CALLBACK_ANSWER, media_type=twilio.CALLBACK_CONTENT_TYPE),
}
_PAGE_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "A page", "content": {"text/html": {"schema": {"type": "string"}}}},
    **problem_responses(404),
}
UNSUBSCRIBE_LIMIT = 4096
"""A one-click body is `List-Unsubscribe=One-Click`; nothing bigger is read."""


def build_public_router(
    ctx: ServiceContext, adapters: dict[str, Adapter], *, clock: Callable[[], datetime]
) -> APIRouter:
    router = APIRouter(tags=["notifier: public"])
    base = links.public_base(ctx.settings)

    @router.post(
        "/v1/callbacks/{provider}/{shop_id}",
        response_model=None,
        responses={
            200: {
                "description": "Applied; the answer the provider expects (Aliyun, Tencent: "
                "JSON; Twilio: an empty TwiML document)",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/xml": {"schema": {"type": "string"}},
                },
            },
            **problem_responses(400, 401, 413),
        },
        openapi_extra={
            "requestBody": platform_body(
                "The provider's push exactly as it sends it (Aliyun, Tencent: JSON; "
                "Twilio: a form signed in `X-Twilio-Signature`)",
                {
                    "application/json": {"anyOf": [{"type": "object"}, {"type": "array"}]},
                    "application/x-www-form-urlencoded": {"type": "object"},
                },
            ),
            "parameters": header_params(
                {"X-Twilio-Signature": "Twilio: base64 HMAC-SHA1(auth token, URL + form)"}
            ),
        },
    )
    async def callback(
        provider: CallbackProvider,
        shop_id: ShopPath,
        request: Request,
        token: CallbackToken = None,
    ) -> Response:
        """A provider's delivery receipts and replies for the shop (see the module)."""
        body = await read_body(request, ctx.settings.max_body_bytes)
        adapter = adapters[provider]
        async with ctx.db.begin() as conn:
            configured = await load_channels(conn, [shop_id])
            found = [
                (name, ch.settings_of(provider))
                for (_, name), ch in sorted(configured.items())
                if provider in (ch.provider, ch.fallback_provider)
            ]
            if not found:
                # Said the same way as a bad signature: a caller learns nothing of the shop.
                raise Problem(401, f"no verified {provider} channel")
            channel, settings = found[0]
            if provider not in links.SIGNED_PROVIDERS:
                secret = await links.stored_secret(conn, shop_id)
                if (
                    secret is None
                    or token is None
                    or not links.valid_callback_token(secret, shop_id, provider, token)
                ):
                    raise Problem(401, f"no verified {provider} channel")
            url = base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
            try:
                parsed = adapter.settings_model.model_validate(settings)
                found_receipts = adapter.parse_callback(parsed, request.headers, url, body)
            except CallbackRejected as exc:
                status = 401 if provider in links.SIGNED_PROVIDERS else 400
                raise Problem(status, f"callback refused: {exc}") from None
            await receipts.apply(
                conn,
                shop_id,
                provider,
                channel,
                found_receipts,
                namespace=ctx.settings.topic_namespace,
                now=clock(),
            )
        return ANSWERS[provider]()

    async def _unsubscribe_target(conn: Any, token: str) -> Any:
        parts = links.split_unsubscribe_token(token)
        if parts is None:
            raise Problem(404, "no such unsubscribe link")
        shop, message_id, mac = parts
        secret = await links.stored_secret(conn, shop)
        if secret is None or not links.valid_unsubscribe(secret, shop, message_id, mac):
            raise Problem(404, "no such unsubscribe link")
        m = messages.c
        row = (
            await conn.execute(
                select(m.shop_id, m.channel, m.recipient).where(
                    m.shop_id == shop, m.message_id == message_id
                )
            )
        ).first()
        if row is None or not row.recipient:
            raise Problem(404, "no such unsubscribe link")
        return row

    @router.get("/v1/unsubscribe/{token}", response_class=HTMLResponse, responses=_PAGE_ANSWERS)
    async def unsubscribe_page(token: Token) -> HTMLResponse:
        """A page asking the recipient to confirm (nothing changes until they do)."""
        async with ctx.db.connect() as conn:
            await _unsubscribe_target(conn, token)
        action = html.escape(f"/v1/unsubscribe/{token}")
        return HTMLResponse(
            _page(
                "退订 · Unsubscribe",
                f'<form method="post" action="{action}">'
                "<p>不再接收此店铺的营销消息？<br>Stop marketing messages from this shop?</p>"
                '<button type="submit">退订 · Unsubscribe</button></form>',
            )
        )

    @router.post(
        "/v1/unsubscribe/{token}",
        response_class=HTMLResponse,
        responses={**_PAGE_ANSWERS, **problem_responses(413)},
        openapi_extra={
            "requestBody": platform_body(
                "RFC 8058: `List-Unsubscribe=One-Click` (any form body is accepted)",
                {"application/x-www-form-urlencoded": {"type": "object"}},
            )
        },
    )
    async def unsubscribe(token: Token, request: Request) -> HTMLResponse:
        """RFC 8058 one-click unsubscribe (or the page's button)."""
        await read_body(request, UNSUBSCRIBE_LIMIT)
        now = clock()
        async with ctx.db.begin() as conn:
            row = await _unsubscribe_target(conn, token)
            await suppress(conn, row.shop_id, row.channel, row.recipient, "unsubscribe", now)
        return HTMLResponse(
            _page(
                "已退订 · Unsubscribed",
                "<p>您已退订，不会再收到此店铺的营销消息。<br>"
                "You will receive no more marketing messages from this shop.</p>",
            )
        )

    return router


def _page(title: str, content: str) -> str:
    return (
        '<!doctype html><html lang="zh-CN"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title></head><body><h1>{title}</h1>{content}</body></html>"
    )

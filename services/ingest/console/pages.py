"""The console's pages (`/console/...`), server-rendered; see the package docstring."""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from jinja2 import Environment, FileSystemLoader, select_autoescape

from libs.common.auth import Authenticator
from libs.common.problems import Problem
from libs.common.settings import Settings
from services.ingest.console import i18n
from services.ingest.console.backend import ApiError, Backend
from services.ingest.console.sessions import Session, Sessions

HERE = Path(__file__).parent
STATIC = HERE / "static"
COOKIE = "huitou_console"
PRE_COOKIE = "huitou_console_pre"
LANG_COOKIE = "huitou_lang"
FUNNEL = ("interested", "new", "active", "silent", "sleeping", "churned")
"""The funnel's stages, in the sellers' order (after_sale and prospect are in the table)."""

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


class SignedOut(Exception):
    """No valid session: the page answers with a redirect to the sign-in form."""


def build_console(
    settings: Settings, sessions: Sessions, auth: Authenticator
) -> tuple[APIRouter, Backend]:
    router = APIRouter(prefix="/console", include_in_schema=False)
    backend = Backend(settings)

    def lang_of(request: Request) -> str:
        return i18n.choose(request.cookies.get(LANG_COOKIE), request.headers.get("accept-language"))

    def render(
        request: Request,
        template: str,
        session: Session | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        lang = lang_of(request)
        html = _env.get_template(template).render(
            t=lambda key: i18n.text(lang, key),
            lang=lang,
            session=session,
            path=request.url.path,
            query=lambda **q: urlencode({k: v for k, v in q.items() if v not in (None, "")}),
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    async def session_of(request: Request) -> Session:
        session = await sessions.get(request.cookies.get(COOKIE))
        if session is None:
            raise SignedOut
        return session

    async def form_of(request: Request, session: Session | None) -> dict[str, str]:
        """The urlencoded form, with its CSRF token checked against the session's."""
        body = (await request.body()).decode("utf-8", "replace")
        form = {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}
        if session is not None and not session.csrf_ok(
            form.get("csrf") or request.headers.get("x-csrf-token")
        ):
            raise HTTPException(403, "the form's CSRF token does not match the session")
        return form

    def page(
        handler: Callable[[Request, Session], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """A page that needs a session: signed out → the sign-in form; an API error →
        the error page with the service's own words."""

        async def wrapped(request: Request) -> Response:
            try:
                session = await session_of(request)
            except SignedOut:
                return RedirectResponse("/console/sign-in", 303, headers=HEADERS)
            try:
                return await handler(request, session)
            except ApiError as exc:
                status = exc.status if 400 <= exc.status < 500 else 502
                return render(request, "error.html", session, status=status, error=exc)

        return wrapped

    # -- signing in and out ---------------------------------------------------------

    @router.get("/")
    async def home() -> Response:
        return RedirectResponse("/console/overview", 303, headers=HEADERS)

    @router.get("/sign-in")
    async def sign_in_form(request: Request) -> Response:
        pre = secrets.token_urlsafe(24)
        response = render(request, "sign_in.html", None, pre=pre, error=None)
        _cookie(response, request, PRE_COOKIE, pre, max_age=3600)
        return response

    @router.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        form = await form_of(request, None)
        pre = request.cookies.get(PRE_COOKIE) or ""
        if not pre or not hmac.compare_digest(pre.encode(), form.get("pre", "").encode()):
            raise HTTPException(403, "the sign-in form's token does not match its cookie")
        key = form.get("key", "").strip()
        shop = form.get("shop_id", "").strip()
        error = None
        principal = None
        try:
            principal = await auth(_bearer(key)) if key else None
        except Problem:
            principal = None
        if principal is None:
            error = "bad_key"
        elif principal.is_admin and not shop:
            error = "need_shop"
        if error is not None or principal is None:
            return render(request, "sign_in.html", None, status=401, pre=pre, error=error)
        shop_id = shop if principal.is_admin else str(principal.shop_id)
        token, _ = await sessions.create(shop_id, principal.is_admin, key)
        response = RedirectResponse("/console/overview", 303, headers=HEADERS)
        _cookie(response, request, COOKIE, token, max_age=12 * 3600)
        response.delete_cookie(PRE_COOKIE, path="/console")
        return response

    @router.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        session = await sessions.get(request.cookies.get(COOKIE))
        if session is not None:
            await form_of(request, session)
            await sessions.end(request.cookies[COOKIE])
        response = RedirectResponse("/console/sign-in", 303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/console")
        return response

    @router.get("/lang/{lang}")
    async def switch_language(request: Request, lang: str) -> Response:
        # Back to the console page the switch was clicked on (never to another site).
        back = request.headers.get("referer") or ""
        _, found, rest = back.partition("/console/")
        target = f"/console/{rest}" if found and "//" not in rest else "/console/overview"
        response = RedirectResponse(target, 303, headers=HEADERS)
        if lang in i18n.LANGS:
            _cookie(response, request, LANG_COOKIE, lang, max_age=365 * 86400, http_only=False)
        return response

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPException(404)
        headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, headers=headers)

    # -- pages ----------------------------------------------------------------------

    async def playbooks_of(session: Session) -> dict[str, dict[str, Any]]:
        found = await backend.get(session, "campaigns", "/v1/playbooks")
        return {p["name"]: p for p in found["items"]}

    async def overview(request: Request, session: Session) -> Response:
        figures = await backend.get(session, "lifecycle", "/v1/overview")
        stages = figures["stages"]
        funnel = [
            {"stage": s, "name": i18n.text(lang_of(request), s), "value": stages.get(s, 0)}
            for s in FUNNEL
        ]
        return render(
            request,
            "overview.html",
            session,
            figures=figures,
            funnel=json.dumps(funnel, ensure_ascii=False),
            stage_names=list(i18n.STAGES),
        )

    async def customers(request: Request, session: Session) -> Response:
        q = request.query_params
        wanted = {k: q.get(k) for k in ("stage", "tag", "q", "sort", "cursor")}
        found = await backend.get(session, "lifecycle", "/v1/customers", limit=50, **wanted)
        return render(
            request,
            "customers.html",
            session,
            page=found,
            wanted=wanted,
            stage_names=list(i18n.STAGES),
        )

    async def customer(request: Request, session: Session) -> Response:
        cid = request.path_params["customer_id"]
        path = f"/v1/customers/{_segment(cid)}"
        found = await backend.get(session, "lifecycle", path)
        timeline = await backend.get(session, "lifecycle", f"{path}/timeline")
        messages = await backend.get(session, "notifier", "/v1/messages", customer_id=cid)
        consent = await backend.get(session, "notifier", f"/v1/consent/{_segment(cid)}")
        return render(
            request,
            "customer.html",
            session,
            c=found,
            timeline=timeline,
            messages=messages["items"],
            consent=consent,
        )

    async def journeys(request: Request, session: Session) -> Response:
        found = await backend.get(session, "campaigns", "/v1/journeys", limit=100)
        playbooks = await backend.get(session, "campaigns", "/v1/playbooks")
        return render(
            request,
            "journeys.html",
            session,
            journeys=found["items"],
            playbooks=playbooks["items"],
        )

    async def new_journey(request: Request, session: Session) -> Response:
        name = request.query_params.get("playbook", "unpaid_reminder")
        playbooks = await playbooks_of(session)
        if name not in playbooks:
            raise ApiError(404, f"no playbook {name!r}", [])
        return render(
            request,
            "new_journey.html",
            session,
            playbook=playbooks[name],
            fields=_fields(playbooks[name]["params"]),
            errors=[],
            values={},
        )

    async def create_journey(request: Request, session: Session) -> Response:
        form = await form_of(request, session)
        name = form.get("playbook", "")
        playbooks = await playbooks_of(session)
        if name not in playbooks:
            raise ApiError(404, f"no playbook {name!r}", [])
        fields = _fields(playbooks[name]["params"])
        params: dict[str, Any] = {}
        for f in fields:
            raw = form.get(f"p_{f['name']}", "").strip()
            if raw:
                params[f["name"]] = _typed(raw, f)
        try:
            made = await backend.post(
                session,
                "campaigns",
                f"/v1/playbooks/{name}",
                {"params": params, "activate": True},
            )
        except ApiError as exc:
            if exc.status != 422:
                raise
            return render(
                request,
                "new_journey.html",
                session,
                status=422,
                playbook=playbooks[name],
                fields=fields,
                errors=_errors(exc),
                values={f["name"]: form.get(f"p_{f['name']}", "") for f in fields},
            )
        return RedirectResponse(f"/console/journeys/{made['journey_id']}", 303, headers=HEADERS)

    async def journey_page(
        request: Request,
        session: Session,
        *,
        dry: dict[str, Any] | None = None,
        status: int = 200,
    ) -> Response:
        jid = _segment(request.path_params["journey_id"])
        found = await backend.get(session, "campaigns", f"/v1/journeys/{jid}")
        report = await backend.get(session, "campaigns", f"/v1/journeys/{jid}/report")
        trigger = found["definition"]["trigger"].get("event")
        sample = (
            dry["event_text"]
            if dry
            else json.dumps(_sample_event(trigger, "c-1"), ensure_ascii=False, indent=2)
        )
        return render(
            request,
            "journey.html",
            session,
            status=status,
            j=found,
            report=report,
            trigger=trigger,
            sample=sample,
            dry=dry,
        )

    async def journey(request: Request, session: Session) -> Response:
        return await journey_page(request, session)

    async def dry_run(request: Request, session: Session) -> Response:
        """The path an event would take a customer along (nothing stored or sent)."""
        form = await form_of(request, session)
        jid = _segment(request.path_params["journey_id"])
        text = form.get("event", "")
        dry: dict[str, Any] = {"event_text": text, "customer_id": form.get("customer_id", "")}
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            dry["error"] = "the event must be a JSON object"
            return await journey_page(request, session, dry=dry, status=422)
        try:
            found = await backend.post(
                session,
                "campaigns",
                f"/v1/journeys/{jid}/dry-run",
                {"customer_id": dry["customer_id"], "event": event},
            )
        except ApiError as exc:
            if exc.status != 422:
                raise
            dry["error"] = exc.detail
            dry["errors"] = exc.errors
            return await journey_page(request, session, dry=dry, status=422)
        dry["path"] = found["path"]
        return await journey_page(request, session, dry=dry)

    async def journey_action(request: Request, session: Session) -> Response:
        await form_of(request, session)
        jid = _segment(request.path_params["journey_id"])
        action = request.path_params["action"]
        if action not in ("pause", "resume", "archive", "activate"):
            raise HTTPException(404)
        await backend.post(session, "campaigns", f"/v1/journeys/{jid}/{action}")
        return RedirectResponse(f"/console/journeys/{jid}", 303, headers=HEADERS)

    async def messages(request: Request, session: Session) -> Response:
        q = request.query_params
        wanted = {k: q.get(k) for k in ("status", "channel", "customer_id", "cursor")}
        found = await backend.get(session, "notifier", "/v1/messages", limit=50, **wanted)
        return render(request, "messages.html", session, page=found, wanted=wanted)

    async def message(request: Request, session: Session) -> Response:
        mid = _segment(request.path_params["message_id"])
        found = await backend.get(session, "notifier", f"/v1/messages/{mid}")
        return render(request, "message.html", session, m=found)

    async def promotions(request: Request, session: Session) -> Response:
        q = request.query_params
        now = datetime.now(UTC).replace(microsecond=0)
        start = q.get("from") or (now + timedelta(days=7)).date().isoformat()
        end = q.get("to") or (now + timedelta(days=10)).date().isoformat()
        found = await backend.get(session, "campaigns", "/v1/promotions", limit=50)
        forecast = None
        problem = None
        try:
            forecast = await backend.get(
                session,
                "lifecycle",
                "/v1/forecasts/returning-orders",
                **{"from": f"{start}T00:00:00+00:00", "to": f"{end}T00:00:00+00:00"},
            )
        except ApiError as exc:
            if exc.status not in (404, 409, 422):
                raise
            problem = exc.detail
        return render(
            request,
            "promotions.html",
            session,
            promotions=found["items"],
            start=start,
            end=end,
            forecast=forecast,
            problem=problem,
        )

    async def tags_page(
        request: Request, session: Session, status: int = 200, errors: Any = None
    ) -> Response:
        found = await backend.get(session, "lifecycle", "/v1/tags")
        segments = await backend.get(session, "lifecycle", "/v1/segments")
        return render(
            request,
            "tags.html",
            session,
            status=status,
            tags=found,
            segments=segments,
            stage_names=list(i18n.STAGES),
            errors=errors or [],
        )

    async def tags(request: Request, session: Session) -> Response:
        return await tags_page(request, session)

    async def count_segment(request: Request, session: Session) -> Response:
        """The builder's live count (fetched by console.js as the form changes)."""
        form = await form_of(request, session)
        try:
            found = await backend.post(
                session, "lifecycle", "/v1/segments/count", {"filter": _rule(form)}
            )
        except ApiError as exc:
            if exc.status != 422:
                raise
            return JSONResponse({"count": None, "error": exc.detail}, 422, headers=HEADERS)
        return JSONResponse({"count": found["count"]}, headers=HEADERS)

    async def save_segment(request: Request, session: Session) -> Response:
        form = await form_of(request, session)
        body = {"name": form.get("name", "").strip(), "filter": _rule(form)}
        try:
            await backend.post(session, "lifecycle", "/v1/segments", body)
        except ApiError as exc:
            if exc.status != 422:
                raise
            return await tags_page(request, session, status=422, errors=_errors(exc))
        return RedirectResponse("/console/tags", 303, headers=HEADERS)

    async def export_segment(request: Request, session: Session) -> Response:
        sid = _segment(request.path_params["segment_id"])
        csv = await backend.text(session, "lifecycle", f"/v1/segments/{sid}/export.csv")
        return Response(
            csv,
            media_type="text/csv; charset=utf-8",
            headers={
                **HEADERS,
                "Content-Disposition": f'attachment; filename="segment-{sid}.csv"',
            },
        )

    async def templates(request: Request, session: Session) -> Response:
        found = await backend.get(session, "notifier", "/v1/templates")
        return render(request, "templates.html", session, templates=found["items"])

    async def template_page(
        request: Request, session: Session, status: int = 200, errors: Any = None
    ) -> Response:
        name = _segment(request.path_params["name"])
        found = await backend.get(session, "notifier", f"/v1/templates/{name}")
        previews = {}
        for locale in found["locales"]:
            try:
                previews[locale] = await backend.post(
                    session, "notifier", f"/v1/templates/{name}/preview", {"locale": locale}
                )
            except ApiError as exc:
                previews[locale] = {"error": exc.detail, "errors": exc.errors}
        return render(
            request,
            "template.html",
            session,
            status=status,
            tpl=found,
            previews=previews,
            errors=errors or [],
        )

    async def template(request: Request, session: Session) -> Response:
        return await template_page(request, session)

    async def save_template(request: Request, session: Session) -> Response:
        form = await form_of(request, session)
        name = _segment(request.path_params["name"])
        found = await backend.get(session, "notifier", f"/v1/templates/{name}")
        locales = {}
        for locale, content in found["locales"].items():
            edited = {"text": form.get(f"text_{locale}", content["text"])}
            for part in ("subject", "html"):
                value = form.get(f"{part}_{locale}", content.get(part))
                if value:
                    edited[part] = value
            locales[locale] = edited
        body = {**found, "locales": locales}
        try:
            await backend.call(session, "notifier", "PUT", f"/v1/templates/{name}", json=body)
        except ApiError as exc:
            if exc.status != 422:
                raise
            return await template_page(request, session, status=422, errors=_errors(exc))
        return RedirectResponse(f"/console/templates/{name}", 303, headers=HEADERS)

    async def channels_page(
        request: Request, session: Session, status: int = 200, errors: Any = None
    ) -> Response:
        found = {
            name: await backend.get(session, "notifier", f"/v1/channels/{name}")
            for name in ("sms", "email")
        }
        return render(
            request, "channels.html", session, status=status, channels=found, errors=errors or []
        )

    async def channels(request: Request, session: Session) -> Response:
        return await channels_page(request, session)

    async def save_channel(request: Request, session: Session) -> Response:
        form = await form_of(request, session)
        name = request.path_params["channel"]
        if name not in ("sms", "email"):
            raise HTTPException(404)
        try:
            settings = json.loads(form.get("settings") or "{}")
        except ValueError:
            settings = None
        errors: list[dict[str, Any]] = []
        if not isinstance(settings, dict):
            errors = [{"field": "settings", "message": "settings must be a JSON object"}]
        else:
            try:
                await backend.call(
                    session,
                    "notifier",
                    "PUT",
                    f"/v1/channels/{name}",
                    json={"provider": form.get("provider", ""), "settings": settings},
                )
                return RedirectResponse("/console/channels", 303, headers=HEADERS)
            except ApiError as exc:
                if exc.status != 422:
                    raise
                errors = _errors(exc)
        return await channels_page(request, session, status=422, errors=errors)

    for path, handler, methods in (
        ("/overview", overview, ["GET"]),
        ("/customers", customers, ["GET"]),
        ("/customers/{customer_id}", customer, ["GET"]),
        ("/tags", tags, ["GET"]),
        ("/segments/count", count_segment, ["POST"]),
        ("/segments", save_segment, ["POST"]),
        ("/segments/{segment_id}/export.csv", export_segment, ["GET"]),
        ("/journeys", journeys, ["GET"]),
        ("/journeys/new", new_journey, ["GET"]),
        ("/journeys/new", create_journey, ["POST"]),
        ("/journeys/{journey_id}", journey, ["GET"]),
        ("/journeys/{journey_id}/dry-run", dry_run, ["POST"]),
        ("/journeys/{journey_id}/{action}", journey_action, ["POST"]),
        ("/messages", messages, ["GET"]),
        ("/messages/{message_id}", message, ["GET"]),
        ("/promotions", promotions, ["GET"]),
        ("/templates", templates, ["GET"]),
        ("/templates/{name}", template, ["GET"]),
        ("/templates/{name}", save_template, ["POST"]),
        ("/channels", channels, ["GET"]),
        ("/channels/{channel}", save_channel, ["POST"]),
    ):
        router.add_api_route(path, page(handler), methods=methods)

    return router, backend


def _errors(exc: ApiError) -> list[dict[str, Any]]:
    """A refusal's field errors, or its detail as the one error."""
    return exc.errors or [{"field": "", "message": exc.detail}]


def _bearer(key: str) -> Request:
    """A request carrying `key` the way the API's own dependency reads it."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    return Request(scope)


def _cookie(
    response: Response,
    request: Request,
    name: str,
    value: str,
    *,
    max_age: int,
    http_only: bool = True,
) -> None:
    secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/console",
        httponly=http_only,
        samesite="strict",
        secure=secure,
    )


def _segment(value: str) -> str:
    """A path segment as the API expects it (percent-encoded)."""
    return quote(value, safe="")


def _sample_event(event_type: str | None, customer_id: str) -> dict[str, Any]:
    """An event of the journey's trigger type to start a dry run from (the operator edits
    it): an order with a total and a city for order events, the stage for stage changes."""
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    kind = event_type or "order.created"
    data: dict[str, Any] = {"customer_id": customer_id}
    if kind.startswith("order."):
        data = {
            "order_id": "dry-run-1",
            "status": kind.split(".", 1)[1],
            "customer": {"id": customer_id},
            "total": {"amount_minor": 25900, "currency": "CNY"},
            "shipping": {"country": "CN", "city": "杭州市"},
        }
    elif kind == "customer.stage_changed":
        data = {"customer_id": customer_id, "previous": "active", "current": "sleeping"}
    elif kind.startswith("logistics."):
        data = {"tracking_number": "SF0000000000", "carrier": "SF", "order_id": "dry-run-1"}
    return {
        "specversion": "1.0",
        "id": "dry-run",
        "source": "console",
        "type": kind,
        "time": now,
        "subject": customer_id,
        "data": data,
    }


def _rule(form: dict[str, str]) -> dict[str, Any]:
    """The rule builder's form as a rule of the lifecycle rule language: every condition
    given must hold (the API checks it; a value that is no number is sent as text, so the
    API's own message says what is wrong)."""

    def number(raw: str, scale: int = 1) -> Any:
        try:
            return int(raw) if scale == 1 else round(float(raw) * scale)
        except ValueError:
            return raw

    parts: list[dict[str, Any]] = []
    if form.get("stage"):
        parts.append({"field": "stage", "op": "eq", "value": form["stage"]})
    if form.get("tag"):
        parts.append({"has_tag": form["tag"]})
    if form.get("city"):
        parts.append({"field": "city", "op": "eq", "value": form["city"]})
    if form.get("min_frequency"):
        parts.append({"field": "frequency", "op": "gte", "value": number(form["min_frequency"])})
    if form.get("max_recency_days"):
        value = number(form["max_recency_days"])
        parts.append({"field": "recency_days", "op": "lte", "value": value})
    if form.get("min_spent"):
        value = number(form["min_spent"], 100)
        parts.append({"field": "monetary_minor", "op": "gte", "value": value})
    if form.get("max_p_alive"):
        try:
            p_alive: Any = float(form["max_p_alive"])
        except ValueError:
            p_alive = form["max_p_alive"]
        parts.append({"field": "p_alive", "op": "lte", "value": p_alive})
    if not parts:
        return {"field": "frequency", "op": "gte", "value": 0}  # everyone
    return parts[0] if len(parts) == 1 else {"all": parts}


def _fields(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A playbook's parameters as form fields: name, type, default, choices, help."""
    fields = []
    for name, prop in schema.get("properties", {}).items():
        options = prop.get("anyOf") or [prop]
        kinds = [o for o in options if o.get("type") != "null"]
        first = kinds[0] if kinds else {}
        enum = first.get("enum")
        kind = "choice" if enum else first.get("type", "string")
        fields.append(
            {
                "name": name,
                "type": kind,
                "choices": enum or [],
                "default": prop.get("default"),
                "help": prop.get("description") or first.get("description") or "",
                "title": prop.get("title", name),
            }
        )
    return fields


def _typed(raw: str, field: dict[str, Any]) -> Any:
    """A form field's text as its parameter's JSON type (the API says what is wrong)."""
    kind = field["type"]
    if kind == "choice":
        return next((c for c in field["choices"] if str(c) == raw), raw)
    if kind == "integer":
        try:
            return int(raw)
        except ValueError:
            return raw
    if kind == "boolean":
        return raw.lower() in ("1", "true", "yes", "on")
    if kind == "array":
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw

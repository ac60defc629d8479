"""Campaigns routes: journeys (versioned), their lifecycle, enrollments, reports, dry runs
and the shipped playbooks. Shop key, or the admin key naming the shop with `?shop_id=`.

A journey goes draft → active → paused → active … → archived. Paused admits no one and
holds running enrollments where they are (a wait that comes due while paused fires when
the journey resumes); archive ends running enrollments with the reason `archived`. `PUT`
makes a new version: new enrollments start on it (from then on, when active), running
ones finish on the version they started on.
"""

import asyncio
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import httpx
import orjson
from fastapi import APIRouter, Body, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.auth import Principal
from libs.common.db.tables import shops
from libs.common.events import UtcDatetime, parse_event
from libs.common.problems import Problem, field_errors
from libs.common.service import ServiceContext
from libs.common.timers import Timer, cancel, schedule, timer_key
from services.campaigns import engine, projection
from services.campaigns.broadcasts import (
    broadcast_key,
    broadcast_time,
    release_broadcast,
    schedule_broadcast,
)
from services.campaigns.conditions import evaluate
from services.campaigns.definitions import Definition, parse_definition
from services.campaigns.models import enrollments, journey_versions, journeys, promotions
from services.campaigns.playbooks import PLAYBOOKS, TEMPLATES, make
from services.campaigns.reports import report

NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
JourneyIdPath = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Status = Literal["draft", "active", "paused", "archived"]


class JourneyOut(BaseModel):
    journey_id: str
    name: str
    version: int
    status: Status
    category: str
    playbook: str | None = None
    created_at: datetime
    updated_at: datetime
    definition: dict[str, Any]


class JourneyPage(BaseModel):
    items: list[JourneyOut]


class DryRunIn(BaseModel):
    customer_id: Annotated[str, Field(min_length=1, max_length=200, pattern=NO_CONTROL)]
    event: dict[str, Any]


class EnrollmentOut(BaseModel):
    enrollment_id: str
    version: int
    customer_id: str
    order_id: str | None
    status: str
    step_id: str | None
    due_at: datetime | None
    held_out: bool
    entered_at: datetime
    exit_reason: str | None
    converted_at: datetime | None


class EnrollmentPage(BaseModel):
    items: list[EnrollmentOut]
    next_cursor: str | None


class PromotionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=NO_CONTROL)]
    starts_at: UtcDatetime
    ends_at: UtcDatetime
    skus: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=200, pattern=NO_CONTROL)]],
        Field(max_length=500),
    ] = []

    @model_validator(mode="after")
    def _ordered(self) -> "PromotionIn":
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class PromotionOut(PromotionIn):
    promotion_id: str
    created_at: datetime


class PromotionPage(BaseModel):
    items: list[PromotionOut]


def _promotion(row: Any) -> PromotionOut:
    return PromotionOut(
        promotion_id=row["promotion_id"],
        name=row["name"],
        starts_at=row["starts_at"],
        ends_at=row["ends_at"],
        skus=orjson.loads(row["skus"]),
        created_at=row["created_at"],
    )


class PlaybookIn(BaseModel):
    params: dict[str, Any] = {}
    activate: bool = False


def _parse(body: Any) -> Definition:
    try:
        return parse_definition(body)
    except ValidationError as exc:
        raise Problem(422, "the journey definition is invalid", errors=field_errors(exc)) from None


def build_router(ctx: ServiceContext, *, clock: Callable[[], datetime]) -> APIRouter:
    router = APIRouter(tags=["campaigns"])
    Auth = Annotated[Principal, Depends(ctx.auth)]
    ShopParam = Annotated[
        str | None,
        Query(description="required with the admin key", max_length=64, pattern=NO_CONTROL),
    ]
    namespace = ctx.settings.topic_namespace

    async def _load(conn: AsyncConnection, shop: str, journey_id: str) -> Any:
        row = (
            (
                await conn.execute(
                    select(journeys).where(
                        journeys.c.shop_id == shop, journeys.c.journey_id == journey_id
                    )
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            raise Problem(404, f"no journey {journey_id!r} in shop {shop!r}")
        return row

    async def _out(conn: AsyncConnection, shop: str, journey_id: str) -> JourneyOut:
        row = await _load(conn, shop, journey_id)
        text = await _version_text(conn, shop, journey_id, row["version"])
        return JourneyOut(
            journey_id=journey_id,
            name=row["name"],
            version=row["version"],
            status=row["status"],
            category=row["category"],
            playbook=row["playbook"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            definition=orjson.loads(text),
        )

    async def _create(
        shop: str, definition: Definition, *, playbook: str | None = None, activate: bool = False
    ) -> JourneyOut:
        journey_id = f"j_{secrets.token_hex(6)}"
        now = clock()
        async with ctx.db.begin() as conn:
            await _require_shop(conn, shop)
            await conn.execute(
                journeys.insert().values(
                    shop_id=shop,
                    journey_id=journey_id,
                    name=definition.name,
                    category=definition.category,
                    status="active" if activate else "draft",
                    version=1,
                    playbook=playbook,
                    created_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(
                journey_versions.insert().values(
                    shop_id=shop,
                    journey_id=journey_id,
                    version=1,
                    definition=orjson.dumps(definition.dump()).decode(),
                    created_at=now,
                    active_since=now if activate else None,
                )
            )
            if definition.trigger.promotion is not None:
                await broadcast_time(conn, shop, definition, ZoneInfo("UTC"))  # it exists
            if activate:
                await _schedule_if_broadcast(conn, shop, journey_id, 1, now)
            return await _out(conn, shop, journey_id)

    @router.post("/v1/journeys", status_code=201, response_model=JourneyOut)
    async def create_journey(
        principal: Auth,
        body: Annotated[dict[str, Any], Body(description="a journey definition")],
        shop_id: ShopParam = None,
    ) -> JourneyOut:
        """Create a journey (version 1, a draft) from its definition."""
        shop = principal.shop(shop_id)
        return await _create(shop, _parse(body))

    @router.get("/v1/journeys", response_model=JourneyPage)
    async def list_journeys(
        principal: Auth, shop_id: ShopParam = None, status: Status | None = None
    ) -> JourneyPage:
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            query = select(journeys.c.journey_id).where(journeys.c.shop_id == shop)
            if status is not None:
                query = query.where(journeys.c.status == status)
            ids = list((await conn.execute(query.order_by(journeys.c.created_at))).scalars())
            return JourneyPage(items=[await _out(conn, shop, j) for j in ids])

    @router.get("/v1/journeys/{journey_id}", response_model=JourneyOut)
    async def get_journey(
        journey_id: JourneyIdPath, principal: Auth, shop_id: ShopParam = None
    ) -> JourneyOut:
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            return await _out(conn, shop, journey_id)

    @router.put("/v1/journeys/{journey_id}", response_model=JourneyOut)
    async def edit_journey(
        journey_id: JourneyIdPath,
        principal: Auth,
        body: Annotated[dict[str, Any], Body(description="a journey definition")],
        shop_id: ShopParam = None,
    ) -> JourneyOut:
        """Save a new version. Running enrollments finish on the version they started on."""
        shop = principal.shop(shop_id)
        definition = _parse(body)
        now = clock()
        async with ctx.db.begin() as conn:
            row = await _load(conn, shop, journey_id)
            if row["status"] == "archived":
                raise Problem(409, "an archived journey cannot change")
            version = row["version"] + 1
            await conn.execute(
                journey_versions.insert().values(
                    shop_id=shop,
                    journey_id=journey_id,
                    version=version,
                    definition=orjson.dumps(definition.dump()).decode(),
                    created_at=now,
                    active_since=now if row["status"] in ("active", "paused") else None,
                )
            )
            await conn.execute(
                update(journeys)
                .where(journeys.c.shop_id == shop, journeys.c.journey_id == journey_id)
                .values(
                    version=version,
                    name=definition.name,
                    category=definition.category,
                    updated_at=now,
                )
            )
            await cancel(conn, [broadcast_key(shop, journey_id)])
            if row["status"] == "active":
                await _schedule_if_broadcast(conn, shop, journey_id, version, now)
            return await _out(conn, shop, journey_id)

    @router.post("/v1/journeys/{journey_id}/activate", response_model=JourneyOut)
    async def activate(
        journey_id: JourneyIdPath, principal: Auth, shop_id: ShopParam = None
    ) -> JourneyOut:
        """Start admitting: events from now on enroll."""
        shop = principal.shop(shop_id)
        now = clock()
        async with ctx.db.begin() as conn:
            row = await _load(conn, shop, journey_id)
            if row["status"] != "draft":
                raise Problem(409, f"only a draft can be activated; this one is {row['status']}")
            await _set_status(conn, shop, journey_id, "active", now)
            await _schedule_if_broadcast(conn, shop, journey_id, row["version"], now)
            await conn.execute(
                update(journey_versions)
                .where(
                    journey_versions.c.shop_id == shop,
                    journey_versions.c.journey_id == journey_id,
                    journey_versions.c.version == row["version"],
                )
                .values(active_since=now)
            )
            return await _out(conn, shop, journey_id)

    @router.post("/v1/journeys/{journey_id}/pause", response_model=JourneyOut)
    async def pause(
        journey_id: JourneyIdPath, principal: Auth, shop_id: ShopParam = None
    ) -> JourneyOut:
        """Admit no one; hold running enrollments where they are."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            row = await _load(conn, shop, journey_id)
            if row["status"] != "active":
                raise Problem(
                    409, f"only an active journey can be paused; this one is {row['status']}"
                )
            await _set_status(conn, shop, journey_id, "paused", clock())
            return await _out(conn, shop, journey_id)

    @router.post("/v1/journeys/{journey_id}/resume", response_model=JourneyOut)
    async def resume(
        journey_id: JourneyIdPath, principal: Auth, shop_id: ShopParam = None
    ) -> JourneyOut:
        """Admit again; enrollments held while paused go on at once, nothing skipped."""
        shop = principal.shop(shop_id)
        now = clock()
        async with ctx.db.begin() as conn:
            row = await _load(conn, shop, journey_id)
            if row["status"] != "paused":
                raise Problem(409, f"only a paused journey can resume; this one is {row['status']}")
            await _set_status(conn, shop, journey_id, "active", now)
            await _release_held(conn, shop, journey_id, row["category"], now)
            await release_broadcast(conn, shop, journey_id, now)
            return await _out(conn, shop, journey_id)

    @router.post("/v1/journeys/{journey_id}/archive", response_model=JourneyOut)
    async def archive(
        journey_id: JourneyIdPath, principal: Auth, shop_id: ShopParam = None
    ) -> JourneyOut:
        """End the journey: running enrollments exit with the reason `archived`."""
        shop = principal.shop(shop_id)
        now = clock()
        async with ctx.db.begin() as conn:
            row = await _load(conn, shop, journey_id)
            if row["status"] == "archived":
                raise Problem(409, "the journey is archived already")
            await _set_status(conn, shop, journey_id, "archived", now)
            await cancel(conn, [broadcast_key(shop, journey_id)])
            run = engine.Run(conn, now, namespace=namespace)
            e = enrollments.c
            while True:
                live = await run.lock_live((e.shop_id == shop) & (e.journey_id == journey_id))
                if not live:
                    break
                for enrollment in live:
                    run.finish(enrollment, "exited", "archived")
                await run.flush()
                run = engine.Run(conn, now, namespace=namespace)
            return await _out(conn, shop, journey_id)

    @router.post("/v1/journeys/{journey_id}/dry-run")
    async def dry_run(
        journey_id: JourneyIdPath, body: DryRunIn, principal: Auth, shop_id: ShopParam = None
    ) -> dict[str, Any]:
        """The path an event would take a customer along, and the messages that would go
        out, assuming no goal arrives; nothing is stored or sent."""
        shop = principal.shop(shop_id)
        try:
            event = parse_event({**body.event, "shop_id": shop})
        except ValidationError as exc:
            raise Problem(422, "the event is invalid", errors=field_errors(exc)) from None
        now = clock()
        async with ctx.db.connect() as conn:
            row = await _load(conn, shop, journey_id)
            found = await engine.load_journeys(
                conn, [shop], statuses=("draft", "active", "paused", "archived")
            )
            journey = found[(shop, journey_id)]
            definition = journey.definition(row["version"])
            run = engine.Run(conn, now, namespace=namespace, dry=True)
            run.journeys = found
            await run.load_shops([shop])
            run.snap = await projection.load(conn, [event])
            who = projection.apply(run.snap, event)
            who.customer_id = body.customer_id
            facts = {
                **projection.event_facts(event, now),
                **projection.state_facts(
                    run.snap.customer(shop, who.customer_id),
                    run.snap.order(shop, who.order_id),
                    now,
                ),
            }
            trigger = definition.trigger
            path: list[dict[str, Any]] = []
            if trigger.event is not None and trigger.event != event.type:
                path.append({"enrolled": False, "reason": f"the trigger is {trigger.event}"})
            elif trigger.if_ is not None and not evaluate(trigger.if_, facts):
                path.append({"enrolled": False, "reason": "the trigger's condition is false"})
            else:
                entry = engine.entry_of(run, event, who, facts)
                enrollment = await engine.enroll(run, journey, definition, entry)
                for _ in range(engine.MAX_DRY_STEPS):
                    if enrollment is None or enrollment.status != "waiting":
                        break
                    await engine.resume(run, journey, enrollment, "wait")
                path = run.path
        return {"journey_id": journey_id, "version": row["version"], "path": path}

    @router.get("/v1/journeys/{journey_id}/enrollments", response_model=EnrollmentPage)
    async def list_enrollments(
        journey_id: JourneyIdPath,
        principal: Auth,
        shop_id: ShopParam = None,
        status: Literal["waiting", "held", "completed", "exited"] | None = None,
        customer_id: Annotated[str | None, Query(max_length=200, pattern=NO_CONTROL)] = None,
        cursor: Annotated[str | None, Query(max_length=40, pattern=r"^[0-9a-f]+$")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> EnrollmentPage:
        shop = principal.shop(shop_id)
        e = enrollments.c
        async with ctx.db.connect() as conn:
            await _load(conn, shop, journey_id)
            query = select(enrollments).where(e.shop_id == shop, e.journey_id == journey_id)
            if status is not None:
                query = query.where(e.status == status)
            if customer_id is not None:
                query = query.where(e.customer_id == customer_id)
            if cursor is not None:
                query = query.where(e.enrollment_id > cursor)
            rows = list(
                (await conn.execute(query.order_by(e.enrollment_id).limit(limit + 1))).mappings()
            )
        items = [EnrollmentOut.model_validate(dict(r)) for r in rows[:limit]]
        return EnrollmentPage(
            items=items, next_cursor=items[-1].enrollment_id if len(rows) > limit else None
        )

    @router.get("/v1/journeys/{journey_id}/report")
    async def journey_report(
        journey_id: JourneyIdPath, principal: Auth, shop_id: ShopParam = None
    ) -> dict[str, Any]:
        """Entered, held out, waiting per step, exited by reason, messages by status,
        conversions, revenue and lift against the holdout (see `reports`)."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            await _load(conn, shop, journey_id)
            currency = (
                await conn.execute(select(shops.c.currency).where(shops.c.shop_id == shop))
            ).scalar() or "CNY"
            return {"journey_id": journey_id, **await report(conn, shop, journey_id, currency)}

    @router.post("/v1/promotions", status_code=201, response_model=PromotionOut)
    async def create_promotion(
        body: PromotionIn, principal: Auth, shop_id: ShopParam = None
    ) -> PromotionOut:
        """A promotion (a sale such as 11-11) that journeys can be timed around."""
        shop = principal.shop(shop_id)
        promotion_id = f"p_{secrets.token_hex(6)}"
        now = clock()
        async with ctx.db.begin() as conn:
            await _require_shop(conn, shop)
            await conn.execute(
                promotions.insert().values(
                    shop_id=shop,
                    promotion_id=promotion_id,
                    name=body.name,
                    starts_at=body.starts_at,
                    ends_at=body.ends_at,
                    skus=orjson.dumps(body.skus).decode(),
                    created_at=now,
                )
            )
        return PromotionOut(promotion_id=promotion_id, created_at=now, **body.model_dump())

    @router.get("/v1/promotions", response_model=PromotionPage)
    async def list_promotions(principal: Auth, shop_id: ShopParam = None) -> PromotionPage:
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            rows = (
                await conn.execute(
                    select(promotions)
                    .where(promotions.c.shop_id == shop)
                    .order_by(promotions.c.starts_at)
                )
            ).mappings()
            return PromotionPage(items=[_promotion(r) for r in rows])

    @router.get("/v1/promotions/{promotion_id}", response_model=PromotionOut)
    async def get_promotion(
        promotion_id: Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")],
        principal: Auth,
        shop_id: ShopParam = None,
    ) -> PromotionOut:
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            row = (
                (
                    await conn.execute(
                        select(promotions).where(
                            promotions.c.shop_id == shop, promotions.c.promotion_id == promotion_id
                        )
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise Problem(404, f"no promotion {promotion_id!r} in shop {shop!r}")
        return _promotion(row)

    @router.get("/v1/playbooks")
    async def list_playbooks(principal: Auth) -> dict[str, Any]:
        """The shipped playbooks and the parameters each takes (JSON schema)."""
        return {
            "items": [
                {
                    "name": p.name,
                    "summary": p.summary,
                    "params": p.params.model_json_schema(),
                    "templates": sorted(p.templates),
                }
                for p in PLAYBOOKS.values()
            ]
        }

    @router.post("/v1/playbooks/{name}", status_code=201, response_model=JourneyOut)
    async def from_playbook(
        name: Annotated[str, Path(max_length=64, pattern=r"^[a-z_]+$")],
        request: Request,
        principal: Auth,
        body: PlaybookIn,
        shop_id: ShopParam = None,
    ) -> JourneyOut:
        """Make a journey from a playbook (a normal journey afterwards)."""
        shop = principal.shop(shop_id)
        if name not in PLAYBOOKS:
            raise Problem(404, f"no playbook {name!r}; see GET /v1/playbooks")
        context: dict[str, Any] = {}
        if body.params.get("cycle_percentile") is not None:
            context["repurchase_cycle_days"] = await _repurchase_cycle(
                request, shop if principal.is_admin else None
            )
        if body.params.get("days_before_predicted_purchase") is not None:
            context.update(await _repurchase_model(request, shop if principal.is_admin else None))
        try:
            made = make(name, body.params, context)
        except ValidationError as exc:
            errors = [{**e, "field": f"params.{e['field']}"} for e in field_errors(exc)]
            raise Problem(422, "the playbook's parameters are invalid", errors=errors) from None
        except ValueError as exc:
            raise Problem(422, str(exc)) from None
        definition = _parse(made)
        await _default_templates(request, shop if principal.is_admin else None, definition)
        return await _create(shop, definition, playbook=name, activate=body.activate)

    async def _default_templates(
        request: Request, admin_shop: str | None, definition: Definition
    ) -> None:
        """Save in the notifier, with the caller's own key, the shipped default texts of
        the templates the journey sends that the shop has none of (a 409 means it has one:
        the operator's own stands)."""
        wanted = {
            (step.send.template, step.send.channel)
            for step in definition.steps
            if step.send is not None and step.send.template in TEMPLATES
        }
        if not wanted:
            return
        base = ctx.settings.notifier_url or f"http://127.0.0.1:{ctx.settings.port}"
        params, headers = _as_caller(request, admin_shop)
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                for template, channel in sorted(wanted):
                    locales = {
                        locale: (dict(texts) if channel == "email" else {"text": texts["text"]})
                        for locale, texts in TEMPLATES[template].items()
                    }
                    body = {"name": template, "channel": channel, "locales": locales}
                    for _ in range(25):
                        r = await client.post(
                            f"{base}/v1/templates", params=params, headers=headers, json=body
                        )
                        # A key issued a moment ago reaches each service within seconds.
                        if r.status_code != 401:
                            break
                        await asyncio.sleep(0.2)
                    if r.status_code not in (201, 409):
                        raise Problem(
                            503, f"the notifier refused the template {template!r}: {r.text[:200]}"
                        )
        except httpx.HTTPError as exc:
            raise Problem(503, f"the notifier cannot be reached: {exc!r}"[:200]) from None

    async def _schedule_if_broadcast(
        conn: AsyncConnection, shop: str, journey_id: str, version: int, now: datetime
    ) -> None:
        text = await _version_text(conn, shop, journey_id, version)
        definition = parse_definition(orjson.loads(text))
        if definition.trigger.scheduled:
            zone = await _zones(conn, shop)
            await schedule_broadcast(conn, shop, journey_id, version, definition, zone, now)

    async def _lifecycle_get(request: Request, admin_shop: str | None, path: str) -> httpx.Response:
        """A read of lifecycle's API made with the caller's own key (so it sees exactly
        what the caller may see); 503 when lifecycle cannot be reached."""
        base = ctx.settings.lifecycle_url or f"http://127.0.0.1:{ctx.settings.port}"
        params, headers = _as_caller(request, admin_shop)
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                return await client.get(f"{base}{path}", params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise Problem(503, f"lifecycle cannot be reached: {exc!r}"[:200]) from None

    async def _repurchase_cycle(request: Request, admin_shop: str | None) -> dict[str, Any]:
        """The shop's repurchase-cycle percentiles from lifecycle's overview, read with the
        caller's own key (so it sees exactly what the caller may see)."""
        r = await _lifecycle_get(request, admin_shop, "/v1/overview")
        if r.status_code != 200:
            raise Problem(503, f"lifecycle answered {r.status_code} for the overview")
        cycle = r.json().get("repurchase_cycle_days") or {}
        return {name.removeprefix("p"): days for name, days in cycle.items()}

    async def _repurchase_model(request: Request, admin_shop: str | None) -> dict[str, Any]:
        """Whether the shop has a fitted repurchase model (lifecycle's
        `GET /v1/models/repurchase`, read with the caller's own key), and why not."""
        r = await _lifecycle_get(request, admin_shop, "/v1/models/repurchase")
        if r.status_code == 200:
            return {"repurchase_model": True}
        if r.status_code in (404, 409):
            why = str(r.json().get("detail") or "")[:300]
            return {
                "repurchase_model": False,
                "repurchase_model_reason": f"the shop has no repurchase model yet ({why}); "
                "give a delay",
            }
        raise Problem(503, f"lifecycle answered {r.status_code} for the repurchase model")

    return router


def _as_caller(request: Request, admin_shop: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """Query parameters and headers for a call to another service made with the caller's
    own key (an admin names the shop), so it sees exactly what the caller may see."""
    params = {"shop_id": admin_shop} if admin_shop else {}
    return params, {"Authorization": request.headers.get("authorization", "")}


async def _version_text(conn: AsyncConnection, shop: str, journey_id: str, version: int) -> str:
    """A journey version's stored definition (JSON text)."""
    text: str = (
        await conn.execute(
            select(journey_versions.c.definition).where(
                journey_versions.c.shop_id == shop,
                journey_versions.c.journey_id == journey_id,
                journey_versions.c.version == version,
            )
        )
    ).scalar_one()
    return text


async def _zones(conn: AsyncConnection, shop: str) -> ZoneInfo:
    name = (await conn.execute(select(shops.c.timezone).where(shops.c.shop_id == shop))).scalar()
    try:
        return ZoneInfo(name or "UTC")
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


async def _require_shop(conn: AsyncConnection, shop: str) -> None:
    found = (await conn.execute(select(shops.c.shop_id).where(shops.c.shop_id == shop))).first()
    if found is None:
        raise Problem(404, f"no shop {shop!r}")


async def _set_status(
    conn: AsyncConnection, shop: str, journey_id: str, status: str, now: datetime
) -> None:
    await conn.execute(
        update(journeys)
        .where(journeys.c.shop_id == shop, journeys.c.journey_id == journey_id)
        .values(status=status, updated_at=now)
    )


async def _release_held(
    conn: AsyncConnection, shop: str, journey_id: str, category: str, now: datetime
) -> None:
    """Enrollments held while paused wait again, due at once (their timers are gone)."""
    e = enrollments.c
    rows = (
        await conn.execute(
            select(e.enrollment_id, e.step_id, e.version, e.context).where(
                e.shop_id == shop, e.journey_id == journey_id, e.status == "held"
            )
        )
    ).all()
    kind = engine.TIMER_KINDS[category]
    journey = (await engine.load_journeys(conn, [shop], statuses=("active",)))[(shop, journey_id)]
    for start in range(0, len(rows), 1000):
        chunk = rows[start : start + 1000]
        pending = [
            Timer(
                timer_key(shop, "enr", r.enrollment_id),
                kind,
                shop,
                now,
                {
                    "e": r.enrollment_id,
                    "s": r.step_id,
                    # The wait as it was when held: a cap's deferral retries its send,
                    # and a wait an event can cancel still waits for the pipeline.
                    "m": orjson.loads(r.context).get("held_mode", "wait"),
                    "g": journey.definition(r.version).cancellable,
                },
            )
            for r in chunk
        ]
        await schedule(conn, pending)
        await conn.execute(
            update(enrollments)
            .where(e.shop_id == shop, e.enrollment_id.in_([r.enrollment_id for r in chunk]))
            .values(status="waiting", updated_at=now)
        )

"""Lifecycle routes: customers, tags, segments, the stage policy and the overview."""

import csv
import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, func, select

from libs.common.auth import Principal
from libs.common.problems import Problem
from libs.common.service import ServiceContext
from libs.common.timers import schedule
from services.lifecycle import queries, tagging
from services.lifecycle.derivation import restage_shop_timer
from services.lifecycle.models import customer_notes, customer_tags, customers, segments, tags
from services.lifecycle.policies import load_policies, save_policy
from services.lifecycle.rules import (
    AMOUNT_MAX,
    EXPECTED_PURCHASES_MAX,
    RECENCY_DAYS_MAX,
    dump_rule,
    parse_rule,
    to_sql,
)
from services.lifecycle.schemas import (
    Changed,
    CopyTo,
    Count,
    CustomerOut,
    CustomerPage,
    CustomerPatch,
    FilterIn,
    Members,
    NoteIn,
    Overview,
    RuleIn,
    SegmentIn,
    SegmentOut,
    TagIn,
    TagOut,
    TimelineEntry,
)
from services.lifecycle.stages import STAGES, StagePolicy

CSV_COLUMNS = (
    "customer_id",
    "name",
    "phone",
    "email",
    "stage",
    "member_level",
    "frequency",
    "monetary_minor",
    "currency",
    "aov_minor",
    "item_count",
    "first_order_at",
    "last_order_at",
    "province",
    "city",
    "source",
)

NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
"""Text in a path or query: no control characters (a NUL would cut SQLite's LIKE pattern
short and match everyone, and PostgreSQL cannot bind it)."""
CustomerIdPath = Annotated[str, Path(max_length=200, pattern=NO_CONTROL)]
TagPath = Annotated[str, Path(max_length=64, pattern=NO_CONTROL)]
SegmentPath = Annotated[str, Path(max_length=64, pattern=NO_CONTROL)]
TextQuery = Annotated[str | None, Query(max_length=200, pattern=NO_CONTROL)]
Amount = Annotated[int | None, Query(ge=0, le=AMOUNT_MAX)]
"""A count or an amount in minor units, bounded as in rules (`rules.AMOUNT_MAX`)."""
RecencyDays = Annotated[int | None, Query(ge=0, le=RECENCY_DAYS_MAX)]
Probability = Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False)]
"""A bound on `p_alive` (0 to 1); customers without a prediction match no bound."""
ExpectedPurchases = Annotated[
    float | None, Query(ge=0, le=EXPECTED_PURCHASES_MAX, allow_inf_nan=False)
]
"""A bound on `expected_purchases_90d`, bounded as in rules (`rules.EXPECTED_PURCHASES_MAX`)."""


def build_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter(tags=["lifecycle"])
    Auth = Annotated[Principal, Depends(ctx.auth)]
    ShopParam = Annotated[
        str | None,
        Query(description="required with the admin key", max_length=64, pattern=NO_CONTROL),
    ]
    namespace = ctx.settings.topic_namespace

    def now() -> datetime:
        return datetime.now(UTC)

    @router.get("/v1/customers/{customer_id}", response_model=CustomerOut)
    async def get_customer(
        customer_id: CustomerIdPath, principal: Auth, shop_id: ShopParam = None
    ) -> CustomerOut:
        """One customer with RFM, stage, level, tags and every order, newest first
        (a merged-away id answers with the profile it was merged into)."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            found = await queries.get_customer(conn, shop, customer_id, now())
        if found is None:
            raise Problem(404, f"no customer {customer_id!r} in shop {shop!r}")
        return found

    @router.patch("/v1/customers/{customer_id}", response_model=CustomerOut)
    async def correct_customer(
        customer_id: CustomerIdPath, body: CustomerPatch, principal: Auth, shop_id: ShopParam = None
    ) -> CustomerOut:
        """Correct a profile's source channel."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            await _require_customer(conn, shop, customer_id)
            await conn.execute(
                customers.update()
                .where(customers.c.shop_id == shop, customers.c.customer_id == customer_id)
                .values(source=body.source)
            )
            found = await queries.get_customer(conn, shop, customer_id, now())
        assert found is not None
        return found

    @router.get("/v1/customers/{customer_id}/timeline", response_model=list[TimelineEntry])
    async def customer_timeline(
        customer_id: CustomerIdPath, principal: Auth, shop_id: ShopParam = None
    ) -> list[TimelineEntry]:
        """Orders, stage changes, tags and notes of a customer, newest first."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            await _require_customer(conn, shop, customer_id)
            return await queries.timeline(conn, shop, customer_id)

    @router.post("/v1/customers/{customer_id}/notes", status_code=201, response_model=TimelineEntry)
    async def add_note(
        customer_id: CustomerIdPath, body: NoteIn, principal: Auth, shop_id: ShopParam = None
    ) -> TimelineEntry:
        """Add an operator's note to a customer."""
        shop = principal.shop(shop_id)
        at = now()
        async with ctx.db.begin() as conn:
            await _require_customer(conn, shop, customer_id)
            result = await conn.execute(
                customer_notes.insert()
                .values(shop_id=shop, customer_id=customer_id, at=at, text=body.text)
                .returning(customer_notes.c.id)
            )
            note_id = result.scalar_one()
        return TimelineEntry(at=at, kind="note", detail={"id": note_id, "text": body.text})

    @router.get("/v1/customers", response_model=CustomerPage)
    async def list_customers(
        principal: Auth,
        shop_id: ShopParam = None,
        stage: TextQuery = None,
        tag: TextQuery = None,
        level: TextQuery = None,
        city: TextQuery = None,
        q: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=100,
                pattern=NO_CONTROL,
                description="name, phone or email contains (`%` and `_` are plain characters)",
            ),
        ] = None,
        min_frequency: Amount = None,
        max_frequency: Amount = None,
        min_monetary: Amount = None,
        max_monetary: Amount = None,
        min_recency_days: RecencyDays = None,
        max_recency_days: RecencyDays = None,
        min_p_alive: Probability = None,
        max_p_alive: Probability = None,
        min_expected_purchases_90d: ExpectedPurchases = None,
        max_expected_purchases_90d: ExpectedPurchases = None,
        sort: Annotated[
            str,
            Query(
                description=f"one of {list(queries.SORTS)}; by a prediction, customers "
                "without one come last"
            ),
        ] = "customer_id",
        cursor: Annotated[str | None, Query(max_length=500)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> CustomerPage:
        """Customers of the shop, filtered and sorted; follow `next_cursor`. A prediction
        bound (`min_p_alive`…) leaves out the customers without a prediction."""
        shop = principal.shop(shop_id)
        if stage is not None and stage not in STAGES:
            raise Problem(
                422,
                f"unknown stage {stage!r}",
                errors=[{"field": "stage", "message": f"one of {list(STAGES)}"}],
            )
        if sort not in queries.SORTS:
            raise Problem(
                422,
                f"unknown sort {sort!r}",
                errors=[{"field": "sort", "message": f"one of {list(queries.SORTS)}"}],
            )
        filters = queries.ListFilter(
            stage=stage,
            tag=tag,
            level=level,
            city=city,
            q=q,
            min_frequency=min_frequency,
            max_frequency=max_frequency,
            min_monetary=min_monetary,
            max_monetary=max_monetary,
            min_recency_days=min_recency_days,
            max_recency_days=max_recency_days,
            min_p_alive=min_p_alive,
            max_p_alive=max_p_alive,
            min_expected_purchases_90d=min_expected_purchases_90d,
            max_expected_purchases_90d=max_expected_purchases_90d,
        )
        at = now()
        async with ctx.db.connect() as conn:
            items, next_cursor = await queries.page(
                conn,
                select(customers).where(*filters.where(shop, at)),
                shop,
                sort=sort,
                cursor=cursor,
                limit=limit,
                now=at,
            )
        return CustomerPage(items=items, next_cursor=next_cursor)

    # -- tags ---------------------------------------------------------------------------

    @router.get("/v1/tags", response_model=list[TagOut])
    async def list_tags(principal: Auth, shop_id: ShopParam = None) -> list[TagOut]:
        """Every tag of the shop with its member count."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            counts: dict[str, int] = dict(
                (
                    await conn.execute(
                        select(customer_tags.c.tag, func.count())
                        .where(customer_tags.c.shop_id == shop)
                        .group_by(customer_tags.c.tag)
                    )
                )
                .tuples()
                .all()
            )
            rows = (
                await conn.execute(select(tags).where(tags.c.shop_id == shop).order_by(tags.c.name))
            ).all()
        return [
            TagOut(
                name=r.name,
                kind=r.kind,
                rule=orjson.loads(r.rule) if r.rule else None,
                customers=counts.get(r.name, 0),
            )
            for r in rows
        ]

    @router.post("/v1/tags", status_code=201, response_model=TagOut)
    async def create_tag(body: TagIn, principal: Auth, shop_id: ShopParam = None) -> TagOut:
        """A manual tag, or an automatic one with a `rule` (evaluated for every customer
        in the background, then whenever a customer's facts change)."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            await tagging.create_tag(conn, shop, body.name, body.rule)
        return TagOut(
            name=body.name,
            kind="auto" if body.rule else "manual",
            rule=body.rule,
            customers=0,
        )

    @router.put("/v1/tags/{name}/rule", status_code=204)
    async def change_rule(
        name: TagPath, body: RuleIn, principal: Auth, shop_id: ShopParam = None
    ) -> None:
        """Replace an automatic tag's rule; every customer is re-evaluated."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            await tagging.change_rule(conn, shop, name, body.rule)

    @router.delete("/v1/tags/{name}", status_code=204)
    async def delete_tag(name: TagPath, principal: Auth, shop_id: ShopParam = None) -> None:
        """Delete a tag; its members lose it (each loss is an event)."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            await tagging.delete_tag(conn, shop, name, namespace)
        ctx.outbox.notify()

    @router.post("/v1/tags/{name}/customers", response_model=Changed)
    async def assign(
        name: TagPath, body: Members, principal: Auth, shop_id: ShopParam = None
    ) -> Changed:
        """Give a manual tag to customers."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            changed = await tagging.assign(conn, shop, name, body.customer_ids, namespace)
        ctx.outbox.notify()
        return Changed(changed=changed)

    @router.post("/v1/tags/{name}/customers/remove", response_model=Changed)
    async def unassign(
        name: TagPath, body: Members, principal: Auth, shop_id: ShopParam = None
    ) -> Changed:
        """Take a manual tag away from customers."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            changed = await tagging.unassign(conn, shop, name, body.customer_ids, namespace)
        ctx.outbox.notify()
        return Changed(changed=changed)

    @router.post("/v1/tags/{name}/copy", response_model=Changed)
    async def copy_tag(
        name: TagPath, body: CopyTo, principal: Auth, shop_id: ShopParam = None
    ) -> Changed:
        """Give the manual tag `to` to every customer holding `name`."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            changed = await tagging.copy_members(
                conn, shop, name, body.to, move=False, namespace=namespace
            )
        ctx.outbox.notify()
        return Changed(changed=changed)

    @router.post("/v1/tags/{name}/move", response_model=Changed)
    async def move_tag(
        name: TagPath, body: CopyTo, principal: Auth, shop_id: ShopParam = None
    ) -> Changed:
        """Move every customer from manual tag `name` to manual tag `to`."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            changed = await tagging.copy_members(
                conn, shop, name, body.to, move=True, namespace=namespace
            )
        ctx.outbox.notify()
        return Changed(changed=changed)

    # -- segments -----------------------------------------------------------------------

    async def segment(conn: Any, shop: str, segment_id: str) -> Any:
        row = (
            await conn.execute(
                select(segments).where(
                    segments.c.shop_id == shop, segments.c.segment_id == segment_id
                )
            )
        ).first()
        if row is None:
            raise Problem(404, f"no segment {segment_id!r}")
        return row

    def segment_out(row: Any) -> SegmentOut:
        return SegmentOut(
            segment_id=row.segment_id,
            name=row.name,
            filter=orjson.loads(row.filter),
            created_at=row.created_at,
        )

    async def segment_conditions(conn: Any, shop: str, segment_id: str) -> list[Any]:
        row = await segment(conn, shop, segment_id)
        policy = (await load_policies(conn, [shop]))[shop]
        rule = parse_rule(orjson.loads(row.filter))
        return [
            customers.c.shop_id == shop,
            customers.c.merged_into.is_(None),
            to_sql(rule, now(), policy.level_order),
        ]

    @router.post("/v1/segments", status_code=201, response_model=SegmentOut)
    async def create_segment(
        body: SegmentIn, principal: Auth, shop_id: ShopParam = None
    ) -> SegmentOut:
        """Save a filter over stage, tags, RFM values, level and city."""
        shop = principal.shop(shop_id)
        segment_id = uuid.uuid4().hex[:12]
        async with ctx.db.begin() as conn:
            await conn.execute(
                segments.insert().values(
                    shop_id=shop,
                    segment_id=segment_id,
                    name=body.name,
                    filter=orjson.dumps(dump_rule(body.filter)).decode(),
                    created_at=now(),
                )
            )
            return segment_out(await segment(conn, shop, segment_id))

    @router.get("/v1/segments", response_model=list[SegmentOut])
    async def list_segments(principal: Auth, shop_id: ShopParam = None) -> list[SegmentOut]:
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            rows = await conn.execute(
                select(segments).where(segments.c.shop_id == shop).order_by(segments.c.created_at)
            )
            return [segment_out(r) for r in rows]

    @router.get("/v1/segments/{segment_id}", response_model=SegmentOut)
    async def get_segment(
        segment_id: SegmentPath, principal: Auth, shop_id: ShopParam = None
    ) -> SegmentOut:
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            return segment_out(await segment(conn, shop, segment_id))

    @router.put("/v1/segments/{segment_id}", response_model=SegmentOut)
    async def replace_segment(
        segment_id: SegmentPath, body: SegmentIn, principal: Auth, shop_id: ShopParam = None
    ) -> SegmentOut:
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            await segment(conn, shop, segment_id)
            await conn.execute(
                segments.update()
                .where(segments.c.shop_id == shop, segments.c.segment_id == segment_id)
                .values(name=body.name, filter=orjson.dumps(dump_rule(body.filter)).decode())
            )
            return segment_out(await segment(conn, shop, segment_id))

    @router.delete("/v1/segments/{segment_id}", status_code=204)
    async def delete_segment(
        segment_id: SegmentPath, principal: Auth, shop_id: ShopParam = None
    ) -> None:
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            await segment(conn, shop, segment_id)
            await conn.execute(
                delete(segments).where(
                    segments.c.shop_id == shop, segments.c.segment_id == segment_id
                )
            )

    @router.post("/v1/segments/count", response_model=Count)
    async def count_filter(body: FilterIn, principal: Auth, shop_id: ShopParam = None) -> Count:
        """How many customers a filter holds right now, without saving it (a rule
        builder's live count)."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            policy = (await load_policies(conn, [shop]))[shop]
            rule = parse_rule(dump_rule(body.filter))
            conditions = [
                customers.c.shop_id == shop,
                customers.c.merged_into.is_(None),
                to_sql(rule, now(), policy.level_order),
            ]
            return Count(count=await queries.count(conn, conditions))

    @router.get("/v1/segments/{segment_id}/count", response_model=Count)
    async def segment_count(
        segment_id: SegmentPath, principal: Auth, shop_id: ShopParam = None
    ) -> Count:
        """How many customers the segment holds right now."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            return Count(
                count=await queries.count(conn, await segment_conditions(conn, shop, segment_id))
            )

    @router.get("/v1/segments/{segment_id}/customers", response_model=CustomerPage)
    async def segment_customers(
        segment_id: SegmentPath,
        principal: Auth,
        shop_id: ShopParam = None,
        cursor: Annotated[str | None, Query(max_length=500)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> CustomerPage:
        """The segment's customers by id; follow `next_cursor`."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            conditions = await segment_conditions(conn, shop, segment_id)
            items, next_cursor = await queries.page(
                conn,
                select(customers).where(*conditions),
                shop,
                sort="customer_id",
                cursor=cursor,
                limit=limit,
                now=now(),
            )
        return CustomerPage(items=items, next_cursor=next_cursor)

    @router.get("/v1/segments/{segment_id}/export.csv", response_class=StreamingResponse)
    async def export_segment(
        segment_id: SegmentPath, principal: Auth, shop_id: ShopParam = None
    ) -> StreamingResponse:
        """The segment as CSV, streamed: rows are read and sent a thousand at a time."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            conditions = await segment_conditions(conn, shop, segment_id)

        async def lines() -> AsyncIterator[bytes]:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(CSV_COLUMNS)
            async with ctx.db.connect() as conn:
                async for row in queries.stream_rows(conn, conditions):
                    writer.writerow([_csv_value(getattr(row, col)) for col in CSV_COLUMNS])
                    if buffer.tell() > 64 * 1024:
                        yield buffer.getvalue().encode()
                        buffer.seek(0)
                        buffer.truncate()
            yield buffer.getvalue().encode()

        return StreamingResponse(
            lines(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{segment_id}.csv"'},
        )

    # -- policy and overview ------------------------------------------------------------

    @router.get("/v1/policy", response_model=StagePolicy)
    async def get_policy(principal: Auth, shop_id: ShopParam = None) -> StagePolicy:
        """The shop's stage thresholds and member levels (defaults until changed)."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            return (await load_policies(conn, [shop]))[shop]

    @router.put("/v1/policy", response_model=StagePolicy)
    async def put_policy(
        body: StagePolicy, principal: Auth, shop_id: ShopParam = None
    ) -> StagePolicy:
        """Replace the policy; every customer of the shop is re-staged in the background."""
        shop = principal.shop(shop_id)
        async with ctx.db.begin() as conn:
            await save_policy(conn, shop, body)
            await schedule(conn, [restage_shop_timer(shop)])
        return body

    @router.get("/v1/overview", response_model=Overview)
    async def overview(
        principal: Auth,
        shop_id: ShopParam = None,
        period_days: Annotated[int, Query(ge=1, le=3650)] = 30,
    ) -> Overview:
        """The seller's headline figures now, and as they stood `period_days` ago."""
        shop = principal.shop(shop_id)
        at = now()
        async with ctx.db.connect() as conn:
            current = await queries.figures_now(conn, shop, at)
            policy = (await load_policies(conn, [shop]))[shop]
            previous = await queries.figures_as_of(
                conn, shop, at - timedelta(days=period_days), policy
            )
            cycle = await queries.repurchase_cycle(conn, shop)
        return Overview(
            shop_id=shop, previous=previous, repurchase_cycle_days=cycle, **current.model_dump()
        )

    async def _require_customer(conn: Any, shop: str, customer_id: str) -> None:
        found = (
            await conn.execute(
                select(customers.c.customer_id).where(
                    customers.c.shop_id == shop,
                    customers.c.customer_id == customer_id,
                    customers.c.merged_into.is_(None),
                )
            )
        ).first()
        if found is None:
            raise Problem(404, f"no customer {customer_id!r} in shop {shop!r}")

    return router


def _csv_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return "" if value is None else value

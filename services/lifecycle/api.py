"""Lifecycle routes: customers and the seller's overview."""

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from libs.common.auth import Principal
from libs.common.problems import Problem
from libs.common.service import ServiceContext
from services.lifecycle import queries
from services.lifecycle.schemas import CustomerOut, CustomerPage, Overview
from services.lifecycle.stages import STAGES


def build_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter(tags=["lifecycle"])
    Auth = Annotated[Principal, Depends(ctx.auth)]
    ShopParam = Annotated[str | None, Query(description="required with the admin key")]

    @router.get("/v1/customers/{customer_id}", response_model=CustomerOut)
    async def get_customer(
        customer_id: str, principal: Auth, shop_id: ShopParam = None
    ) -> CustomerOut:
        """One customer with RFM, stage, level, tags and every order, newest first."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            found = await queries.get_customer(conn, shop, customer_id, datetime.now(UTC))
        if found is None:
            raise Problem(404, f"no customer {customer_id!r} in shop {shop!r}")
        return found

    @router.get("/v1/customers", response_model=CustomerPage)
    async def list_customers(
        principal: Auth,
        shop_id: ShopParam = None,
        stage: Annotated[str | None, Query()] = None,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> CustomerPage:
        """Customers of the shop by id, filtered by stage; follow `next_cursor`."""
        shop = principal.shop(shop_id)
        if stage is not None and stage not in STAGES:
            raise Problem(
                422,
                f"unknown stage {stage!r}",
                errors=[{"field": "stage", "message": f"one of {list(STAGES)}"}],
            )
        async with ctx.db.connect() as conn:
            items, next_cursor = await queries.list_customers(
                conn, shop, stage=stage, after=cursor, limit=limit, now=datetime.now(UTC)
            )
        return CustomerPage(items=items, next_cursor=next_cursor)

    @router.get("/v1/overview", response_model=Overview)
    async def overview(principal: Auth, shop_id: ShopParam = None) -> Overview:
        """The seller's headline figures as of now."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            return await queries.overview(conn, shop, datetime.now(UTC))

    return router

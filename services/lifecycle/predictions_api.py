"""Repurchase model routes: read a shop's fitted model, ask for a refit, forecast returning
customers' purchases in a window."""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import select

from libs.common.auth import Principal
from libs.common.openapi import problem_doc
from libs.common.problems import Problem
from libs.common.service import ServiceContext
from libs.common.timers import schedule
from services.lifecycle.forecasting import NoModel, returning_purchases
from services.lifecycle.models import repurchase_models
from services.lifecycle.repurchase import fit_timer

NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
EARLIEST_AS_OF = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_WINDOW_END = datetime(2100, 1, 1, tzinfo=UTC)
MAX_WINDOW = timedelta(days=366)


class BgNbd(BaseModel):
    r: float
    alpha: float = Field(description="per day")
    a: float
    b: float


class Spend(BaseModel):
    """Gamma-Gamma on repeat buyers' mean spend per purchase day (minor units), or why
    not (`refused`)."""

    model: str = "gamma_gamma"
    params: dict[str, float] | None = None
    customers: int | None = None
    log_likelihood: float | None = None
    refused: str | None = None


class RepurchaseModel(BaseModel):
    model: str = "bg_nbd"
    time_unit: str = "day"
    params: BgNbd
    std_errors: BgNbd = Field(description="asymptotic standard errors of the parameters")
    customers: int
    repeat_buyers: int
    log_likelihood: float
    calibration_end: datetime
    fitted_at: datetime
    spend: Spend | None


class FitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    as_of: AwareDatetime | None = Field(
        default=None,
        description="calibration end: purchases after it are left out (default: now); "
        "from 2000-01-01 to now",
    )


class WindowTotal(BaseModel):
    customers: int
    expected: float
    low: float = Field(description="95 % interval")
    high: float
    interval: str = Field(description="normal, negative binomial or poisson")


class Forecast(WindowTotal):
    made_at: datetime
    model_fitted_at: datetime
    parameter_uncertainty: bool
    by_stage: dict[str, WindowTotal]
    by_member_level: dict[str, WindowTotal] = Field(description="`none`: no level")


class Actual(BaseModel):
    purchase_days: int
    through: datetime
    complete: bool


class ReturningForecast(BaseModel):
    from_: datetime = Field(alias="from")
    to: datetime
    unit: str = Field(
        description="purchase_day: one customer's orders on one calendar day count once"
    )
    forecast: Forecast | None
    forecast_reason: str | None
    actual: Actual | None

    model_config = ConfigDict(populate_by_name=True)


class FitScheduled(BaseModel):
    status: str = "scheduled"
    as_of: datetime | None


def _model_body(row: Any) -> RepurchaseModel:
    params = orjson.loads(row.params)
    se = params["std_errors"]
    return RepurchaseModel(
        params=BgNbd(r=params["r"], alpha=params["alpha"], a=params["a"], b=params["b"]),
        std_errors=BgNbd(r=se[0], alpha=se[1], a=se[2], b=se[3]),
        customers=row.customers,
        repeat_buyers=row.repeat_buyers,
        log_likelihood=row.log_likelihood,
        calibration_end=row.calibration_end,
        fitted_at=row.fitted_at,
        spend=Spend.model_validate(orjson.loads(row.spend)) if row.spend else None,
    )


def build_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter(tags=["predictions"])
    Auth = Annotated[Principal, Depends(ctx.auth)]
    ShopParam = Annotated[
        str | None,
        Query(description="required with the admin key", max_length=64, pattern=NO_CONTROL),
    ]

    @router.get(
        "/v1/models/repurchase",
        response_model=RepurchaseModel,
        responses={
            404: problem_doc(404, "no model fitted for the shop yet"),
            409: problem_doc(409, "the shop's data cannot support a fit (the reason)"),
        },
    )
    async def get_model(principal: Auth, shop_id: ShopParam = None) -> RepurchaseModel:
        """The shop's BG/NBD repurchase model (time unit a day), as last fitted; 409 with
        the reason when its data could not support one, 404 before the first fit."""
        shop = principal.shop(shop_id)
        async with ctx.db.connect() as conn:
            row = (
                await conn.execute(
                    select(repurchase_models).where(repurchase_models.c.shop_id == shop)
                )
            ).first()
        if row is None:
            raise Problem(
                404,
                f"no repurchase model for shop {shop!r} yet: one is fitted shortly after the "
                "shop's first purchase and daily, or now with POST /v1/models/repurchase/fit",
            )
        if row.status != "fitted":
            raise Problem(
                409,
                f"the shop's data cannot support a repurchase model: {row.reason}",
                title="No model",
                reason=row.reason,
                customers=row.customers,
                repeat_buyers=row.repeat_buyers,
                calibration_end=row.calibration_end.isoformat(),
                attempted_at=row.fitted_at.isoformat(),
            )
        return _model_body(row)

    @router.get(
        "/v1/forecasts/returning-orders",
        response_model=ReturningForecast,
        response_model_by_alias=True,
        responses={
            404: problem_doc(404, "no model fitted for the shop yet"),
            409: problem_doc(409, "the shop's data cannot support a model (the reason)"),
        },
    )
    async def forecast(
        principal: Auth,
        start: Annotated[AwareDatetime, Query(alias="from", description="window start")],
        end: Annotated[AwareDatetime, Query(alias="to", description="window end (excluded)")],
        shop_id: ShopParam = None,
    ) -> ReturningForecast:
        """Purchases (purchase days) by the shop's existing customers in [from, to): before
        the window begins, the model's forecast with a 95 % interval, overall and per stage
        and member level (kept, the latest per window); once it has begun, that kept
        forecast beside the actual count so far (`actual.complete` once it has ended)."""
        shop = principal.shop(shop_id)
        now = datetime.now(UTC)
        if not EARLIEST_AS_OF <= start < end <= LATEST_WINDOW_END:
            raise Problem(422, "from must come before to, both between 2000-01-01 and 2100-01-01")
        if end - start > MAX_WINDOW:
            raise Problem(422, f"a window spans at most {MAX_WINDOW.days} days")
        try:
            async with ctx.db.begin() as conn:
                found = await returning_purchases(
                    conn, shop, start.astimezone(UTC), end.astimezone(UTC), now
                )
        except NoModel as missing:
            if missing.refused is None:
                raise Problem(
                    404, f"no repurchase model for shop {shop!r} yet: nothing to forecast with"
                ) from None
            raise Problem(
                409,
                f"the shop's data cannot support a repurchase model: {missing.refused.reason}",
                title="No model",
                reason=missing.refused.reason,
            ) from None
        return ReturningForecast.model_validate(found)

    @router.post("/v1/models/repurchase/fit", status_code=202, response_model=FitScheduled)
    async def fit(
        principal: Auth,
        shop_id: ShopParam = None,
        body: Annotated[FitIn | None, Body()] = None,
    ) -> FitScheduled:
        """Refit the shop's model in the background (on the durable timers), with the
        calibration ending at `as_of` (default: when the fit runs); every customer's
        figures follow. Read the outcome at `GET /v1/models/repurchase`."""
        shop = principal.shop(shop_id)
        now = datetime.now(UTC)
        as_of = body.as_of if body else None
        if as_of is not None and not EARLIEST_AS_OF <= as_of <= now + timedelta(minutes=1):
            raise Problem(422, "as_of must lie between 2000-01-01 and now")
        async with ctx.db.begin() as conn:
            await schedule(conn, [fit_timer(shop, now, as_of.astimezone(UTC) if as_of else None)])
        return FitScheduled(as_of=as_of)

    return router

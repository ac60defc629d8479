"""Repurchase predictions in the product: each shop's BG/NBD fit on the durable timers, and
every customer's figures under it.

Purchases. An order is a purchase once paid (`orders.is_purchase`) unless it was refunded in
full; cancelled-before-payment and refunds-only orders are not. Purchases count by calendar
day in the shop's time zone (several orders on one day are one purchase day, as Fader,
Hardie & Lee do with CDNOW), dated by when they were placed (`orders.purchased_at`).

Fitting. A fit runs on a `lifecycle.repurchase_fit` timer (one per shop, its own timer
lane so a long fit never delays a restage): the first one `FIRST_FIT_AFTER` a shop's first
purchase arrives, then every `REFIT_EVERY`, and at once on `POST /v1/models/repurchase/fit`.
It reads the shop's orders, summarises them at the calibration end (`as_of`, default now),
fits BG/NBD (and Gamma-Gamma for spend where the shop has enough repeat buyers) in a worker
thread, and stores the outcome in `repurchase_models` — the parameters, or the reason the
data cannot support them (`model.FitRefused`; the customers' figures are then cleared: the
product shows no figure it cannot stand behind). Every customer is then re-derived
(`restage_shop_timer`, a chunk per firing), which writes the figures under the new
parameters and re-stages and re-tags on them.

Figures. Each re-derivation (every batch that touches a customer, so every purchase) sets
the customer's purchase-day summary and, when the shop has a fitted model, `p_alive`,
`expected_purchases_90d` and `next_purchase_at` from the current parameters, in the same
batch transaction. `next_purchase_at` is the median time to the next purchase *if the
customer is still a customer* (`model.days_to_next_purchase`): read it beside `p_alive`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import orjson
from sqlalchemy import Select, and_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import upsert
from libs.common.db.tables import shops
from libs.common.timers import Timer, schedule, timer_key
from services.lifecycle.models import customers, orders, repurchase_models
from services.lifecycle.orders import is_purchase, purchased_at
from services.lifecycle.prediction.forecast import parameter_covariance
from services.lifecycle.prediction.model import (
    BgNbdParams,
    FitRefused,
    GammaGammaParams,
    Summary,
    days_to_next_purchase,
    expected_purchases,
    fit_bgnbd,
    fit_gamma_gamma,
    p_alive,
    summarise,
)

log = logging.getLogger(__name__)

FIT_TIMER = "lifecycle.repurchase_fit"
REFIT_EVERY = dt.timedelta(hours=24)
FIRST_FIT_AFTER = dt.timedelta(minutes=10)
HORIZON_DAYS = 90
NEXT_PURCHASE_MAX_DAYS = 36_500
"""A likely next purchase farther than a century is no date at all (null)."""
_EPOCH = dt.date(1970, 1, 1).toordinal()
_UTC = ZoneInfo("UTC")


def fit_timer(shop_id: str, due: dt.datetime, as_of: dt.datetime | None = None) -> Timer:
    """The shop's one pending fit (a request replaces the scheduled one and runs now)."""
    payload = {"as_of": as_of.isoformat() if as_of else None}
    return Timer(timer_key(shop_id, "repurchase-fit"), FIT_TIMER, shop_id, due, payload)


# --------------------------------------------------------------------------- purchases


def is_model_purchase(row: Any) -> bool:
    """A purchase for the model: paid, and not refunded in full."""
    if not is_purchase(row):
        return False
    total = row.total_minor
    return not (total is not None and total > 0 and row.refunded_minor >= total)


def day_number(at: dt.datetime, zone: ZoneInfo) -> int:
    """The calendar day of `at` in `zone`, counted from 1970-01-01."""
    return at.astimezone(zone).date().toordinal() - _EPOCH


def _date_of(day: int) -> dt.date:
    return dt.date.fromordinal(day + _EPOCH)


@dataclass(frozen=True)
class PurchaseDays:
    """A customer's purchases as the model sees them."""

    count: int
    first: int | None
    last: int | None

    @classmethod
    def of(cls, order_rows: Iterable[Any], zone: ZoneInfo) -> PurchaseDays:
        days = {day_number(purchased_at(r), zone) for r in order_rows if is_model_purchase(r)}
        if not days:
            return cls(0, None, None)
        return cls(len(days), min(days), max(days))


@dataclass(frozen=True)
class Figures:
    p_alive: float
    expected_purchases_90d: float
    next_purchase_at: dt.datetime | None


def figures(
    params: BgNbdParams, summaries: Sequence[PurchaseDays], today: int, now: dt.datetime
) -> list[Figures | None]:
    """Each customer's figures at `now` (day `today`), vectorised; None without purchases."""
    buyers = [i for i, s in enumerate(summaries) if s.count]
    found: list[Figures | None] = [None] * len(summaries)
    if not buyers:
        return found
    count = np.array([summaries[i].count for i in buyers], dtype=np.float64)
    first = np.array([summaries[i].first for i in buyers], dtype=np.float64)
    last = np.array([summaries[i].last for i in buyers], dtype=np.float64)
    x = count - 1.0
    t_x = last - first
    # A purchase dated after today (a platform clock ahead of ours) ages nothing backwards.
    age = np.maximum(float(today) - first, t_x)
    alive = p_alive(params, x, t_x, age)
    expected = expected_purchases(params, float(HORIZON_DAYS), x, t_x, age)
    wait = days_to_next_purchase(params, x, age)
    for n, i in enumerate(buyers):
        days = float(wait[n])
        if not (math.isfinite(alive[n]) and math.isfinite(expected[n])):
            continue  # never stored: NaN sorts above every number in PostgreSQL
        found[i] = Figures(
            float(alive[n]),
            float(expected[n]),
            now + dt.timedelta(days=days)
            if math.isfinite(days) and days <= NEXT_PURCHASE_MAX_DAYS
            else None,
        )
    return found


# --------------------------------------------------------------------------- the shops' state


async def shop_zones(conn: AsyncConnection, shop_ids: Iterable[str]) -> dict[str, ZoneInfo]:
    """Each shop's time zone (UTC for a shop lifecycle has not heard of, or a bad name)."""
    wanted = set(shop_ids)
    zones = dict.fromkeys(wanted, _UTC)
    for row in await conn.execute(
        select(shops.c.shop_id, shops.c.timezone).where(shops.c.shop_id.in_(wanted))
    ):
        zones[row.shop_id] = _zone(row.timezone)
    return zones


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError):
        return _UTC


def params_from(text: str) -> BgNbdParams:
    data = orjson.loads(text)
    return BgNbdParams(
        r=data["r"],
        alpha=data["alpha"],
        a=data["a"],
        b=data["b"],
        log_likelihood=data["log_likelihood"],
        customers=data["customers"],
        repeat_buyers=data["repeat_buyers"],
        std_errors=tuple(data["std_errors"]),
    )


def log_covariance_of(text: str) -> list[list[float]] | None:
    """The stored covariance of the log-parameters, if the fit kept one."""
    found: list[list[float]] | None = orjson.loads(text).get("log_covariance")
    return found


async def fitted_models(conn: AsyncConnection, shop_ids: Iterable[str]) -> dict[str, BgNbdParams]:
    """The current parameters of the shops that have a fitted model."""
    m = repurchase_models.c
    rows = await conn.execute(
        select(m.shop_id, m.params).where(m.shop_id.in_(set(shop_ids)), m.status == "fitted")
    )
    return {row.shop_id: params_from(row.params) for row in rows}


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class FitOutcome:
    """What a fit produced: parameters or the reason there are none."""

    bgnbd: BgNbdParams | None
    reason: str | None
    log_covariance: list[list[float]] | None
    spend: GammaGammaParams | None
    spend_reason: str | None
    customers: int
    repeat_buyers: int


def fit_summary(summary: Summary) -> FitOutcome:
    """Fit both models on a calibration summary (CPU-bound: run it in a thread)."""
    n = int(summary.x.shape[0])
    repeaters = int(np.count_nonzero(summary.x))
    try:
        bgnbd = fit_bgnbd(summary.x, summary.t_x, summary.T)
    except FitRefused as refused:
        return FitOutcome(None, refused.reason, None, None, None, n, repeaters)
    # Kept for forecasts: their intervals include the parameters' own uncertainty.
    covariance = parameter_covariance(bgnbd, summary.x, summary.t_x, summary.T).tolist()
    try:
        spend, spend_reason = fit_gamma_gamma(summary.x, summary.monetary), None
    except FitRefused as refused:
        spend, spend_reason = None, refused.reason
    return FitOutcome(bgnbd, None, covariance, spend, spend_reason, n, repeaters)


def shop_orders(shop_id: str) -> Select[Any]:
    """The shop's orders of live (unmerged) customers, with the columns that make one a
    purchase (`is_model_purchase`) and date it (`purchased_at`); callers add conditions."""
    o, c = orders.c, customers.c
    return (
        select(
            o.customer_id,
            o.created_at,
            o.paid_at,
            o.shipped_at,
            o.completed_at,
            o.refunded_at,
            o.total_minor,
            o.refunded_minor,
        )
        .join(
            customers,
            and_(
                c.shop_id == o.shop_id,
                c.customer_id == o.customer_id,
                c.merged_into.is_(None),
            ),
        )
        .where(o.shop_id == shop_id)
    )


async def _purchases(
    conn: AsyncConnection, shop_id: str, zone: ZoneInfo
) -> tuple[list[str], list[int], list[int]]:
    """The shop's purchases: customer, day and net amount (minor units), one per order."""
    ids: list[str] = []
    days: list[int] = []
    amounts: list[int] = []
    result = await conn.stream(shop_orders(shop_id))
    async for row in result:
        if is_model_purchase(row):
            ids.append(row.customer_id)
            days.append(day_number(purchased_at(row), zone))
            amounts.append(max(0, (row.total_minor or 0) - row.refunded_minor))
    return ids, days, amounts


def _summarise(ids: list[str], days: list[int], amounts: list[int], end: int) -> Summary:
    return summarise(
        np.array(ids, dtype=object),
        np.array(days, dtype=np.int64).astype("datetime64[D]"),
        np.array(amounts, dtype=np.float64),
        _date_of(end),
    )


def _fit(ids: list[str], days: list[int], amounts: list[int], end: int) -> FitOutcome:
    if not ids:
        return FitOutcome(None, "no purchases to fit", None, None, None, 0, 0)
    return fit_summary(_summarise(ids, days, amounts, end))


async def fit_shop(
    conn: AsyncConnection, shop_id: str, as_of: dt.datetime, now: dt.datetime
) -> FitOutcome:
    """Fit the shop's model on its purchases up to `as_of` and store the outcome."""
    zone = (await shop_zones(conn, [shop_id]))[shop_id]
    ids, days, amounts = await _purchases(conn, shop_id, zone)
    end = day_number(as_of, zone)
    outcome = await asyncio.to_thread(_fit, ids, days, amounts, end)
    await _store(conn, shop_id, outcome, as_of, now)
    log.info(
        "repurchase model fitted" if outcome.bgnbd else "repurchase model refused",
        extra={
            "shop_id": shop_id,
            "purchases": len(ids),
            "customers": outcome.customers,
            "reason": outcome.reason,
        },
    )
    return outcome


def _params_json(p: BgNbdParams, log_covariance: list[list[float]] | None) -> str:
    return orjson.dumps(
        {
            "r": p.r,
            "alpha": p.alpha,
            "a": p.a,
            "b": p.b,
            "log_likelihood": p.log_likelihood,
            "customers": p.customers,
            "repeat_buyers": p.repeat_buyers,
            "std_errors": list(p.std_errors),
            "log_covariance": log_covariance,
        }
    ).decode()


def _spend_json(outcome: FitOutcome) -> str | None:
    if outcome.spend is not None:
        s = outcome.spend
        return orjson.dumps(
            {
                "model": "gamma_gamma",
                "params": {"p": s.p, "q": s.q, "gamma": s.gamma},
                "customers": s.customers,
                "log_likelihood": s.log_likelihood,
            }
        ).decode()
    if outcome.spend_reason is not None:
        return orjson.dumps({"model": "gamma_gamma", "refused": outcome.spend_reason}).decode()
    return None


async def _store(
    conn: AsyncConnection, shop_id: str, outcome: FitOutcome, as_of: dt.datetime, now: dt.datetime
) -> None:
    fitted = outcome.bgnbd
    await conn.execute(
        upsert(
            conn,
            repurchase_models,
            ["shop_id"],
            [
                "status",
                "reason",
                "params",
                "spend",
                "customers",
                "repeat_buyers",
                "log_likelihood",
                "calibration_end",
                "fitted_at",
            ],
        ),
        {
            "shop_id": shop_id,
            "status": "fitted" if fitted else "refused",
            "reason": outcome.reason,
            "params": _params_json(fitted, outcome.log_covariance) if fitted else None,
            "spend": _spend_json(outcome),
            "customers": outcome.customers,
            "repeat_buyers": outcome.repeat_buyers,
            "log_likelihood": fitted.log_likelihood if fitted else None,
            "calibration_end": as_of,
            "fitted_at": now,
        },
    )
    if fitted is None:
        await conn.execute(
            update(customers)
            .where(customers.c.shop_id == shop_id, customers.c.p_alive.is_not(None))
            .values(p_alive=None, expected_purchases_90d=None, next_purchase_at=None)
        )


async def on_fit_timers(
    conn: AsyncConnection,
    fired: list[Timer],
    *,
    restage: Callable[[str, dt.datetime], Timer],
    now: dt.datetime | None = None,
) -> None:
    """Fit each shop whose fit came due, schedule the re-derivation of its customers
    (`restage`: the shop's restage job) and its next fit."""
    now = now or dt.datetime.now(dt.UTC)
    for job in fired:
        raw = job.payload.get("as_of")
        as_of = dt.datetime.fromisoformat(raw) if isinstance(raw, str) else now
        await fit_shop(conn, job.shop_id, as_of, now)
        await schedule(conn, [restage(job.shop_id, now), fit_timer(job.shop_id, now + REFIT_EVERY)])


def first_fits(shop_ids: Iterable[str], now: dt.datetime) -> list[Timer]:
    """A first fit for shops that have purchases (scheduled without replacing one pending)."""
    return [fit_timer(shop, now + FIRST_FIT_AFTER) for shop in sorted(set(shop_ids))]

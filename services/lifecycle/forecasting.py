"""Returning-customer purchases in a window (a promotion's), forecast from the shop's
repurchase model, and afterwards counted beside the forecast.

What is counted: purchase days (several orders of one customer on one calendar day in the
shop's zone are one, as the model counts them) by customers who had bought before the
window began — the shop's existing customers; a first purchase inside the window is a new
customer's, not a returning one's.

The forecast is the model's expected total with a 95 % interval that includes the
parameters' own uncertainty (`prediction.forecast`), overall and per stage and member level
(as they stand when the forecast is made). A forecast asked for before the window begins is
kept (the latest such one per shop and window); once the window has begun the endpoint
answers with that kept forecast beside the actual count so far, and `complete` once the
window has ended. A window asked about only after it began has no forecast to show
(`forecast` null with the reason): a forecast made with hindsight would prove nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import upsert
from libs.common.db.types import UtcDateTime
from services.lifecycle.models import customers, orders, repurchase_models, returning_forecasts
from services.lifecycle.orders import purchased_at
from services.lifecycle.prediction.forecast import WindowTotal, forecast_window
from services.lifecycle.repurchase import (
    day_number,
    is_model_purchase,
    log_covariance_of,
    params_from,
    shop_orders,
    shop_zones,
)

_DAY = dt.timedelta(days=1)
_WINDOW_KEY = ("shop_id", "window_from", "window_to")


class NoModel(Exception):
    """The shop has no fitted model: `refused` holds the stored refusal, if any."""

    def __init__(self, refused: Any | None) -> None:
        super().__init__("no model")
        self.refused = refused


@dataclass(frozen=True)
class _Customers:
    x: np.ndarray[Any, np.dtype[np.float64]]
    t_x: np.ndarray[Any, np.dtype[np.float64]]
    T: np.ndarray[Any, np.dtype[np.float64]]
    stages: list[str]
    levels: list[str]


def _total(t: WindowTotal) -> dict[str, Any]:
    return {
        "customers": t.customers,
        "expected": t.expected,
        "low": t.low,
        "high": t.high,
        "interval": t.method,
    }


async def _existing(conn: AsyncConnection, shop_id: str, today: int) -> _Customers:
    c = customers.c
    rows = (
        await conn.execute(
            select(
                c.purchase_days, c.first_purchase_day, c.last_purchase_day, c.stage, c.member_level
            ).where(c.shop_id == shop_id, c.merged_into.is_(None), c.purchase_days > 0)
        )
    ).all()
    count = np.array([r.purchase_days for r in rows], dtype=np.float64)
    first = np.array([r.first_purchase_day for r in rows], dtype=np.float64)
    last = np.array([r.last_purchase_day for r in rows], dtype=np.float64)
    t_x = last - first
    return _Customers(
        x=count - 1.0,
        t_x=t_x,
        T=np.maximum(float(today) - first, t_x),
        stages=[r.stage for r in rows],
        levels=[r.member_level or "none" for r in rows],
    )


def _breakdown(
    model: Any, people: _Customers, window: tuple[float, float], cov: Any, labels: list[str]
) -> dict[str, Any]:
    names = sorted(set(labels))
    codes = np.array([names.index(v) for v in labels], dtype=np.int64)
    made = forecast_window(
        model, people.x, people.t_x, people.T, window, groups=codes, log_covariance=cov
    )
    return {names[code]: _total(total) for code, total in made.groups}


def _forecast(
    model: Any, people: _Customers, window: tuple[float, float], cov: Any
) -> dict[str, Any]:
    total = forecast_window(model, people.x, people.t_x, people.T, window, log_covariance=cov)
    return {
        **_total(total.total),
        "parameter_uncertainty": total.parameter_uncertainty,
        "by_stage": _breakdown(model, people, window, cov, people.stages) if people.stages else {},
        "by_member_level": (
            _breakdown(model, people, window, cov, people.levels) if people.levels else {}
        ),
    }


async def _actual(
    conn: AsyncConnection, shop_id: str, start: dt.datetime, through: dt.datetime, zone: Any
) -> int:
    """Purchase days in [start, through) by customers who had bought before `start`."""
    o, c = orders.c, customers.c
    # Typed, so that the bounds bind as the column's own format (SQLite compares text).
    placed = func.coalesce(o.created_at, o.paid_at, type_=UtcDateTime())
    first_day = day_number(start, zone)
    rows = await conn.execute(
        shop_orders(shop_id).where(
            placed >= start - _DAY,
            placed < through + _DAY,
            c.first_purchase_day < first_day,
        )
    )
    days = {
        (r.customer_id, day_number(purchased_at(r), zone))
        for r in rows
        if is_model_purchase(r) and start <= purchased_at(r) < through
    }
    return len(days)


async def returning_purchases(
    conn: AsyncConnection, shop_id: str, start: dt.datetime, end: dt.datetime, now: dt.datetime
) -> dict[str, Any]:
    """The forecast (and, once the window has begun, the actual count) for the window."""
    m = repurchase_models.c
    model_row = (await conn.execute(select(repurchase_models).where(m.shop_id == shop_id))).first()
    zone = (await shop_zones(conn, [shop_id]))[shop_id]
    f = returning_forecasts.c
    key = and_(f.shop_id == shop_id, f.window_from == start, f.window_to == end)
    body: dict[str, Any] = {"from": start, "to": end, "unit": "purchase_day"}
    if start > now:
        if model_row is None or model_row.status != "fitted":
            raise NoModel(model_row)
        people = await _existing(conn, shop_id, day_number(now, zone))
        window = ((start - now) / _DAY, (end - now) / _DAY)
        made = await asyncio.to_thread(
            _forecast,
            params_from(model_row.params),
            people,
            window,
            log_covariance_of(model_row.params),
        )
        made = {"made_at": now, "model_fitted_at": model_row.fitted_at, **made}
        await conn.execute(
            upsert(conn, returning_forecasts, list(_WINDOW_KEY), ["forecast"]),
            {
                "shop_id": shop_id,
                "window_from": start,
                "window_to": end,
                "forecast": orjson.dumps(made).decode(),
            },
        )
        return {**body, "forecast": made, "forecast_reason": None, "actual": None}
    kept = (await conn.execute(select(f.forecast).where(key))).scalar()
    through = min(end, now)
    return {
        **body,
        "forecast": orjson.loads(kept) if kept else None,
        "forecast_reason": None if kept else "no forecast was made for this window before it began",
        "actual": {
            "purchase_days": await _actual(conn, shop_id, start, through, zone),
            "through": through,
            "complete": now >= end,
        },
    }

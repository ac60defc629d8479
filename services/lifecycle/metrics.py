"""Lifecycle's Prometheus metrics: customers by stage and the stage transitions.

Labels are stage names only (a fixed set, `stages.STAGES` plus `none` for a customer's
first stage): never a shop, customer or order id."""

from __future__ import annotations

from collections import Counter as Tally
from datetime import datetime

from prometheus_client import Counter, Gauge
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.lifecycle.models import customers
from services.lifecycle.stages import STAGES

CUSTOMERS = Gauge(
    "huitou_lifecycle_customers",
    "Customers by stage, over every shop (counted every 60 s by whichever lifecycle "
    "process runs the count: take the max across processes)",
    ["stage"],
)
TRANSITIONS = Counter(
    "huitou_lifecycle_stage_transitions_total",
    "Customers moved from one stage to another (`none`: their first stage)",
    ["previous", "current"],
)


def count_transitions(history: list[dict[str, object]]) -> None:
    """Count a batch's stage-history rows, once per label pair."""
    pairs = Tally((str(h["previous"] or "none"), str(h["current"])) for h in history)
    for (previous, current), n in pairs.items():
        TRANSITIONS.labels(previous, current).inc(n)


async def count_stages(conn: AsyncConnection, _now: datetime) -> None:
    """Set `huitou_lifecycle_customers` (a recurring job)."""
    c = customers.c
    rows = await conn.execute(
        select(c.stage, func.count()).where(c.merged_into.is_(None)).group_by(c.stage)
    )
    found = {str(stage): int(n) for stage, n in rows}
    for stage in STAGES:
        CUSTOMERS.labels(stage).set(found.get(stage, 0))

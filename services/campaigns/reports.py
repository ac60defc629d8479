"""A journey's report: who entered, who waits where, who left and why, what was sent, what
it earned, and the lift against the holdout.

Counts come from `journey_counters` (added to in the transaction of each batch or fire, so
they agree with what happened exactly once) and the waiting enrollments; lift compares the
conversion rates (an order paid within the attribution window after entering) of treated
and held-out enrollments with a 95 % Newcombe interval for their difference
(statsmodels' `confint_proportions_2indep`), and is `null` with a reason while either group
has fewer than `MIN_GROUP` enrollments.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.campaigns.models import counters, enrollments

MIN_GROUP = 30
"""Enrollments each group needs before a lift interval means anything."""


def lift(
    treated: int, treated_converted: int, held_out: int, held_out_converted: int
) -> tuple[dict[str, Any] | None, str | None]:
    """(lift, None) or (None, why not)."""
    if held_out < MIN_GROUP or treated < MIN_GROUP:
        return None, (
            f"too few enrollments to compare: {treated} treated and {held_out} held out "
            f"(each group needs {MIN_GROUP})"
        )
    from statsmodels.stats.proportion import confint_proportions_2indep

    low, high = confint_proportions_2indep(
        treated_converted,
        treated,
        held_out_converted,
        held_out,
        method="newcomb",
        compare="diff",
        alpha=0.05,
    )
    treated_rate = treated_converted / treated
    holdout_rate = held_out_converted / held_out
    return {
        "treated_rate": treated_rate,
        "holdout_rate": holdout_rate,
        "difference": treated_rate - holdout_rate,
        "ci95": [float(low), float(high)],
        "treated": treated,
        "held_out": held_out,
    }, None


def _section(names: dict[str, int], waiting: dict[str, int], currency: str) -> dict[str, Any]:
    def prefixed(prefix: str) -> dict[str, int]:
        return {k[len(prefix) :]: n for k, n in sorted(names.items()) if k.startswith(prefix) and n}

    entered = names.get("entered", 0)
    held_out = names.get("held_out", 0)
    suppressed = prefixed("suppressed:")
    for reason, n in prefixed("skipped:").items():
        suppressed[reason] = suppressed.get(reason, 0) + n
    result, why = lift(
        entered - held_out,
        names.get("converted:treated", 0),
        held_out,
        names.get("converted:held_out", 0),
    )
    return {
        "entered": entered,
        "held_out": held_out,
        "refused": prefixed("refused:"),
        "waiting": waiting,
        "exited": prefixed("exited:"),
        "messages": {
            "requested": names.get("msg:requested", 0),
            "sent": names.get("msg:sent", 0),
            "delivered": names.get("msg:delivered", 0),
            "failed": names.get("msg:failed", 0),
            "suppressed": suppressed,
            "held_out": names.get("msg:held_out", 0),
            "capped": {
                "deferred": names.get("cap:deferred", 0),
                "skipped": names.get("cap:skipped", 0),
                "expired": names.get("cap:expired", 0),
            },
        },
        "conversions": names.get("conversions", 0),
        "revenue": {"amount_minor": names.get("revenue", 0), "currency": currency},
        "lift": result,
        "lift_unavailable": why,
    }


async def report(
    conn: AsyncConnection, shop_id: str, journey_id: str, currency: str
) -> dict[str, Any]:
    """The whole journey's report, and one per version under `versions`."""
    c = counters.c
    per_version: dict[int, dict[str, int]] = defaultdict(dict)
    rows = await conn.execute(
        select(c.version, c.name, c.n).where(c.shop_id == shop_id, c.journey_id == journey_id)
    )
    for version, name, n in rows:
        per_version[version][name] = int(n)
    e = enrollments.c
    waiting: dict[int, dict[str, int]] = defaultdict(dict)
    rows = await conn.execute(
        select(e.version, e.step_id, func.count())
        .where(e.shop_id == shop_id, e.journey_id == journey_id, e.status.in_(("waiting", "held")))
        .group_by(e.version, e.step_id)
    )
    for version, step_id, n in rows:
        waiting[version][str(step_id)] = int(n)
    total: dict[str, int] = defaultdict(int)
    for names in per_version.values():
        for name, n in names.items():
            total[name] += n
    total_waiting: dict[str, int] = defaultdict(int)
    for steps in waiting.values():
        for step, n in steps.items():
            total_waiting[step] += n
    out = _section(dict(total), dict(total_waiting), currency)
    out["versions"] = {
        str(v): _section(per_version.get(v, {}), waiting.get(v, {}), currency)
        for v in sorted(set(per_version) | set(waiting))
    }
    return out

"""The lifecycle stages and member levels, as pure functions of a customer's facts.

Defaults follow the sellers' playbooks (Taobao CRM, Klaviyo's RFM guides):
- `prospect`: known (an order placed but never paid, an old cart) with no purchase and no
  interest shown in the last 30 days.
- `interested`: carted, favourited or placed an unpaid order in the last 30 days, never
  bought.
- `new`: first purchase, still inside the after-sale care window (15 days: the time a
  parcel arrives and a return or review happens).
- `after_sale`: a repeat purchase inside the care window.
- `active`: last purchase within 90 days (about one repurchase cycle for consumables).
- `silent`: 90–180 days without a purchase: still reachable, worth a reminder.
- `sleeping`: 180–365 days: needs a win-back offer.
- `churned`: more than a year.
Member levels by cumulative spend net of refunds: VIP1 from 1,000, VIP2 from 5,000,
VIP3 from 20,000 in the shop's currency.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

STAGES = (
    "prospect",
    "interested",
    "new",
    "after_sale",
    "active",
    "silent",
    "sleeping",
    "churned",
)


@dataclass(frozen=True)
class StagePolicy:
    interested_days: int = 30
    after_sale_days: int = 15
    silent_after_days: int = 90
    sleeping_after_days: int = 180
    churned_after_days: int = 365
    level_thresholds_minor: tuple[tuple[str, int], ...] = (
        ("VIP1", 100_000),
        ("VIP2", 500_000),
        ("VIP3", 2_000_000),
    )


DEFAULT_POLICY = StagePolicy()


@dataclass(frozen=True)
class Facts:
    frequency: int
    last_order_at: datetime | None
    last_interest_at: datetime | None


def stage_of(facts: Facts, now: datetime, policy: StagePolicy = DEFAULT_POLICY) -> str:
    """The stage a customer is in at `now`."""
    if facts.frequency == 0 or facts.last_order_at is None:
        if facts.last_interest_at and now - facts.last_interest_at <= timedelta(
            days=policy.interested_days
        ):
            return "interested"
        return "prospect"
    days = now - facts.last_order_at
    if days < timedelta(days=policy.after_sale_days):
        return "new" if facts.frequency == 1 else "after_sale"
    if days < timedelta(days=policy.silent_after_days):
        return "active"
    if days < timedelta(days=policy.sleeping_after_days):
        return "silent"
    if days < timedelta(days=policy.churned_after_days):
        return "sleeping"
    return "churned"


def next_change_at(
    facts: Facts, now: datetime, policy: StagePolicy = DEFAULT_POLICY
) -> datetime | None:
    """When time alone will next move the customer to another stage (None: never)."""
    if facts.frequency == 0 or facts.last_order_at is None:
        if facts.last_interest_at is None:
            return None
        at = facts.last_interest_at + timedelta(days=policy.interested_days)
        return at if at > now else None
    for days in (
        policy.after_sale_days,
        policy.silent_after_days,
        policy.sleeping_after_days,
        policy.churned_after_days,
    ):
        at = facts.last_order_at + timedelta(days=days)
        if at > now:
            return at
    return None


def member_level(monetary_minor: int, policy: StagePolicy = DEFAULT_POLICY) -> str | None:
    level = None
    for name, threshold in policy.level_thresholds_minor:
        if monetary_minor >= threshold:
            level = name
    return level

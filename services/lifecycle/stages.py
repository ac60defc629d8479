"""The lifecycle stages and member levels, as pure functions of a customer's facts and the
shop's policy.

Defaults follow the sellers' playbooks (Taobao CRM guides, Klaviyo's RFM guides):
- `prospect`: known to the shop (an old cart, an unpaid order) but no purchase and no
  interest shown within the interest window.
- `interested`: carted, favourited or placed an unpaid order within 30 days, never bought.
- `new`: first purchase, still inside the 15-day after-sale care window (the parcel
  arrives, returns and reviews happen).
- `after_sale`: a repeat purchase inside that window.
- `active`: last purchase within 90 days, about one repurchase cycle for consumables.
- `silent`: 90–180 days without a purchase: still reachable, worth a reminder.
- `sleeping`: 180–365 days: needs a win-back offer.
- `churned`: more than a year: most platforms' own "lost customer" line.
Member levels by cumulative spend net of refunds (VIP1 from 1,000, VIP2 from 5,000, VIP3
from 20,000 in the shop's currency), or by purchase count when the shop says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class Level(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=16)
    threshold: int = Field(ge=0)
    """Minimum net spend in minor units (basis `spend`) or purchases (basis `orders`)."""


class PAliveRule(BaseModel):
    """A stage decided by the repurchase model instead of a day count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p_alive_below: float = Field(gt=0, lt=1, allow_inf_nan=False, strict=True)


class StagePolicy(BaseModel):
    """A shop's thresholds; `PUT /v1/policy` replaces it and re-stages the shop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interested_days: int = Field(default=30, ge=1, le=3650)
    after_sale_days: int = Field(default=15, ge=1, le=3650)
    silent_after_days: int = Field(default=90, ge=1, le=3650)
    sleeping_after_days: int = Field(default=180, ge=1, le=3650)
    churned_after_days: int = Field(default=365, ge=1, le=3650)
    sleeping_rule: PAliveRule | None = None
    """With it, a repeat buyer past the active window is `sleeping` when P(alive) falls
    below the bound (and `churned` below `churned_rule`'s), not after a day count."""
    churned_rule: PAliveRule | None = None
    p_alive_thresholds: tuple[Annotated[float, Field(gt=0, lt=1, strict=True)], ...] = Field(
        default=(0.1, 0.3, 0.5, 0.7), max_length=10
    )
    """A `customer.prediction_changed` event goes out when P(alive) crosses one of these
    (or a stage rule's bound), besides on a customer's first figures and each purchase."""
    level_basis: Literal["spend", "orders"] = "spend"
    levels: tuple[Level, ...] = (
        Level(name="VIP1", threshold=100_000),
        Level(name="VIP2", threshold=500_000),
        Level(name="VIP3", threshold=2_000_000),
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        days = [
            self.after_sale_days,
            self.silent_after_days,
            self.sleeping_after_days,
            self.churned_after_days,
        ]
        if days != sorted(set(days)):
            raise ValueError(
                "after_sale_days < silent_after_days < sleeping_after_days < "
                "churned_after_days must hold"
            )
        if self.churned_rule and not self.sleeping_rule:
            raise ValueError("churned_rule needs a sleeping_rule")
        if (
            self.churned_rule
            and self.sleeping_rule
            and self.churned_rule.p_alive_below >= self.sleeping_rule.p_alive_below
        ):
            raise ValueError("churned_rule.p_alive_below < sleeping_rule.p_alive_below must hold")
        if list(self.p_alive_thresholds) != sorted(set(self.p_alive_thresholds)):
            raise ValueError("p_alive_thresholds must increase")
        thresholds = [level.threshold for level in self.levels]
        if thresholds != sorted(set(thresholds)):
            raise ValueError("levels must have strictly increasing thresholds")
        if len({level.name for level in self.levels}) != len(self.levels):
            raise ValueError("level names must be unique")
        return self

    def p_alive_band(self, p_alive: float) -> int:
        """How many of the thresholds (and stage rules' bounds) lie at or below `p_alive`."""
        bounds = set(self.p_alive_thresholds)
        for rule in (self.sleeping_rule, self.churned_rule):
            if rule is not None:
                bounds.add(rule.p_alive_below)
        return sum(1 for bound in bounds if bound <= p_alive)

    @property
    def level_order(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)


DEFAULT_POLICY = StagePolicy()


@dataclass(frozen=True)
class Facts:
    frequency: int
    last_order_at: datetime | None
    last_interest_at: datetime | None
    p_alive: float | None = None
    """The repurchase model's P(alive), given for repeat buyers only: BG/NBD gives every
    one-time buyer 1 (no repeat purchase, no evidence of dropping out), so those keep the
    day counts."""


def stage_of(facts: Facts, now: datetime, policy: StagePolicy = DEFAULT_POLICY) -> str:
    """The stage a customer is in at `now` (each boundary belongs to the later stage)."""
    if facts.frequency == 0 or facts.last_order_at is None:
        if facts.last_interest_at and now - facts.last_interest_at < timedelta(
            days=policy.interested_days
        ):
            return "interested"
        return "prospect"
    days = now - facts.last_order_at
    if days < timedelta(days=policy.after_sale_days):
        return "new" if facts.frequency == 1 else "after_sale"
    if days < timedelta(days=policy.silent_after_days):
        return "active"
    by_model = _by_p_alive(facts.p_alive, policy)
    if by_model is not None:
        return by_model
    if days < timedelta(days=policy.sleeping_after_days):
        return "silent"
    if days < timedelta(days=policy.churned_after_days):
        return "sleeping"
    return "churned"


def _by_p_alive(p_alive: float | None, policy: StagePolicy) -> str | None:
    """silent, sleeping or churned by P(alive) under the policy's rules (None: by days).

    With a sleeping rule, P(alive) decides all three (churned only with a churned rule)."""
    if p_alive is None or policy.sleeping_rule is None:
        return None
    if policy.churned_rule and p_alive < policy.churned_rule.p_alive_below:
        return "churned"
    return "sleeping" if p_alive < policy.sleeping_rule.p_alive_below else "silent"


def days_after(at: datetime, days: int) -> datetime | None:
    """`at` plus whole days, or None past the calendar's end (never due): times stored
    before events were bounded must not make a customer unprocessable."""
    try:
        return at + timedelta(days=days)
    except OverflowError:
        return None


def next_change_at(
    facts: Facts, now: datetime, policy: StagePolicy = DEFAULT_POLICY
) -> datetime | None:
    """When time alone will next move the customer to another stage (None: never)."""
    if facts.frequency == 0 or facts.last_order_at is None:
        if facts.last_interest_at is None:
            return None
        at = days_after(facts.last_interest_at, policy.interested_days)
        return at if at is not None and at > now else None
    for days in (
        policy.after_sale_days,
        policy.silent_after_days,
        policy.sleeping_after_days,
        policy.churned_after_days,
    ):
        at = days_after(facts.last_order_at, days)
        if at is not None and at > now:
            return at
    return None


def member_level(
    monetary_minor: int, frequency: int, policy: StagePolicy = DEFAULT_POLICY
) -> str | None:
    """The highest level whose threshold the customer reaches (None: not a member)."""
    value = monetary_minor if policy.level_basis == "spend" else frequency
    level = None
    for candidate in policy.levels:
        if value >= candidate.threshold:
            level = candidate.name
    return level

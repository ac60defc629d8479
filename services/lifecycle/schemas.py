"""Request and response bodies of the lifecycle API (customer fields fixed by DESIGN.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from libs.common.events import Money
from services.lifecycle.rules import Rule, parse_rule

TagName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\s/][^/]*$")]


def _new_rule(value: Any) -> Rule:
    return parse_rule(value, bounded=True)


def _stored_rule(value: Any) -> Rule:
    return parse_rule(value)


# `parse_rule` runs first, so an error's location is the path inside the rule's JSON
# (`rule.all.1.value`), not pydantic's path through the union's member models; the union
# then takes the parsed rule as it is. The JSON schema is the grammar's, bounds included.
NewRule = Annotated[Rule, BeforeValidator(_new_rule)]
"""A rule an operator saves: numbers within the bounds of `services.lifecycle.rules`."""
StoredRule = Annotated[Rule, BeforeValidator(_stored_rule)]
"""A rule as saved: read with 64-bit numbers, as rules saved before the bounds may hold."""


class OrderOut(BaseModel):
    order_id: str
    status: str
    total: Money | None
    refunded: Money | None = None
    item_count: int
    shipping_province: str | None = None
    shipping_city: str | None = None
    tracking: list[dict[str, Any]] = []
    created_at: datetime | None
    paid_at: datetime | None = None
    shipped_at: datetime | None = None
    completed_at: datetime | None = None
    cancelled_at: datetime | None = None
    refunded_at: datetime | None = None


class Rfm(BaseModel):
    first_order_at: datetime | None
    last_order_at: datetime | None
    recency_days: int | None
    frequency: int
    monetary: Money | None
    average_order_value: Money | None = None
    item_count: int = 0


class Prediction(BaseModel):
    """The customer's figures under the shop's repurchase model (BG/NBD), as stored."""

    p_alive: float = Field(description="probability (0 to 1) that the customer is still a customer")
    expected_purchases_90d: float = Field(
        description="purchase days expected in the next 90 days (0 or more)"
    )
    next_purchase_at: datetime | None = Field(
        description="the likely time of the next purchase, if the model expects one"
    )


class CustomerOut(BaseModel):
    shop_id: str
    customer_id: str
    name: str | None
    phone: str | None
    email: str | None
    stage: str
    returning: bool
    member_level: str | None
    tags: list[str]
    rfm: Rfm
    province: str | None = None
    city: str | None = None
    source: str | None = None
    prediction: Prediction | None = Field(
        default=None,
        description="figures under the shop's repurchase model; null until it has one",
    )
    orders: list[OrderOut] = []


class CustomerPage(BaseModel):
    items: list[CustomerOut]
    next_cursor: str | None


class CustomerPatch(BaseModel):
    """Operator corrections of a profile."""

    model_config = ConfigDict(extra="forbid")

    source: Annotated[str, Field(min_length=1, max_length=64)]


class NoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Annotated[str, Field(min_length=1, max_length=4000)]


class TimelineEntry(BaseModel):
    at: datetime
    kind: Literal["order", "stage", "tag", "note"]
    detail: dict[str, Any]


class TagIn(BaseModel):
    """A manual tag (no rule) or an automatic one (its rule decides membership)."""

    model_config = ConfigDict(extra="forbid")

    name: TagName
    rule: NewRule | None = None


class RuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rule: NewRule


class TagOut(BaseModel):
    name: str
    kind: Literal["manual", "auto"]
    rule: StoredRule | None = None
    customers: int


class Members(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_ids: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=200)]],
        Field(min_length=1, max_length=10_000),
    ]


class CopyTo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: TagName


class Changed(BaseModel):
    changed: int


class SegmentIn(BaseModel):
    """A saved filter over stage, tags, RFM values, level, city, province and source."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)]
    filter: NewRule


class FilterIn(BaseModel):
    """A filter to count, unsaved (`POST /v1/segments/count`)."""

    model_config = ConfigDict(extra="forbid")

    filter: NewRule


class SegmentOut(BaseModel):
    segment_id: str
    name: str
    filter: StoredRule
    created_at: datetime


class Count(BaseModel):
    count: int


class Figures(BaseModel):
    """The seller's headline figures as of one moment."""

    as_of: datetime
    interested_30d: int
    buyers_365d: int
    members: int
    new_customers_7d: int
    stages: dict[str, int]
    returning_share: float | None
    """Old-customer share: buyers with more than one purchase / all buyers."""
    repurchase_rate_by_stage: dict[str, float | None]
    aov_new: Money | None
    aov_returning: Money | None


class Overview(Figures):
    shop_id: str
    repurchase_cycle_days: dict[str, float | int | None]
    """Percentiles (p25, p50, p75, p90) of days between a customer's consecutive
    purchases, and how many such repeat purchases they are computed from."""
    previous: Figures
    """The same figures as of `period_days` earlier, recomputed from the orders."""

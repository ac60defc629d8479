"""A journey's definition: versioned JSON, validated here, never eval'd.

    {"name": "催付 unpaid reminder", "category": "transactional",
     "trigger": {"event": "order.created", "if": <condition>?},
     "key": "order",
     "steps": [{"id": "wait", "wait": "PT1H"},
               {"id": "remind", "send": {"channel": "sms", "template": "unpaid_reminder"}}],
     "goals": [{"event": "order.paid", "match": "order"}],
     "reentry": {"per": "order"},
     "holdout_percent": 0,
     "caps": [{"scope": "category", "max": 3, "period": "P7D", "on_cap": "defer"}]}

Triggers: `{"event": type, "if"?: condition}` (a domain event: orders, parcels, carts, and
the lifecycle changes `customer.stage_changed`, `customer.tag_added`, ...); a scheduled
broadcast `{"broadcast": {"at", "audience"?}}`; or a date relative to a promotion
`{"promotion": {"id", "offset": "-P7D", "at": "10:00", "audience"?}}`. Conditions are the
typed language of `services.campaigns.conditions`.

Steps run in order; each has an `id` (unique) and one action:
- `wait`: an ISO 8601 duration (`PT1H`, `P7D`), counted from when the enrollment reached the
  step: for the first step, the trigger event's time ("1 hour after checkout"), later the
  due time of the previous wait, so a late fire never shifts the rest of the plan;
- `wait_until`: `{"at": "HH:MM", "until"?: "HH:MM", "weekdays"?: [1..7]}` — the next moment
  inside that daily window (Monday is 1) in the shop's timezone (customers carry no timezone
  of their own yet); at once when already inside it;
- `wait_until_date`: `{"field": "customer.next_purchase_at", "offset"?: "-P2D",
  "otherwise": "P30D"}` — until a date the customer carries (today one: lifecycle's
  predicted next purchase, kept by campaigns from `customer.prediction_changed`) moved by
  `offset`, read when the enrollment reaches the step; at once when that moment has
  passed; `otherwise` after the anchor when the customer has no such date. The wait does
  not move if the date changes later (a journey that should follow it re-enters on the
  event that changes it; see the `repurchase_reminder` playbook);
- `wait_for`: `{"event", "match": "order"|"customer", "if"?, "timeout"}` — goes on at
  `then` (default: the next step) when the event comes first, at `on_timeout` (default: the
  next step) when the timeout does;
- `branch`: `{"if": condition, "then": step_id, "else"?: step_id}`;
- `send`: `{"channel": "sms"|"email", "template", "to"?: "customer"|"staff"}`;
- `tag`: `{"add": name}` or `{"remove": name}` — asks lifecycle (`customer.tag_requested`,
  which lifecycle consumes; campaigns never touches its tables);
- `exit`: a reason (text).
Jumps (`then`, `else`, `on_timeout`) only go forward, so every enrollment ends.

Goals (`{"event", "match", "if"?}`) end an enrollment the moment a matching event arrives,
also during a wait. Re-entry (`per`): `order` (once per order), `customer` (once per customer
ever), `customer_days` (once per customer per `days`), `always`. Caps: at most `max` sends
per customer in a rolling `period`, counted over this journey (`scope: journey`) or over
every journey of its category (`scope: category`); a capped send is deferred until the cap
allows it, at most `defer_max` (then dropped with the reason `cap_expired`), or skipped
(`on_cap: skip`), and either is counted in the report.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from libs.common.events import DATA_SCHEMAS, NOTIFICATION_TYPES, SHOP_TYPES, TagName
from services.campaigns.conditions import Condition

TRIGGER_TYPES: tuple[str, ...] = tuple(
    t
    for t in DATA_SCHEMAS
    if t not in SHOP_TYPES and t not in NOTIFICATION_TYPES and t != "customer.tag_requested"
)
"""Event types a journey can trigger on, wait for or take as a goal."""
ORDER_KEYED_TYPES: tuple[str, ...] = tuple(
    t for t in TRIGGER_TYPES if t.startswith(("order.", "logistics."))
)
"""Types that name an order (a parcel's through the tracking number): `key: order` needs one."""
MAX_STEPS = 50
MAX_DURATION = timedelta(days=3650)

_DURATION = re.compile(
    r"^P(?!$)(?:(?P<w>\d{1,4})W)?(?:(?P<d>\d{1,5})D)?"
    r"(?:T(?=\d)(?:(?P<h>\d{1,6})H)?(?:(?P<m>\d{1,7})M)?(?:(?P<s>\d{1,9})S)?)?$"
)


def parse_duration(value: Any) -> timedelta:
    """An ISO 8601 duration of weeks, days, hours, minutes and seconds (`PT1H`, `P7D`,
    `P1DT12H`); years and months are refused (they have no fixed length)."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError("a duration is an ISO 8601 string such as 'PT1H' or 'P7D'")
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(
            f"{value!r} is not an ISO 8601 duration of weeks, days, hours, minutes and "
            "seconds (e.g. 'PT1H', 'P7D', 'P1DT12H')"
        )
    parts = {k: int(v) for k, v in match.groupdict().items() if v}
    total = timedelta(
        weeks=parts.get("w", 0),
        days=parts.get("d", 0),
        hours=parts.get("h", 0),
        minutes=parts.get("m", 0),
        seconds=parts.get("s", 0),
    )
    if total > MAX_DURATION:
        raise ValueError("at most 3650 days")
    return total


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    out = "P" + (f"{days}D" if days else "")
    clock = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    clock += f"{secs}S" if secs else ""
    if clock:
        out += "T" + clock
    return out if out != "P" else "PT0S"


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
StepId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
"""Template names."""


def _event_type(value: str) -> str:
    if value not in TRIGGER_TYPES:
        raise ValueError(f"unknown event type {value!r}; one of {list(TRIGGER_TYPES)}")
    return value


EventType = Annotated[str, AfterValidator(_event_type)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _clock(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(r"\d\d:\d\d(:00)?", value):
        raise ValueError("a time of day is 'HH:MM'")
    return value


ClockTime = Annotated[time, BeforeValidator(_clock)]


_SIGNED = re.compile(r"^(?P<sign>[-+]?)(?P<rest>P.*)$")


def parse_offset(value: Any) -> timedelta:
    """A signed ISO 8601 duration: `-P7D` is seven days before."""
    if isinstance(value, timedelta):
        return value
    match = _SIGNED.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("an offset is a signed ISO 8601 duration such as '-P7D'")
    magnitude = parse_duration(match["rest"])
    return -magnitude if match["sign"] == "-" else magnitude


Offset = Annotated[timedelta, BeforeValidator(parse_offset)]


class Broadcast(_Strict):
    """Enroll, at `at`, every customer campaigns knows who matches `audience` (a condition
    over `customer.*` facts; everyone without one). A time without an offset is the
    shop's local time."""

    at: datetime
    audience: Condition | None = None


class PromotionTrigger(_Strict):
    """A broadcast at a date relative to a promotion (`POST /v1/promotions`): `offset`
    from the local day it starts, at the local time of day `at` ("7 days before 11-11 at
    10:00" is `{"offset": "-P7D", "at": "10:00"}`)."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    offset: Offset = timedelta(0)
    at: ClockTime = time(10, 0)
    audience: Condition | None = None


class Trigger(_Strict):
    event: EventType | None = None
    if_: Condition | None = Field(default=None, alias="if")
    broadcast: Broadcast | None = None
    promotion: PromotionTrigger | None = None

    @model_validator(mode="after")
    def _one(self) -> Trigger:
        given = [n for n in ("event", "broadcast", "promotion") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a trigger has exactly one of 'event', 'broadcast', 'promotion'; got {given}"
            )
        if self.if_ is not None and self.event is None:
            raise ValueError("'if' goes with 'event' (a broadcast has an 'audience')")
        return self

    @property
    def scheduled(self) -> bool:
        return self.event is None


class Goal(_Strict):
    event: EventType
    match: Literal["order", "customer"] = "order"
    if_: Condition | None = Field(default=None, alias="if")


class WaitFor(_Strict):
    event: EventType
    match: Literal["order", "customer"] = "order"
    if_: Condition | None = Field(default=None, alias="if")
    timeout: Duration
    then: StepId | None = None
    on_timeout: StepId | None = None


class Window(_Strict):
    at: ClockTime
    until: ClockTime | None = None
    weekdays: Annotated[
        list[Annotated[int, Field(ge=1, le=7, strict=True)]], Field(min_length=1, max_length=7)
    ] = [1, 2, 3, 4, 5, 6, 7]

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.until is not None and self.until <= self.at:
            raise ValueError("'until' must be later than 'at' on the same day")
        return self


DATE_FIELDS = ("customer.next_purchase_at",)
"""The dates a `wait_until_date` may name."""


class DateWait(_Strict):
    field: Literal["customer.next_purchase_at"]
    offset: Offset = timedelta(0)
    otherwise: Duration


class Branch(_Strict):
    if_: Condition = Field(alias="if")
    then: StepId
    else_: StepId | None = Field(default=None, alias="else")


class Send(_Strict):
    channel: Literal["sms", "email"]
    template: Name
    to: Literal["customer", "staff"] = "customer"


class TagChange(_Strict):
    add: TagName | None = None
    remove: TagName | None = None

    @model_validator(mode="after")
    def _one(self) -> TagChange:
        if (self.add is None) == (self.remove is None):
            raise ValueError("give exactly one of 'add' and 'remove'")
        return self


ACTIONS = ("wait", "wait_until", "wait_until_date", "wait_for", "branch", "send", "tag", "exit")


class Step(_Strict):
    id: StepId
    wait: Duration | None = None
    wait_until: Window | None = None
    wait_until_date: DateWait | None = None
    wait_for: WaitFor | None = None
    branch: Branch | None = None
    send: Send | None = None
    tag: TagChange | None = None
    exit: Annotated[str, Field(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        given = [a for a in ACTIONS if getattr(self, a) is not None]
        if len(given) != 1:
            raise ValueError(f"a step has exactly one action of {list(ACTIONS)}; got {given}")
        return self

    @property
    def action(self) -> str:
        return next(a for a in ACTIONS if getattr(self, a) is not None)

    def jumps(self) -> list[tuple[str, str]]:
        """(field, step id) of each jump this step may take."""
        out: list[tuple[str, str]] = []
        if self.branch is not None:
            out.append(("then", self.branch.then))
            if self.branch.else_ is not None:
                out.append(("else", self.branch.else_))
        if self.wait_for is not None:
            for name in ("then", "on_timeout"):
                target = getattr(self.wait_for, name)
                if target is not None:
                    out.append((name, target))
        return out


class Reentry(_Strict):
    per: Literal["order", "customer", "customer_days", "always"] = "customer"
    days: Annotated[int, Field(ge=1, le=3650, strict=True)] | None = None

    @model_validator(mode="after")
    def _days(self) -> Reentry:
        if (self.per == "customer_days") != (self.days is not None):
            raise ValueError("'days' goes with per 'customer_days', and only with it")
        return self


class Cap(_Strict):
    scope: Literal["journey", "category"] = "journey"
    max: Annotated[int, Field(ge=1, le=1000, strict=True)]
    period: Duration
    on_cap: Literal["defer", "skip"] = "defer"
    defer_max: Duration = timedelta(days=1)


class Definition(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
    category: Literal["transactional", "marketing"] = "marketing"
    trigger: Trigger
    key: Literal["order", "customer"] = "customer"
    steps: Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS)]
    goals: Annotated[list[Goal], Field(max_length=20)] = []
    reentry: Reentry = Reentry()
    holdout_percent: Annotated[int, Field(ge=0, le=90, strict=True)] = 0
    caps: Annotated[list[Cap], Field(max_length=5)] = []
    attribution_window: Duration = timedelta(days=7)

    @model_validator(mode="after")
    def _consistent(self) -> Definition:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        index: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            if step.id in index:
                errors.append((("steps", i, "id"), f"step id {step.id!r} is used twice"))
            index.setdefault(step.id, i)
        for i, step in enumerate(self.steps):
            action = step.action
            for name, target in step.jumps():
                if target not in index:
                    errors.append(((("steps", i, action, name)), f"no step {target!r}"))
                elif index[target] <= i:
                    errors.append(
                        (("steps", i, action, name), "jumps go forward only (to a later step)")
                    )
            if step.wait_for is not None and step.wait_for.match == "order" and self.key != "order":
                errors.append(
                    (("steps", i, "wait_for", "match"), "'order' needs the journey key 'order'")
                )
        for i, goal in enumerate(self.goals):
            if goal.match == "order" and self.key != "order":
                errors.append((("goals", i, "match"), "'order' needs the journey key 'order'"))
        if self.key == "order" and self.trigger.event not in ORDER_KEYED_TYPES:
            errors.append((("trigger", "event"), "the key 'order' needs an order or parcel event"))
        if self.reentry.per == "order" and self.key != "order":
            errors.append((("reentry", "per"), "'order' needs the journey key 'order'"))
        if errors:
            raise ValidationError.from_exception_data(
                "Definition",
                [
                    {"type": "value_error", "loc": loc, "input": None, "ctx": {"error": msg}}
                    for loc, msg in errors
                ],
            )
        return self

    def step_index(self, step_id: str) -> int:
        for i, step in enumerate(self.steps):
            if step.id == step_id:
                return i
        raise KeyError(step_id)

    @property
    def cancellable(self) -> bool:
        """Whether an event can end or move an enrollment while it waits (its waits then
        fire only once campaigns has consumed every partition up to their due time)."""
        return bool(self.goals) or any(s.wait_for is not None for s in self.steps)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def parse_definition(obj: object) -> Definition:
    return Definition.model_validate(obj)

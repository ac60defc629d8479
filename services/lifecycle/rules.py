"""Conditions for automatic tags and saved segments: a small typed language, never eval'd.

A rule is JSON. The grammar (every object takes exactly the keys shown):

    rule := {"all": [rule, ...]}                         every one holds (at least one rule)
          | {"any": [rule, ...]}                         at least one holds (at least one rule)
          | {"not": rule}
          | {"field": AMOUNT, "op": CMP, "value": int}                 0 <= value <= 10^15
          | {"field": AMOUNT, "op": "between", "value": [lo, hi]}     lo <= x <= hi, lo <= hi
          | {"field": "recency_days", "op": CMP, "value": int}   -36500 <= value <= 36500
          | {"field": "recency_days", "op": "between", "value": [lo, hi]}   (same bounds)
          | {"field": TEXT, "op": "eq" | "ne", "value": str}
          | {"field": TEXT, "op": "in" | "not_in", "value": [str, ...]}   (at least one)
          | {"field": "p_alive", "op": CMP, "value": number}        0 <= value <= 1
          | {"field": "p_alive", "op": "between", "value": [lo, hi]}   (same bounds)
          | {"field": "expected_purchases_90d", "op": CMP, "value": number}
                                                                 0 <= value <= 10^6
          | {"field": "expected_purchases_90d", "op": "between", "value": [lo, hi]}
          | {"field": TEXT | "recency_days" | PREDICTION, "op": "is_null" | "not_null"}
          | {"field": "returning", "op": "eq", "value": true | false}
          | {"has_tag": str}
          | {"member_level_at_least": str}
    AMOUNT     := frequency | monetary_minor | aov_minor | item_count
    CMP        := eq | ne | gt | gte | lt | lte
    TEXT       := stage | member_level | city | province | source
    PREDICTION := p_alive | expected_purchases_90d

Numbers of `AMOUNT` and `recency_days` are JSON integers (3.0, "3" and booleans are refused)
within these bounds, so nothing an operator saves can overflow later (a date `N days` away,
a 64-bit column):
- counts and money (`AMOUNT`: purchases, items, minor units of net spend and of the average
  order): 0 to `AMOUNT_MAX` (10^15, ten trillion yuan in fen, and below 2^53 so every
  JSON parser reads it exactly). None of them is ever negative, so a negative bound could
  only make a rule trivially true or false; it is refused.
- `recency_days`: -`RECENCY_DAYS_MAX` to `RECENCY_DAYS_MAX` (36500, a century: ten times the
  longest stage threshold a policy may set, 3650). Negative recency is meaningful: a last
  order dated after `now` (a platform's clock ahead of ours) has it.
Rules stored before these bounds existed may hold any signed 64-bit integer: `parse_rule`
reads them (`bounded=True` is what the API asks for), and evaluation, SQL and
`recency_thresholds` never raise on them (see below).

The `PREDICTION` fields are the customer's figures under the shop's repurchase model
(BG/NBD): `p_alive`, the probability that it is still a customer, and
`expected_purchases_90d`, the purchase days expected in the next 90 days (see
`models.customers`). Their values are any finite JSON numbers, integers or not (booleans,
strings, NaN and infinities are refused), read as floats (`1` reads back as `1.0`) and
compared exactly with the stored double: `p_alive` within 0..1, `expected_purchases_90d`
within 0..`EXPECTED_PURCHASES_MAX` (10^6). These bounds hold for stored rules too (the
fields are newer than the bounds, so no rule was ever saved without them). In SQL a
comparison is `column IS NOT NULL AND column op value`, the value bound as a double, which
both databases compare exactly as Python does, given finite stored figures (the model
writes no NaN: PostgreSQL orders NaN above every number, Python compares it false).

Text matches exactly (case-sensitive); `stage` values must be one of `stages.STAGES`. A rule
nests at most `MAX_DEPTH` (8) deep, counting the leaf, and has at most `MAX_NODES` (100)
parts (combinators and leaves alike). Anything else is a pydantic `ValidationError` whose
`loc` is the path of the failing part inside the JSON, e.g. `("all", 1, "not", "value")`.
`Rule` as a field type validates the same way with the bounds (its JSON schema is the
grammar's, bounds included), though its `loc` also names the union's member models.

Null semantics, identical in Python and SQL: every comparison on a missing value is false,
`ne` and `not_in` included (a customer with no city is neither `city eq "X"` nor
`city ne "X"`); `member_level_at_least` is false without a level, and false for everyone if
the named level is not in the level order. Only `is_null`/`not_null` look at missingness.
Each leaf is two-valued, so `not` is plain negation: `not` of a false comparison is true.
A customer has no prediction (both `PREDICTION` fields null) until its shop has a fitted
model, so until then every comparison on them is false and `is_null` true.

Recency: `recency_days` is the number of whole days (24 hours of elapsed time, zone-free)
since the last purchase, floor((now - last_order_at) / 1 day): 0 during the first 24 hours,
1 from exactly 24 hours on; negative if the last order lies after `now`. A customer who never
bought has none (null), so every recency comparison is false for them. In SQL it compiles
to exact comparisons of `last_order_at` with `now - N days` (`recency_between`):
    recency >= N  <=>  last_order_at <= now - N days
    recency <= N  <=>  last_order_at >  now - (N + 1) days
which agree to the microsecond on PostgreSQL (timestamptz) and SQLite (naive UTC text in one
fixed format, compared as text); a cutoff beyond the range of dates compiles to the constant
it stands for. `recency_thresholds` lists the N at which a rule's truth can change with time
alone: the instants `last_order_at + N days`, for |N| <= RECENCY_DAYS_MAX + 1 (farther ones,
only in rules stored before the bounds, are a century or more away and left out). (The
`stage` field also moves with time, through the stage timers; rules over it are re-evaluated
when the stage changes. The `PREDICTION` fields change when the shop's model is refitted, not
with time alone: they have no thresholds here, and rules over them are re-evaluated when a
customer's figures are rewritten.)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Self, TypeAlias, TypeVar, assert_never, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Float,
    and_,
    exists,
    false,
    literal,
    not_,
    or_,
    select,
    true,
)

from services.lifecycle.models import customer_tags, customers
from services.lifecycle.stages import STAGES

MAX_DEPTH = 8
MAX_NODES = 100
DEFAULT_LEVEL_ORDER: tuple[str, ...] = ("VIP1", "VIP2", "VIP3")
AMOUNT_MAX = 10**15
"""Largest count or amount of money (minor units) a rule may compare with (0 the least)."""
RECENCY_DAYS_MAX = 36_500
"""Largest |recency_days| a rule may compare with: a century."""
EXPECTED_PURCHASES_MAX = 1_000_000
"""Largest `expected_purchases_90d` a rule (or a list filter) may compare with (0 the
least): far above any real figure (at most about 90 purchase days in 90 days), small
enough for every number up to it to be exact in a double."""

AmountField = Literal["frequency", "monetary_minor", "aov_minor", "item_count"]
NumericField = Literal["frequency", "monetary_minor", "aov_minor", "item_count", "recency_days"]
PredictionField = Literal["p_alive", "expected_purchases_90d"]
TextField = Literal["stage", "member_level", "city", "province", "source"]
PlainTextField = Literal["member_level", "city", "province", "source"]
NullableField = Literal[
    "stage",
    "member_level",
    "city",
    "province",
    "source",
    "recency_days",
    "p_alive",
    "expected_purchases_90d",
]
CompareOp = Literal["eq", "ne", "gt", "gte", "lt", "lte"]

NUMERIC_FIELDS: frozenset[str] = frozenset(get_args(NumericField))
TEXT_FIELDS: frozenset[str] = frozenset(get_args(TextField))
ALL_FIELDS: tuple[str, ...] = (
    *get_args(NumericField),
    *get_args(PredictionField),
    *get_args(TextField),
    "returning",
)
_COMPARE_OPS: frozenset[str] = frozenset(get_args(CompareOp))
_NULL_OPS = frozenset({"is_null", "not_null"})

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_STORED = "huitou_stored_rule"
"""Validation context key: the rule was read back from storage, so numbers need only be
64-bit integers (rules saved before the bounds existed must still load)."""

# Custom error types and their message templates (kept here so `parse_rule` can re-raise
# them with the tags of the tagged union taken out of `loc`).
_ERRORS: dict[str, str] = {
    "rule_shape": (
        "a rule is an object with one of the keys all, any, not, field, has_tag, "
        "member_level_at_least"
    ),
    "rule_field": "unknown field '{field}'; fields are {fields}",
    "rule_op": "op '{op}' does not apply to this field; ops are {ops}",
    "rule_stage": "unknown stage '{stage}'; stages are {stages}",
    "rule_bounds": "between needs lo <= hi",
    "rule_text": "text must be UTF-8 without NUL characters",
    "rule_too_deep": "rules nest at most {max_depth} deep",
    "rule_too_large": "a rule has at most {max_nodes} parts",
}


def _error(kind: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, _ERRORS[kind], ctx or None)


def _storable(text: str) -> str:
    """Text both databases can bind: valid UTF-8 (no lone surrogates), no NUL."""
    if "\x00" in text:
        raise _error("rule_text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _error("rule_text") from None
    return text


def _known_field(value: Any) -> Any:
    if not isinstance(value, str) or value not in ALL_FIELDS:
        raise _error("rule_field", field=value, fields=", ".join(ALL_FIELDS))
    return value


def _numeric_op(value: Any) -> Any:
    if not isinstance(value, str) or value not in _COMPARE_OPS:
        ops = (
            "eq, ne, gt, gte, lt, lte, between (and is_null, not_null for recency_days, "
            "p_alive, expected_purchases_90d)"
        )
        raise _error("rule_op", op=value, ops=ops)
    return value


def _text_op(value: Any) -> Any:
    if value not in ("eq", "ne"):
        raise _error("rule_op", op=value, ops="eq, ne, in, not_in, is_null, not_null")
    return value


def _known_stages(values: list[str]) -> list[str]:
    for value in values:
        if value not in STAGES:
            raise _error("rule_stage", stage=value, stages=", ".join(STAGES))
    return values


def _known_stage(value: str) -> str:
    return _known_stages([value])[0]


Int64 = Annotated[int, Strict(), Field(ge=_INT64_MIN, le=_INT64_MAX)]
_INT64: TypeAdapter[int] = TypeAdapter(Int64)


def _bounded_unless_stored(
    value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
) -> Any:
    if info.context is not None and info.context.get(_STORED):
        return _INT64.validate_python(value)
    return handler(value)


Amount = Annotated[int, Strict(), Field(ge=0, le=AMOUNT_MAX), WrapValidator(_bounded_unless_stored)]
RecencyDays = Annotated[
    int,
    Strict(),
    Field(ge=-RECENCY_DAYS_MAX, le=RECENCY_DAYS_MAX),
    WrapValidator(_bounded_unless_stored),
]
Probability = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]
"""A `p_alive` bound: a finite JSON number (integer or not) in 0..1, read as a float."""
ExpectedPurchases = Annotated[
    float, Strict(), Field(ge=0, le=EXPECTED_PURCHASES_MAX, allow_inf_nan=False)
]
"""An `expected_purchases_90d` bound: a finite JSON number in 0..EXPECTED_PURCHASES_MAX."""
_NO_NUL = {"pattern": "^[^\\u0000]*$"}  # in the JSON schema; `_storable` checks it
Text = Annotated[
    str, Strict(), Field(max_length=200, json_schema_extra=_NO_NUL), AfterValidator(_storable)
]
Name = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=64, json_schema_extra=_NO_NUL),
    AfterValidator(_storable),
]
StageName = Annotated[Text, Field(json_schema_extra={"enum": list(STAGES)})]


class _Node(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class _Combinator(_Node):
    @model_validator(mode="after")
    def _within_limits(self) -> Self:
        # Rules parsed from JSON are checked top-down on the way in (`_limits`); this catches
        # trees assembled in Python from parts that were each within the limits.
        depth, nodes = _measure(self)
        if depth > MAX_DEPTH:
            raise _error("rule_too_deep", max_depth=MAX_DEPTH)
        if nodes > MAX_NODES:
            raise _error("rule_too_large", max_nodes=MAX_NODES)
        return self


class AllOf(_Combinator):
    all: Annotated[list[Rule], Field(min_length=1)]


class AnyOf(_Combinator):
    any: Annotated[list[Rule], Field(min_length=1)]


class Not(_Combinator):
    not_: Rule = Field(alias="not")


_N = TypeVar("_N", int, float)


def _ordered(value: tuple[_N, _N]) -> tuple[_N, _N]:
    if value[0] > value[1]:
        raise _error("rule_bounds")
    return value


class AmountCompare(_Node):
    field: Annotated[AmountField, BeforeValidator(_known_field)]
    op: Annotated[CompareOp, BeforeValidator(_numeric_op)]
    value: Amount


class AmountBetween(_Node):
    field: AmountField
    op: Literal["between"]
    value: Annotated[tuple[Amount, Amount], AfterValidator(_ordered)]


class RecencyCompare(_Node):
    field: Literal["recency_days"]
    op: Annotated[CompareOp, BeforeValidator(_numeric_op)]
    value: RecencyDays


class RecencyBetween(_Node):
    field: Literal["recency_days"]
    op: Literal["between"]
    value: Annotated[tuple[RecencyDays, RecencyDays], AfterValidator(_ordered)]


class PAliveCompare(_Node):
    field: Literal["p_alive"]
    op: Annotated[CompareOp, BeforeValidator(_numeric_op)]
    value: Probability


class PAliveBetween(_Node):
    field: Literal["p_alive"]
    op: Literal["between"]
    value: Annotated[tuple[Probability, Probability], AfterValidator(_ordered)]


class ExpectedPurchasesCompare(_Node):
    field: Literal["expected_purchases_90d"]
    op: Annotated[CompareOp, BeforeValidator(_numeric_op)]
    value: ExpectedPurchases


class ExpectedPurchasesBetween(_Node):
    field: Literal["expected_purchases_90d"]
    op: Literal["between"]
    value: Annotated[tuple[ExpectedPurchases, ExpectedPurchases], AfterValidator(_ordered)]


class TextCompare(_Node):
    field: PlainTextField
    op: Annotated[Literal["eq", "ne"], BeforeValidator(_text_op)]
    value: Text


class TextIn(_Node):
    field: PlainTextField
    op: Literal["in", "not_in"]
    value: Annotated[list[Text], Field(min_length=1, max_length=1000)]


class StageCompare(_Node):
    field: Literal["stage"]
    op: Annotated[Literal["eq", "ne"], BeforeValidator(_text_op)]
    value: Annotated[StageName, AfterValidator(_known_stage)]


class StageIn(_Node):
    field: Literal["stage"]
    op: Literal["in", "not_in"]
    value: Annotated[
        list[StageName], Field(min_length=1, max_length=1000), AfterValidator(_known_stages)
    ]


class NullCheck(_Node):
    field: NullableField
    op: Literal["is_null", "not_null"]


class ReturningIs(_Node):
    field: Literal["returning"]
    op: Literal["eq"]
    value: Annotated[bool, Strict()]


class HasTag(_Node):
    has_tag: Name


class MemberLevelAtLeast(_Node):
    member_level_at_least: Name


def _rule_kind(value: Any) -> str | None:
    """Which model a rule's JSON is meant as (the tag of the tagged union)."""
    if isinstance(value, _Node):
        return type(value).__name__
    if not isinstance(value, dict):
        return None
    for key, kind in (
        ("all", "AllOf"),
        ("any", "AnyOf"),
        ("not", "Not"),
        ("has_tag", "HasTag"),
        ("member_level_at_least", "MemberLevelAtLeast"),
    ):
        if key in value:
            return kind
    if "field" not in value:
        return None
    field, op = value["field"], value.get("op")
    # Unhashable parts (a list or object where a name belongs) are left to the leaf
    # models to refuse with a 422, never looked up in the sets below.
    field = field if isinstance(field, str) else None
    op = op if isinstance(op, str) else None
    if field == "returning":
        return "ReturningIs"
    if field in TEXT_FIELDS:
        if op in _NULL_OPS:
            return "NullCheck"
        if field == "stage":
            return "StageIn" if op in ("in", "not_in") else "StageCompare"
        return "TextIn" if op in ("in", "not_in") else "TextCompare"
    if field == "recency_days":
        if op in _NULL_OPS:
            return "NullCheck"
        return "RecencyBetween" if op == "between" else "RecencyCompare"
    if field == "p_alive":
        if op in _NULL_OPS:
            return "NullCheck"
        return "PAliveBetween" if op == "between" else "PAliveCompare"
    if field == "expected_purchases_90d":
        if op in _NULL_OPS:
            return "NullCheck"
        return "ExpectedPurchasesBetween" if op == "between" else "ExpectedPurchasesCompare"
    if op == "between" and field in NUMERIC_FIELDS:
        return "AmountBetween"
    return "AmountCompare"  # also reports unknown fields


@dataclass
class _Budget:
    depth: int = 0
    nodes: int = 0
    too_large: bool = False


_BUDGET: ContextVar[_Budget | None] = ContextVar("huitou_rule_budget", default=None)


def _limits(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Depth and size limits, checked top-down so a too deep part fails where it is (and
    validation never descends further)."""
    budget = _BUDGET.get()
    token = None
    if budget is None:
        budget = _Budget()
        token = _BUDGET.set(budget)
    try:
        if budget.too_large:
            # Reported once, at the first part over the limit; the validation has failed,
            # so the parts after it are left unvalidated (and unreported).
            return value
        depth, nodes = _measure(value) if isinstance(value, _Node) else (1, 1)
        if budget.depth + depth > MAX_DEPTH:
            raise _error("rule_too_deep", max_depth=MAX_DEPTH)
        budget.nodes += nodes
        if budget.nodes > MAX_NODES:
            budget.too_large = True
            raise _error("rule_too_large", max_nodes=MAX_NODES)
        budget.depth += 1
        try:
            return handler(value)
        finally:
            budget.depth -= 1
    finally:
        if token is not None:
            _BUDGET.reset(token)


Rule: TypeAlias = Annotated[
    Annotated[AllOf, Tag("AllOf")]
    | Annotated[AnyOf, Tag("AnyOf")]
    | Annotated[Not, Tag("Not")]
    | Annotated[AmountCompare, Tag("AmountCompare")]
    | Annotated[AmountBetween, Tag("AmountBetween")]
    | Annotated[RecencyCompare, Tag("RecencyCompare")]
    | Annotated[RecencyBetween, Tag("RecencyBetween")]
    | Annotated[PAliveCompare, Tag("PAliveCompare")]
    | Annotated[PAliveBetween, Tag("PAliveBetween")]
    | Annotated[ExpectedPurchasesCompare, Tag("ExpectedPurchasesCompare")]
    | Annotated[ExpectedPurchasesBetween, Tag("ExpectedPurchasesBetween")]
    | Annotated[TextCompare, Tag("TextCompare")]
    | Annotated[TextIn, Tag("TextIn")]
    | Annotated[StageCompare, Tag("StageCompare")]
    | Annotated[StageIn, Tag("StageIn")]
    | Annotated[NullCheck, Tag("NullCheck")]
    | Annotated[ReturningIs, Tag("ReturningIs")]
    | Annotated[HasTag, Tag("HasTag")]
    | Annotated[MemberLevelAtLeast, Tag("MemberLevelAtLeast")],
    Discriminator(
        _rule_kind, custom_error_type="rule_shape", custom_error_message=_ERRORS["rule_shape"]
    ),
    WrapValidator(_limits),
]
"""A validated rule; use it as a field type in API schemas, or `parse_rule` for JSON."""

for _model in (AllOf, AnyOf, Not):
    _model.model_rebuild()

_TAGS = frozenset(
    {
        "AllOf",
        "AnyOf",
        "Not",
        "AmountCompare",
        "AmountBetween",
        "RecencyCompare",
        "RecencyBetween",
        "PAliveCompare",
        "PAliveBetween",
        "ExpectedPurchasesCompare",
        "ExpectedPurchasesBetween",
        "TextCompare",
        "TextIn",
        "StageCompare",
        "StageIn",
        "NullCheck",
        "ReturningIs",
        "HasTag",
        "MemberLevelAtLeast",
    }
)
_ADAPTER: TypeAdapter[Rule] = TypeAdapter(Rule)


def _children(rule: _Node) -> list[Rule]:
    if isinstance(rule, AllOf):
        return rule.all
    if isinstance(rule, AnyOf):
        return rule.any
    if isinstance(rule, Not):
        return [rule.not_]
    return []


def _measure(rule: _Node) -> tuple[int, int]:
    """(depth, number of nodes) of a rule tree."""
    depth, nodes = 0, 1
    for child in _children(rule):
        d, n = _measure(child)
        depth, nodes = max(depth, d), nodes + n
    return depth + 1, nodes


def _json_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """`loc` without the union tags, i.e. the path inside the rule's JSON."""
    out: list[int | str] = []
    state = "rule"
    for part in loc:
        if state == "rule" and part in _TAGS:
            state = "model"
            continue
        out.append(part)
        if state == "model":
            state = "items" if part in ("all", "any") else "rule" if part == "not" else "other"
        elif state == "items":
            state = "rule" if isinstance(part, int) else "other"
        else:
            state = "other"
    return tuple(out)


def parse_rule(obj: object, *, bounded: bool = False) -> Rule:
    """A rule from its JSON value (already decoded); `ValidationError` if it is not one.

    `bounded=True` holds its numbers to the grammar's bounds, as for a rule an operator
    saves now; without, any 64-bit integer is read, as a stored rule may hold one."""
    try:
        return _ADAPTER.validate_python(obj, context=None if bounded else {_STORED: True})
    except ValidationError as exc:
        errors: list[InitErrorDetails] = []
        for err in exc.errors():
            ctx = err.get("ctx")
            kind: str | PydanticCustomError = err["type"]
            if kind in _ERRORS:
                kind = PydanticCustomError(err["type"], _ERRORS[err["type"]], ctx)
            detail = InitErrorDetails(type=kind, loc=_json_loc(err["loc"]), input=err["input"])
            if ctx is not None and not isinstance(kind, PydanticCustomError):
                detail["ctx"] = ctx
            errors.append(detail)
        raise ValidationError.from_exception_data("Rule", errors) from None


def dump_rule(rule: Rule) -> dict[str, Any]:
    """The rule's JSON value (what `parse_rule` reads back)."""
    dumped = _ADAPTER.dump_python(rule, mode="json", by_alias=True)
    assert isinstance(dumped, dict)
    return dumped


# --- evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CustomerFacts:
    """What rules look at, for one customer."""

    frequency: int
    monetary_minor: int
    aov_minor: int
    item_count: int
    last_order_at: datetime | None
    stage: str
    member_level: str | None
    city: str | None
    province: str | None
    source: str | None
    returning: bool
    tags: frozenset[str] = frozenset()
    p_alive: float | None = None
    """Under the shop's repurchase model; None without one (see `models.customers`)."""
    expected_purchases_90d: float | None = None


def facts_from_row(row: Mapping[Any, Any], tags: Iterable[str] = ()) -> CustomerFacts:
    """Facts from a `customers` row (a mapping of its columns) and the customer's tags."""
    return CustomerFacts(
        frequency=row["frequency"],
        monetary_minor=row["monetary_minor"],
        aov_minor=row["aov_minor"],
        item_count=row["item_count"],
        last_order_at=row["last_order_at"],
        stage=row["stage"],
        member_level=row["member_level"],
        city=row["city"],
        province=row["province"],
        source=row["source"],
        returning=bool(row["is_returning"]),
        tags=frozenset(tags),
        p_alive=row["p_alive"],
        expected_purchases_90d=row["expected_purchases_90d"],
    )


_CMP: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("naive datetime given; rules take aware times only")
    return now


def _numeric_fact(field: str, facts: CustomerFacts, now: datetime) -> int | None:
    if field == "recency_days":
        if facts.last_order_at is None:
            return None
        return (now - facts.last_order_at).days  # timedelta.days is the floor
    value = getattr(facts, field)
    assert isinstance(value, int)
    return value


def evaluate(
    rule: Rule,
    facts: CustomerFacts,
    now: datetime,
    level_order: tuple[str, ...] = DEFAULT_LEVEL_ORDER,
) -> bool:
    """Whether `facts` satisfy `rule` at `now`."""
    now = _aware(now)

    def ev(r: Rule) -> bool:
        if isinstance(r, AllOf):
            return all(ev(c) for c in r.all)
        if isinstance(r, AnyOf):
            return any(ev(c) for c in r.any)
        if isinstance(r, Not):
            return not ev(r.not_)
        if isinstance(r, AmountCompare | RecencyCompare):
            x = _numeric_fact(r.field, facts, now)
            return x is not None and bool(_CMP[r.op](x, r.value))
        if isinstance(r, AmountBetween | RecencyBetween):
            x = _numeric_fact(r.field, facts, now)
            return x is not None and r.value[0] <= x <= r.value[1]
        if isinstance(r, PAliveCompare | ExpectedPurchasesCompare):
            y: float | None = getattr(facts, r.field)
            return y is not None and bool(_CMP[r.op](y, r.value))
        if isinstance(r, PAliveBetween | ExpectedPurchasesBetween):
            y = getattr(facts, r.field)
            return y is not None and r.value[0] <= y <= r.value[1]
        if isinstance(r, TextCompare | StageCompare):
            s: str | None = getattr(facts, r.field)
            return s is not None and (s == r.value if r.op == "eq" else s != r.value)
        if isinstance(r, TextIn | StageIn):
            s = getattr(facts, r.field)
            return s is not None and ((s in r.value) == (r.op == "in"))
        if isinstance(r, NullCheck):
            missing = (
                facts.last_order_at is None
                if r.field == "recency_days"
                else getattr(facts, r.field) is None
            )  # a text or prediction field: a fact of that name
            return missing == (r.op == "is_null")
        if isinstance(r, ReturningIs):
            return facts.returning == r.value
        if isinstance(r, HasTag):
            return r.has_tag in facts.tags
        if isinstance(r, MemberLevelAtLeast):
            levels = _levels_at_least(r.member_level_at_least, level_order)
            return facts.member_level is not None and facts.member_level in levels
        assert_never(r)

    return ev(rule)


def _levels_at_least(level: str, level_order: tuple[str, ...]) -> tuple[str, ...]:
    """The levels from `level` up; none if `level` is not in the order."""
    if level not in level_order:
        return ()
    return level_order[level_order.index(level) :]


# --- SQL --------------------------------------------------------------------------------

_NUMERIC_COLUMNS = {
    "frequency": customers.c.frequency,
    "monetary_minor": customers.c.monetary_minor,
    "aov_minor": customers.c.aov_minor,
    "item_count": customers.c.item_count,
}
_TEXT_COLUMNS = {
    "stage": customers.c.stage,
    "member_level": customers.c.member_level,
    "city": customers.c.city,
    "province": customers.c.province,
    "source": customers.c.source,
}
_PREDICTION_COLUMNS = {
    "p_alive": customers.c.p_alive,
    "expected_purchases_90d": customers.c.expected_purchases_90d,
}
_NULLABLE_COLUMNS = {
    **_TEXT_COLUMNS,
    "recency_days": customers.c.last_order_at,
    **_PREDICTION_COLUMNS,
}


def _double(value: float) -> ColumnElement[float]:
    """A bound compared as a double with the FLOAT (double precision) columns: exact."""
    return literal(float(value), Float())


def _interval(op: str, value: int | tuple[int, int]) -> list[tuple[int | None, int | None]]:
    """The integers `x op value` holds for, as a union of [lo, hi] (None: unbounded)."""
    if isinstance(value, tuple):
        return [value]
    n = value
    intervals: dict[str, list[tuple[int | None, int | None]]] = {
        "eq": [(n, n)],
        "ne": [(None, n - 1), (n + 1, None)],
        "gt": [(n + 1, None)],
        "gte": [(n, None)],
        "lt": [(None, n - 1)],
        "lte": [(None, n)],
    }
    return intervals[op]


def _within(lo: int | None, hi: int | None, now: datetime) -> ColumnElement[bool]:
    """lo <= recency <= hi for a customer with a last order (None: unbounded)."""
    last = customers.c.last_order_at

    def at_least(n: int) -> ColumnElement[bool]:  # recency >= n
        try:
            return last <= now - timedelta(days=n)
        except OverflowError:  # the cutoff lies before (n > 0) or after all times
            return false() if n > 0 else true()

    def at_most(n: int) -> ColumnElement[bool]:  # recency <= n
        try:
            return last > now - timedelta(days=n + 1)
        except OverflowError:
            return true() if n + 1 > 0 else false()

    bounds = []
    if lo is not None:
        bounds.append(at_least(lo))
    if hi is not None:
        bounds.append(at_most(hi))
    return and_(true(), *bounds)


def recency_between(lo: int | None, hi: int | None, now: datetime) -> ColumnElement[bool]:
    """Customers whose recency at `now` lies in [lo, hi] (None: unbounded), as a condition
    on `customers` rows; false for a customer who never bought. Never raises on a bound,
    however large: a cutoff beyond the range of dates is the constant it stands for."""
    now = _aware(now).astimezone(UTC)
    return and_(customers.c.last_order_at.is_not(None), _within(lo, hi, now))


def _recency_sql(op: str, value: int | tuple[int, int], now: datetime) -> ColumnElement[bool]:
    parts = [_within(lo, hi, now) for lo, hi in _interval(op, value)]
    return and_(customers.c.last_order_at.is_not(None), or_(*parts))


def to_sql(
    rule: Rule, now: datetime, level_order: tuple[str, ...] = DEFAULT_LEVEL_ORDER
) -> ColumnElement[bool]:
    """The rule as a condition on `customers` rows (has_tag: EXISTS on `customer_tags`)."""
    now = _aware(now).astimezone(UTC)

    def sql(r: Rule) -> ColumnElement[bool]:
        if isinstance(r, AllOf):
            return and_(*(sql(c) for c in r.all))
        if isinstance(r, AnyOf):
            return or_(*(sql(c) for c in r.any))
        if isinstance(r, Not):
            return not_(sql(r.not_))
        if isinstance(r, RecencyCompare | RecencyBetween):
            return _recency_sql(r.op, r.value, now)
        if isinstance(r, AmountCompare | AmountBetween):
            column = _NUMERIC_COLUMNS[r.field]
            if isinstance(r, AmountBetween):
                lo, hi = r.value
                return and_(
                    column >= literal(lo, BigInteger()), column <= literal(hi, BigInteger())
                )
            return _CMP[r.op](column, literal(r.value, BigInteger()))  # type: ignore[no-any-return]
        if isinstance(r, PAliveCompare | ExpectedPurchasesCompare):
            column = _PREDICTION_COLUMNS[r.field]
            return and_(column.is_not(None), _CMP[r.op](column, _double(r.value)))
        if isinstance(r, PAliveBetween | ExpectedPurchasesBetween):
            column = _PREDICTION_COLUMNS[r.field]
            low, high = r.value
            return and_(column.is_not(None), column >= _double(low), column <= _double(high))
        if isinstance(r, TextCompare | StageCompare):
            column = _TEXT_COLUMNS[r.field]
            match = column == r.value if r.op == "eq" else column != r.value
            return and_(column.is_not(None), match)
        if isinstance(r, TextIn | StageIn):
            column = _TEXT_COLUMNS[r.field]
            match = column.in_(r.value) if r.op == "in" else column.not_in(r.value)
            return and_(column.is_not(None), match)
        if isinstance(r, NullCheck):
            column = _NULLABLE_COLUMNS[r.field]
            return column.is_(None) if r.op == "is_null" else column.is_not(None)
        if isinstance(r, ReturningIs):
            return customers.c.is_returning.is_(true() if r.value else false())
        if isinstance(r, HasTag):
            return exists(
                select(literal(1)).where(
                    customer_tags.c.shop_id == customers.c.shop_id,
                    customer_tags.c.customer_id == customers.c.customer_id,
                    customer_tags.c.tag == r.has_tag,
                )
            )
        if isinstance(r, MemberLevelAtLeast):
            levels = _levels_at_least(r.member_level_at_least, level_order)
            if not levels:
                return false()
            level = customers.c.member_level
            return and_(level.is_not(None), level.in_(levels))
        assert_never(r)

    return sql(rule)


# --- time ---------------------------------------------------------------------------------


def recency_thresholds(rule: Rule) -> set[int]:
    """The day counts N at which the rule's truth can change with time alone, i.e. at
    `last_order_at + N days` (a superset: a flip may be masked by the rest of the rule).

    Only |N| <= RECENCY_DAYS_MAX + 1, every threshold of a rule within the bounds: a rule
    stored before them may name farther ones, a century and more away, where no timer need
    wait (and `last_order_at + N days` could lie beyond the year 9999)."""
    found: set[int] = set()
    stack: list[Rule] = [rule]
    while stack:
        r = stack.pop()
        stack.extend(_children(r))
        if isinstance(r, RecencyCompare | RecencyBetween):
            for lo, hi in _interval(r.op, r.value):
                if lo is not None:
                    found.add(lo)  # recency reaches lo
                if hi is not None:
                    found.add(hi + 1)  # recency passes hi
    return {n for n in found if abs(n) <= RECENCY_DAYS_MAX + 1}

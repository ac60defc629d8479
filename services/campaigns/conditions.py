"""Conditions of journeys (triggers, branches, goals): a small typed language, never eval'd.

A condition is JSON. The grammar (every object takes exactly the keys shown; any other key
is an error):

    cond := {"all": [cond, ...]}                     every one holds (at least one)
          | {"any": [cond, ...]}                     at least one holds (at least one)
          | {"not": cond}
          | {"field": FIELD, "op": OP, "value": V}   OP and V as the field's kind allows
          | {"field": FIELD, "op": "is_null" | "not_null"}      (no "value" key)
          | {"has_tag": str}                         customer.tags contains str

FIELD is one of the fixed catalogue `FIELDS` (name -> kind), and the ops of each kind are:

    number     eq | ne | gt | gte | lt | lte      value: int
               between                          value: [lo, hi], ints, lo <= hi
               in | not_in                      value: [int, ...], 1 to 100 of them
    text       eq | ne | starts_with            value: str
               in | not_in                      value: [str, ...], 1 to 100 of them
    text_list  contains                         value: str
               contains_any | contains_none     value: [str, ...], 1 to 100 of them
    decimal    eq | ne | gt | gte | lt | lte      value: a JSON number (whole or not)
               between                          value: [lo, hi], numbers, lo <= hi
    bool       eq                               value: true | false (a JSON boolean)
    any kind   is_null | not_null               no value

Bounds: numbers are JSON integers (3.0, "3" and booleans are refused) with
|n| <= `NUMBER_MAX` (10^15, below 2^53 so every JSON parser reads it exactly); decimals
(the repurchase model's figures: `p_alive` 0 to 1, expected purchases) are finite JSON
numbers within the same bound, compared as doubles; a text is
at most `TEXT_MAX` (200) characters without control characters (U+0000 to U+001F, U+007F)
or lone surrogates (not Unicode text); lists hold 1 to `LIST_MAX` (100) items. A condition
nests at most `MAX_DEPTH` (8) deep, counting the leaf, and has at most `MAX_NODES` (100)
parts (combinators and leaves alike).

Anything else is a pydantic `ValidationError` whose `loc` is the path of the failing part
inside the JSON, e.g. `("all", 1, "not", "value")` — from `parse_condition` and, prefixed by
the field's name only, wherever `Condition` is the type of a field of another model. An
unknown field fails at `(..., "field")` with the known fields in the message, an op its
field's kind does not have at `(..., "op")`, a depth or size overrun at the first part over
the limit.

Semantics (the same as lifecycle's rules): `evaluate` reads facts, a mapping of field names
to values (int for number, str for text, a list of str for text_list, bool for bool; None
or absent when missing). Every comparison on a missing fact is false, `ne`, `not_in` and
`contains_none` included (an event with no city is neither `city eq "X"` nor `city ne "X"`).
Only `is_null`/`not_null` look at missingness, and only at it (an empty text_list is not
null). Each leaf is two-valued, so `not` is plain negation: `not` of a false comparison is
true. Text compares exactly (case-sensitive), `starts_with` too. A fact of the wrong type
for its field's kind is the caller's error: `TypeError`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self, TypeAlias, assert_never, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    StrictBool,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

MAX_DEPTH = 8
MAX_NODES = 100
NUMBER_MAX = 10**15
"""Largest |n| a condition may compare with."""
TEXT_MAX = 200
LIST_MAX = 100

FieldKind = Literal["number", "decimal", "text", "text_list", "bool"]

FIELDS: dict[str, FieldKind] = {
    "event.type": "text",
    "event.status": "text",
    "event.city": "text",
    "event.province": "text",
    "event.sku": "text",
    "event.skus": "text_list",
    "event.amount_minor": "number",
    "event.stage": "text",
    "event.previous_stage": "text",
    "event.tag": "text",
    "event.level": "text",
    "event.previous_level": "text",
    "event.carrier": "text",
    "event.age_hours": "number",
    "event.p_alive": "decimal",
    "event.expected_purchases_90d": "decimal",
    "event.reason": "text",
    "customer.stage": "text",
    "customer.level": "text",
    "customer.tags": "text_list",
    "customer.returning": "bool",
    "customer.frequency": "number",
    "customer.monetary_minor": "number",
    "customer.recency_days": "number",
    "customer.p_alive": "decimal",
    "customer.expected_purchases_90d": "decimal",
    "customer.city": "text",
    "customer.province": "text",
    "customer.has_phone": "bool",
    "customer.has_email": "bool",
    "customer.cart_open": "bool",
    "order.status": "text",
    "order.total_minor": "number",
    "order.city": "text",
    "order.province": "text",
    "order.skus": "text_list",
    "order.item_count": "number",
    "order.paid": "bool",
}
"""Every field a condition may name, with its kind."""

OPS: dict[FieldKind, tuple[str, ...]] = {
    "number": ("eq", "ne", "gt", "gte", "lt", "lte", "between", "in", "not_in"),
    "decimal": ("eq", "ne", "gt", "gte", "lt", "lte", "between"),
    "text": ("eq", "ne", "in", "not_in", "starts_with"),
    "text_list": ("contains", "contains_any", "contains_none"),
    "bool": ("eq",),
}
"""The ops of each kind, besides is_null and not_null (which every kind has)."""

NULL_OPS: tuple[str, ...] = ("is_null", "not_null")

# The same catalogue as types (for the models and their JSON schema); a test checks that
# they agree with FIELDS.
NumberField = Literal[
    "event.amount_minor",
    "event.age_hours",
    "customer.frequency",
    "customer.monetary_minor",
    "customer.recency_days",
    "order.total_minor",
    "order.item_count",
]
DecimalField = Literal[
    "event.p_alive",
    "event.expected_purchases_90d",
    "customer.p_alive",
    "customer.expected_purchases_90d",
]
TextField = Literal[
    "event.type",
    "event.status",
    "event.city",
    "event.province",
    "event.sku",
    "event.stage",
    "event.previous_stage",
    "event.tag",
    "event.level",
    "event.previous_level",
    "event.carrier",
    "event.reason",
    "customer.stage",
    "customer.level",
    "customer.city",
    "customer.province",
    "order.status",
    "order.city",
    "order.province",
]
TextListField = Literal["event.skus", "customer.tags", "order.skus"]
BoolField = Literal[
    "customer.returning",
    "customer.has_phone",
    "customer.has_email",
    "customer.cart_open",
    "order.paid",
]
FieldName = Literal[NumberField, DecimalField, TextField, TextListField, BoolField]

KIND_FIELDS: dict[FieldKind, tuple[str, ...]] = {
    "number": get_args(NumberField),
    "decimal": get_args(DecimalField),
    "text": get_args(TextField),
    "text_list": get_args(TextListField),
    "bool": get_args(BoolField),
}

# Custom error types and their message templates (kept here so that errors can be raised
# again with the union's tags taken out of `loc`).
_ERRORS: dict[str, str] = {
    "condition_shape": (
        "a condition is an object with one of the keys all, any, not, field, has_tag"
    ),
    "condition_field": "unknown field '{field}'; fields are {fields}",
    "condition_op": "op '{op}' does not apply to {kind} field '{field}'; ops are {ops}",
    "condition_between": "between needs [lo, hi] with lo <= hi",
    "condition_text": "text must not contain control characters (U+0000 to U+001F, U+007F)",
    "condition_too_deep": "conditions nest at most {max_depth} deep",
    "condition_too_large": "a condition has at most {max_nodes} parts",
}


def _error(error: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(error, _ERRORS[error], ctx or None)


def _clean_text(text: str) -> str:
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise _error("condition_text")
    return text


Int = Annotated[int, Strict(), Field(ge=-NUMBER_MAX, le=NUMBER_MAX)]
Decimal = Annotated[float, Strict(), Field(ge=-NUMBER_MAX, le=NUMBER_MAX, allow_inf_nan=False)]
Text = Annotated[
    str,
    Strict(),
    Field(max_length=TEXT_MAX, json_schema_extra={"pattern": "^[^\\u0000-\\u001f\\u007f]*$"}),
    AfterValidator(_clean_text),
]
IntList = Annotated[list[Int], Field(min_length=1, max_length=LIST_MAX)]
TextList = Annotated[list[Text], Field(min_length=1, max_length=LIST_MAX)]


def _ordered(value: tuple[Any, Any]) -> tuple[Any, Any]:
    if value[0] > value[1]:
        raise _error("condition_between")
    return value


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
        # Conditions parsed from JSON are checked top-down on the way in (`_validate`); this
        # catches trees assembled in Python from parts that were each within the limits.
        depth, nodes = _measure(self)
        if depth > MAX_DEPTH:
            raise _error("condition_too_deep", max_depth=MAX_DEPTH)
        if nodes > MAX_NODES:
            raise _error("condition_too_large", max_nodes=MAX_NODES)
        return self


class AllOf(_Combinator):
    """Every one of the conditions holds."""

    all: Annotated[list[Condition], Field(min_length=1)]


class AnyOf(_Combinator):
    """At least one of the conditions holds."""

    any: Annotated[list[Condition], Field(min_length=1)]


class Not(_Combinator):
    """The condition does not hold."""

    not_: Condition = Field(alias="not")


class NumberCompare(_Node):
    """A number field compared with an integer (false if the fact is missing)."""

    field: NumberField
    op: Literal["eq", "ne", "gt", "gte", "lt", "lte"]
    value: Int


class NumberBetween(_Node):
    """lo <= a number field <= hi (false if the fact is missing)."""

    field: NumberField
    op: Literal["between"]
    value: Annotated[tuple[Int, Int], AfterValidator(_ordered)]


class NumberIn(_Node):
    """A number field is (not) one of the integers (false if the fact is missing)."""

    field: NumberField
    op: Literal["in", "not_in"]
    value: IntList


class DecimalCompare(_Node):
    """A decimal field compared with a number (false if the fact is missing)."""

    field: DecimalField
    op: Literal["eq", "ne", "gt", "gte", "lt", "lte"]
    value: Decimal


class DecimalBetween(_Node):
    """lo <= a decimal field <= hi (false if the fact is missing)."""

    field: DecimalField
    op: Literal["between"]
    value: Annotated[tuple[Decimal, Decimal], AfterValidator(_ordered)]


class TextCompare(_Node):
    """A text field equals, differs from or starts with a text, case-sensitively
    (false if the fact is missing)."""

    field: TextField
    op: Literal["eq", "ne", "starts_with"]
    value: Text


class TextIn(_Node):
    """A text field is (not) one of the texts (false if the fact is missing)."""

    field: TextField
    op: Literal["in", "not_in"]
    value: TextList


class ListContains(_Node):
    """A text_list field contains the text (false if the fact is missing)."""

    field: TextListField
    op: Literal["contains"]
    value: Text


class ListContainsAny(_Node):
    """A text_list field contains any / none of the texts (false if the fact is
    missing)."""

    field: TextListField
    op: Literal["contains_any", "contains_none"]
    value: TextList


class BoolIs(_Node):
    """A bool field is true or false (false if the fact is missing)."""

    field: BoolField
    op: Literal["eq"]
    value: StrictBool


class NullCheck(_Node):
    """Whether the fact is missing (None or absent); an empty text_list is not."""

    field: FieldName
    op: Literal["is_null", "not_null"]


class HasTag(_Node):
    """The customer has the tag: customer.tags contains it."""

    has_tag: Text


Leaf: TypeAlias = (
    NumberCompare
    | NumberBetween
    | NumberIn
    | DecimalCompare
    | DecimalBetween
    | TextCompare
    | TextIn
    | ListContains
    | ListContainsAny
    | BoolIs
    | NullCheck
    | HasTag
)

_TAGS = frozenset(
    {
        "AllOf",
        "AnyOf",
        "Not",
        "NumberCompare",
        "NumberBetween",
        "NumberIn",
        "DecimalCompare",
        "DecimalBetween",
        "TextCompare",
        "TextIn",
        "ListContains",
        "ListContainsAny",
        "BoolIs",
        "NullCheck",
        "HasTag",
    }
)

# The model of a leaf with a known field, by kind and op (`None`: the op is missing, the
# model reports it).
_LEAF_MODELS: dict[FieldKind, dict[str | None, str]] = {
    "number": {
        **dict.fromkeys(("eq", "ne", "gt", "gte", "lt", "lte", None), "NumberCompare"),
        "between": "NumberBetween",
        "in": "NumberIn",
        "not_in": "NumberIn",
    },
    "decimal": {
        **dict.fromkeys(("eq", "ne", "gt", "gte", "lt", "lte", None), "DecimalCompare"),
        "between": "DecimalBetween",
    },
    "text": {
        **dict.fromkeys(("eq", "ne", "starts_with", None), "TextCompare"),
        "in": "TextIn",
        "not_in": "TextIn",
    },
    "text_list": {
        "contains": "ListContains",
        None: "ListContains",
        "contains_any": "ListContainsAny",
        "contains_none": "ListContainsAny",
    },
    "bool": {"eq": "BoolIs", None: "BoolIs"},
}


def _condition_kind(value: Any) -> str | None:
    """Which model a condition's JSON is meant as (the tag of the tagged union)."""
    if isinstance(value, _Node):
        return type(value).__name__
    if not isinstance(value, dict):
        return None
    for key, kind in (("all", "AllOf"), ("any", "AnyOf"), ("not", "Not"), ("has_tag", "HasTag")):
        if key in value:
            return kind
    if "field" not in value:
        return None
    # `_check_leaf` has refused unknown fields and ops (an unhashable one is never looked up).
    field, op = value["field"], value.get("op")
    field_kind = FIELDS.get(field) if isinstance(field, str) else None
    if field_kind is None or op in NULL_OPS:
        return "NullCheck"
    return _LEAF_MODELS[field_kind].get(op) if op is None or isinstance(op, str) else None


def _fail(error: str, loc: tuple[str | int, ...], input: Any, **ctx: Any) -> ValidationError:
    """An error at `loc` relative to the condition being validated."""
    detail = InitErrorDetails(type=_error(error, **ctx), loc=loc, input=input)
    return ValidationError.from_exception_data("Condition", [detail])


def _check_leaf(value: dict[Any, Any]) -> None:
    """The field is known and the op one of its kind's, or an error at its key."""
    if any(key in value for key in ("all", "any", "not", "has_tag")) or "field" not in value:
        return
    field = value["field"]
    # Unhashable input (a list or object where a name belongs) is never looked up in a dict.
    if not isinstance(field, str) or field not in FIELDS:
        name = field if isinstance(field, str) else repr(field)
        raise _fail("condition_field", ("field",), field, field=name, fields=", ".join(FIELDS))
    if "op" not in value:
        return  # the model reports it missing
    op, kind = value["op"], FIELDS[field]
    if not isinstance(op, str) or op not in (*OPS[kind], *NULL_OPS):
        ops = ", ".join((*OPS[kind], *NULL_OPS))
        name = op if isinstance(op, str) else repr(op)
        raise _fail("condition_op", ("op",), op, op=name, kind=kind, field=field, ops=ops)


def _untagged(exc: ValidationError) -> ValidationError:
    """The same errors with the union's tag taken off the front of each `loc`."""
    errors: list[InitErrorDetails] = []
    for err in exc.errors():
        loc = err["loc"]
        if loc and loc[0] in _TAGS:
            loc = loc[1:]
        ctx = err.get("ctx")
        kind: str | PydanticCustomError = err["type"]
        if kind in _ERRORS:
            kind = PydanticCustomError(err["type"], _ERRORS[err["type"]], ctx)
        detail = InitErrorDetails(type=kind, loc=loc, input=err["input"])
        if ctx is not None and not isinstance(kind, PydanticCustomError):
            detail["ctx"] = ctx
        errors.append(detail)
    return ValidationError.from_exception_data("Condition", errors)


@dataclass
class _Budget:
    depth: int = 0
    nodes: int = 0
    too_large: bool = False


_BUDGET: ContextVar[_Budget | None] = ContextVar("huitou_condition_budget", default=None)


def _validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Around the tagged union at every condition: depth and size limits (top-down, so a
    too deep part fails where it is and validation never descends further), the field and
    op checked before a model is chosen, and the union's tag taken out of every `loc`."""
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
            raise _error("condition_too_deep", max_depth=MAX_DEPTH)
        budget.nodes += nodes
        if budget.nodes > MAX_NODES:
            budget.too_large = True
            raise _error("condition_too_large", max_nodes=MAX_NODES)
        if isinstance(value, dict):
            _check_leaf(value)
        budget.depth += 1
        try:
            return handler(value)
        except ValidationError as exc:
            raise _untagged(exc) from None
        finally:
            budget.depth -= 1
    finally:
        if token is not None:
            _BUDGET.reset(token)


Condition: TypeAlias = Annotated[
    Annotated[AllOf, Tag("AllOf")]
    | Annotated[AnyOf, Tag("AnyOf")]
    | Annotated[Not, Tag("Not")]
    | Annotated[NumberCompare, Tag("NumberCompare")]
    | Annotated[NumberBetween, Tag("NumberBetween")]
    | Annotated[NumberIn, Tag("NumberIn")]
    | Annotated[DecimalCompare, Tag("DecimalCompare")]
    | Annotated[DecimalBetween, Tag("DecimalBetween")]
    | Annotated[TextCompare, Tag("TextCompare")]
    | Annotated[TextIn, Tag("TextIn")]
    | Annotated[ListContains, Tag("ListContains")]
    | Annotated[ListContainsAny, Tag("ListContainsAny")]
    | Annotated[BoolIs, Tag("BoolIs")]
    | Annotated[NullCheck, Tag("NullCheck")]
    | Annotated[HasTag, Tag("HasTag")],
    Discriminator(
        _condition_kind,
        custom_error_type="condition_shape",
        custom_error_message=_ERRORS["condition_shape"],
    ),
    WrapValidator(_validate),
]
"""A validated condition; use it as a field type in API schemas, or `parse_condition`."""

for _model in (AllOf, AnyOf, Not):
    _model.model_rebuild()

_ADAPTER: TypeAdapter[Condition] = TypeAdapter(Condition, config=ConfigDict(title="Condition"))


def _children(c: _Node) -> list[Condition]:
    if isinstance(c, AllOf):
        return c.all
    if isinstance(c, AnyOf):
        return c.any
    if isinstance(c, Not):
        return [c.not_]
    return []


def _measure(c: _Node) -> tuple[int, int]:
    """(depth, number of nodes) of a condition tree."""
    depth, nodes = 0, 1
    for child in _children(c):
        d, n = _measure(child)
        depth, nodes = max(depth, d), nodes + n
    return depth + 1, nodes


def parse_condition(obj: object) -> Condition:
    """A condition from its JSON value (already decoded); `ValidationError` if it is not
    one, with `loc` the path of the failing part."""
    return _ADAPTER.validate_python(obj)


def dump_condition(c: Condition) -> dict[str, Any]:
    """The condition's JSON value (what `parse_condition` reads back)."""
    dumped = _ADAPTER.dump_python(c, mode="json", by_alias=True)
    assert isinstance(dumped, dict)
    return dumped


def fields_used(c: Condition) -> set[str]:
    """The fields a condition looks at (`has_tag` looks at customer.tags)."""
    found: set[str] = set()
    stack: list[Condition] = [c]
    while stack:
        node = stack.pop()
        stack.extend(_children(node))
        if isinstance(node, HasTag):
            found.add("customer.tags")
        elif not isinstance(node, AllOf | AnyOf | Not):
            found.add(node.field)
    return found


# --- evaluation ---------------------------------------------------------------------------

_CMP: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


def _wrong(field: str, value: object) -> TypeError:
    return TypeError(f"fact {field} is a {FIELDS[field]} field, not {type(value).__name__}")


def _number(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(field, value)
    return value


def _decimal(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong(field, value)
    return float(value)


def _text(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise _wrong(field, value)
    return value


def _text_list(field: str, value: object) -> frozenset[str]:
    if not isinstance(value, list | tuple | set | frozenset) or not all(
        isinstance(item, str) for item in value
    ):
        raise _wrong(field, value)
    return frozenset(value)


def _bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _wrong(field, value)
    return value


def _leaf(c: Leaf, facts: Mapping[str, Any]) -> bool:
    field = "customer.tags" if isinstance(c, HasTag) else c.field
    fact = facts.get(field)
    if isinstance(c, NullCheck):
        return (fact is None) == (c.op == "is_null")
    if fact is None:
        return False  # every comparison on a missing fact
    if isinstance(c, NumberCompare):
        return bool(_CMP[c.op](_number(field, fact), c.value))
    if isinstance(c, NumberBetween):
        return c.value[0] <= _number(field, fact) <= c.value[1]
    if isinstance(c, NumberIn):
        return (_number(field, fact) in c.value) == (c.op == "in")
    if isinstance(c, DecimalCompare):
        return bool(_CMP[c.op](_decimal(field, fact), c.value))
    if isinstance(c, DecimalBetween):
        return c.value[0] <= _decimal(field, fact) <= c.value[1]
    if isinstance(c, TextCompare):
        s = _text(field, fact)
        if c.op == "starts_with":
            return s.startswith(c.value)
        return (s == c.value) == (c.op == "eq")
    if isinstance(c, TextIn):
        return (_text(field, fact) in c.value) == (c.op == "in")
    if isinstance(c, ListContains):
        return c.value in _text_list(field, fact)
    if isinstance(c, ListContainsAny):
        items = _text_list(field, fact)
        return any(v in items for v in c.value) == (c.op == "contains_any")
    if isinstance(c, BoolIs):
        return _bool(field, fact) == c.value
    if isinstance(c, HasTag):
        return c.has_tag in _text_list(field, fact)
    assert_never(c)


def evaluate(c: Condition, facts: Mapping[str, Any]) -> bool:
    """Whether `facts` (field name -> value, None or absent when missing) satisfy `c`."""
    if isinstance(c, AllOf):
        return all(evaluate(child, facts) for child in c.all)
    if isinstance(c, AnyOf):
        return any(evaluate(child, facts) for child in c.any)
    if isinstance(c, Not):
        return not evaluate(c.not_, facts)
    return _leaf(c, facts)

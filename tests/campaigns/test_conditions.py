"""The condition language of journeys: every op of every kind, null semantics, validation
errors at the exact JSON path (also inside another model), round trips, the JSON schema,
and evaluation against an independent reference."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from pydantic import BaseModel, TypeAdapter, ValidationError

from services.campaigns.conditions import (
    FIELDS,
    KIND_FIELDS,
    LIST_MAX,
    MAX_DEPTH,
    MAX_NODES,
    NULL_OPS,
    NUMBER_MAX,
    OPS,
    TEXT_MAX,
    AllOf,
    BoolField,
    Condition,
    DecimalField,
    FieldKind,
    FieldName,
    HasTag,
    Not,
    NumberCompare,
    NumberField,
    TextField,
    TextListField,
    dump_condition,
    evaluate,
    fields_used,
    parse_condition,
)


def leaf(field: Any, op: str, value: Any = None) -> dict[str, Any]:
    return (
        {"field": field, "op": op} if op in NULL_OPS else {"field": field, "op": op, "value": value}
    )


def holds(obj: dict[str, Any], facts: dict[str, Any]) -> bool:
    return evaluate(parse_condition(obj), facts)


# --- the catalogue ------------------------------------------------------------------------


def test_the_catalogue_types_agree_with_fields() -> None:
    assert len(FIELDS) == 38
    literals: dict[FieldKind, Any] = {
        "number": NumberField,
        "decimal": DecimalField,
        "text": TextField,
        "text_list": TextListField,
        "bool": BoolField,
    }
    for kind, literal in literals.items():
        expected = {name for name, k in FIELDS.items() if k == kind}
        assert set(get_args(literal)) == expected == set(KIND_FIELDS[kind])
    assert set(get_args(FieldName)) == set(FIELDS)


# --- every op of every kind, true and false -----------------------------------------------

OP_CASES: list[tuple[dict[str, Any], Any, bool]] = [
    # decimal (the repurchase model's figures): whole or not, compared as doubles
    (leaf("customer.p_alive", "eq", 0.3), 0.3, True),
    (leaf("customer.p_alive", "eq", 0.3), 0.30000000000000004, False),
    (leaf("customer.p_alive", "ne", 0.3), 0.31, True),
    (leaf("customer.p_alive", "ne", 0.3), 0.3, False),
    (leaf("customer.p_alive", "lt", 0.3), 0.29, True),
    (leaf("customer.p_alive", "lt", 0.3), 0.3, False),
    (leaf("customer.p_alive", "lte", 0.3), 0.3, True),
    (leaf("customer.p_alive", "lte", 0.3), 0.5, False),
    (leaf("event.p_alive", "gt", 0), 0.01, True),
    (leaf("event.p_alive", "gt", 0), 0, False),
    (leaf("customer.expected_purchases_90d", "gte", 1), 1.0, True),
    (leaf("customer.expected_purchases_90d", "gte", 1), 0.99, False),
    (leaf("event.expected_purchases_90d", "between", [0.5, 2]), 2, True),
    (leaf("event.expected_purchases_90d", "between", [0.5, 2]), 0.4, False),
    (leaf("customer.p_alive", "is_null"), None, True),
    (leaf("customer.p_alive", "is_null"), 0.0, False),
    (leaf("customer.p_alive", "not_null"), 0.0, True),
    (leaf("customer.p_alive", "not_null"), None, False),
    # number
    (leaf("order.total_minor", "eq", 100), 100, True),
    (leaf("order.total_minor", "eq", 100), 101, False),
    (leaf("order.total_minor", "ne", 100), 101, True),
    (leaf("order.total_minor", "ne", 100), 100, False),
    (leaf("order.total_minor", "gt", 100), 101, True),
    (leaf("order.total_minor", "gt", 100), 100, False),
    (leaf("order.total_minor", "gte", 100), 100, True),
    (leaf("order.total_minor", "gte", 100), 99, False),
    (leaf("order.total_minor", "lt", 100), 99, True),
    (leaf("order.total_minor", "lt", 100), 100, False),
    (leaf("order.total_minor", "lte", 100), 100, True),
    (leaf("order.total_minor", "lte", 100), 101, False),
    (leaf("customer.recency_days", "lt", 0), -1, True),
    (leaf("customer.recency_days", "between", [-5, 5]), -5, True),
    (leaf("customer.recency_days", "between", [-5, 5]), 5, True),
    (leaf("customer.recency_days", "between", [-5, 5]), 6, False),
    (leaf("customer.recency_days", "between", [-5, 5]), -6, False),
    (leaf("event.age_hours", "between", [3, 3]), 3, True),
    (leaf("order.item_count", "in", [1, 3]), 3, True),
    (leaf("order.item_count", "in", [1, 3]), 2, False),
    (leaf("order.item_count", "not_in", [1, 3]), 2, True),
    (leaf("order.item_count", "not_in", [1, 3]), 1, False),
    (leaf("event.amount_minor", "eq", NUMBER_MAX), NUMBER_MAX, True),
    (leaf("event.amount_minor", "eq", -NUMBER_MAX), -NUMBER_MAX, True),
    # text
    (leaf("event.city", "eq", "杭州"), "杭州", True),
    (leaf("event.city", "eq", "Hangzhou"), "hangzhou", False),
    (leaf("event.city", "ne", "Hangzhou"), "hangzhou", True),
    (leaf("event.city", "ne", "Hangzhou"), "Hangzhou", False),
    (leaf("order.status", "in", ["paid", "shipped"]), "shipped", True),
    (leaf("order.status", "in", ["paid", "shipped"]), "Paid", False),
    (leaf("order.status", "not_in", ["paid", "shipped"]), "refunded", True),
    (leaf("order.status", "not_in", ["paid", "shipped"]), "paid", False),
    (leaf("event.sku", "starts_with", "SKU-"), "SKU-1", True),
    (leaf("event.sku", "starts_with", "SKU-"), "sku-1", False),
    (leaf("event.sku", "starts_with", "SKU-1"), "SKU-", False),
    (leaf("event.sku", "starts_with", ""), "", True),
    (leaf("customer.city", "eq", ""), "", True),
    # text_list
    (leaf("order.skus", "contains", "A"), ["B", "A"], True),
    (leaf("order.skus", "contains", "A"), ["a", "B"], False),
    (leaf("order.skus", "contains", "A"), [], False),
    (leaf("event.skus", "contains_any", ["A", "C"]), ["B", "C"], True),
    (leaf("event.skus", "contains_any", ["A", "C"]), ["B"], False),
    (leaf("event.skus", "contains_any", ["A"]), [], False),
    (leaf("customer.tags", "contains_none", ["vip", "gift"]), ["new"], True),
    (leaf("customer.tags", "contains_none", ["vip", "gift"]), [], True),
    (leaf("customer.tags", "contains_none", ["vip", "gift"]), ["new", "gift"], False),
    # bool
    (leaf("order.paid", "eq", True), True, True),
    (leaf("order.paid", "eq", True), False, False),
    (leaf("customer.has_email", "eq", False), False, True),
    (leaf("customer.has_email", "eq", False), True, False),
    # null checks, every kind
    (leaf("order.total_minor", "is_null"), 0, False),
    (leaf("order.total_minor", "not_null"), 0, True),
    (leaf("event.city", "is_null"), "", False),
    (leaf("event.city", "not_null"), "", True),
    (leaf("order.skus", "is_null"), [], False),
    (leaf("order.skus", "not_null"), [], True),
    (leaf("order.paid", "is_null"), False, False),
    (leaf("order.paid", "not_null"), False, True),
    (leaf("order.total_minor", "is_null"), None, True),
    (leaf("order.total_minor", "not_null"), None, False),
    (leaf("event.city", "is_null"), None, True),
    (leaf("event.city", "not_null"), None, False),
    (leaf("order.skus", "is_null"), None, True),
    (leaf("order.skus", "not_null"), None, False),
    (leaf("order.paid", "is_null"), None, True),
    (leaf("order.paid", "not_null"), None, False),
]


@pytest.mark.parametrize(("obj", "fact", "expected"), OP_CASES)
def test_every_op_of_every_kind(obj: dict[str, Any], fact: Any, expected: bool) -> None:
    assert holds(obj, {obj["field"]: fact}) is expected
    assert holds({"not": obj}, {obj["field"]: fact}) is not expected


def test_the_op_table_covers_every_op_of_every_kind() -> None:
    covered = {(FIELDS[obj["field"]], obj["op"], expected) for obj, _, expected in OP_CASES}
    for kind, ops in OPS.items():
        for op in (*ops, *NULL_OPS):
            assert {(kind, op, True), (kind, op, False)} <= covered, (kind, op)


# --- null semantics -----------------------------------------------------------------------

COMPARISONS = [obj for obj, _, _ in OP_CASES if obj["op"] not in NULL_OPS]


@pytest.mark.parametrize("obj", COMPARISONS)
@pytest.mark.parametrize("missing", ["absent", "none"])
def test_every_comparison_on_a_missing_fact_is_false(obj: dict[str, Any], missing: str) -> None:
    facts = {obj["field"]: None} if missing == "none" else {}
    assert holds(obj, facts) is False
    assert holds({"not": obj}, facts) is True
    assert holds(leaf(obj["field"], "is_null"), facts) is True
    assert holds(leaf(obj["field"], "not_null"), facts) is False


def test_ne_not_in_and_contains_none_are_false_on_a_missing_fact() -> None:
    for obj in (
        leaf("event.city", "ne", "X"),
        leaf("order.total_minor", "ne", 1),
        leaf("order.status", "not_in", ["X"]),
        leaf("order.item_count", "not_in", [1]),
        leaf("customer.tags", "contains_none", ["vip"]),
    ):
        assert holds(obj, {}) is False
        assert holds(obj, {obj["field"]: None}) is False
        assert holds({"not": obj}, {}) is True
    # neither eq nor ne
    city = {"any": [leaf("event.city", "eq", "X"), leaf("event.city", "ne", "X")]}
    assert holds(city, {}) is False
    assert holds(city, {"event.city": "Y"}) is True


def test_has_tag() -> None:
    vip = {"has_tag": "vip"}
    assert holds(vip, {"customer.tags": ["gift", "vip"]}) is True
    assert holds(vip, {"customer.tags": ["VIP"]}) is False
    assert holds(vip, {"customer.tags": []}) is False
    assert holds(vip, {}) is False
    assert holds({"not": vip}, {}) is True
    assert holds({"has_tag": "标签"}, {"customer.tags": ("标签",)}) is True


def test_nested_all_any_not() -> None:
    cond = {
        "all": [
            leaf("event.type", "eq", "order.paid"),
            {
                "any": [
                    leaf("order.total_minor", "gte", 10_000),
                    {"has_tag": "vip"},
                ]
            },
            {"not": leaf("customer.city", "in", ["北京", "上海"])},
        ]
    }
    base = {"event.type": "order.paid", "order.total_minor": 20_000, "customer.city": "杭州"}
    assert holds(cond, base) is True
    assert holds(cond, {**base, "event.type": "order.created"}) is False
    assert holds(cond, {**base, "order.total_minor": 9_999}) is False
    assert holds(cond, {**base, "order.total_minor": 9_999, "customer.tags": ["vip"]}) is True
    assert holds(cond, {**base, "customer.city": "上海"}) is False
    assert holds(cond, {**base, "customer.city": None}) is True  # not of a false comparison
    assert holds({"not": {"not": cond}}, base) is True
    assert holds({"all": [cond]}, base) is True
    assert holds({"any": [{"not": cond}, leaf("order.paid", "eq", True)]}, base) is False


def test_a_fact_of_the_wrong_type_is_a_type_error() -> None:
    for obj, fact in (
        (leaf("order.total_minor", "gt", 1), "2"),
        (leaf("order.total_minor", "gt", 1), True),
        (leaf("order.total_minor", "gt", 1), 2.5),
        (leaf("event.city", "eq", "X"), 1),
        (leaf("order.skus", "contains", "X"), "X"),
        (leaf("order.skus", "contains", "X"), [1]),
        (leaf("order.paid", "eq", True), 1),
        ({"has_tag": "vip"}, "vip"),
    ):
        field = obj.get("field", "customer.tags")
        with pytest.raises(TypeError, match=field):
            holds(obj, {field: fact})


def test_fields_used() -> None:
    cond = parse_condition(
        {
            "all": [
                leaf("event.type", "eq", "x"),
                {"not": {"any": [{"has_tag": "vip"}, leaf("order.paid", "is_null")]}},
                leaf("event.type", "ne", "y"),
            ]
        }
    )
    assert fields_used(cond) == {"event.type", "customer.tags", "order.paid"}
    assert fields_used(parse_condition(leaf("order.skus", "contains_any", ["a"]))) == {"order.skus"}


# --- validation errors at the exact path --------------------------------------------------

GOOD = leaf("order.total_minor", "gt", 100)


def nots(n: int, inner: dict[str, Any]) -> dict[str, Any]:
    for _ in range(n):
        inner = {"not": inner}
    return inner


BAD: list[tuple[object, tuple[str | int, ...], str]] = [
    # wrong value type, bools and floats for ints, strings for numbers
    ({"all": [leaf("order.total_minor", "gt", "x")]}, ("all", 0, "value"), "int_type"),
    (leaf("order.total_minor", "gt", "3"), ("value",), "int_type"),
    (leaf("order.total_minor", "gt", True), ("value",), "int_type"),
    (leaf("order.total_minor", "eq", 3.0), ("value",), "int_type"),
    (leaf("order.total_minor", "eq", 3.5), ("value",), "int_type"),
    (leaf("order.total_minor", "in", [1, False]), ("value", 1), "int_type"),
    (leaf("order.total_minor", "between", [1.0, 2]), ("value", 0), "int_type"),
    (leaf("order.total_minor", "between", 5), ("value",), "tuple_type"),
    (leaf("order.total_minor", "between", [1]), ("value", 1), "missing"),
    (leaf("order.total_minor", "between", [1, 2, 3]), ("value",), "too_long"),
    (leaf("order.total_minor", "in", 1), ("value",), "list_type"),
    (leaf("event.city", "eq", 1), ("value",), "string_type"),
    (leaf("event.city", "in", ["a", 1]), ("value", 1), "string_type"),
    (leaf("order.skus", "contains", ["a"]), ("value",), "string_type"),
    (leaf("order.paid", "eq", 1), ("value",), "bool_type"),
    (leaf("order.paid", "eq", "true"), ("value",), "bool_type"),
    ({"has_tag": 1}, ("has_tag",), "string_type"),
    # out of bounds
    (leaf("order.total_minor", "gt", NUMBER_MAX + 1), ("value",), "less_than_equal"),
    (leaf("order.total_minor", "gt", -NUMBER_MAX - 1), ("value",), "greater_than_equal"),
    (
        leaf("customer.recency_days", "between", [0, NUMBER_MAX + 1]),
        ("value", 1),
        "less_than_equal",
    ),
    (leaf("order.item_count", "in", [1, 10**16]), ("value", 1), "less_than_equal"),
    (leaf("event.city", "eq", "x" * (TEXT_MAX + 1)), ("value",), "string_too_long"),
    (leaf("event.city", "in", ["ok", "x" * (TEXT_MAX + 1)]), ("value", 1), "string_too_long"),
    ({"has_tag": "x" * (TEXT_MAX + 1)}, ("has_tag",), "string_too_long"),
    (leaf("event.city", "in", []), ("value",), "too_short"),
    (leaf("event.city", "in", ["x"] * (LIST_MAX + 1)), ("value",), "too_long"),
    (leaf("order.item_count", "not_in", []), ("value",), "too_short"),
    (leaf("order.item_count", "in", list(range(LIST_MAX + 1))), ("value",), "too_long"),
    (leaf("order.skus", "contains_any", []), ("value",), "too_short"),
    (leaf("order.skus", "contains_none", ["x"] * (LIST_MAX + 1)), ("value",), "too_long"),
    # between lo > hi
    (leaf("order.total_minor", "between", [5, 4]), ("value",), "condition_between"),
    (
        {"any": [GOOD, {"not": leaf("event.age_hours", "between", [1, -1])}]},
        ("any", 1, "not", "value"),
        "condition_between",
    ),
    # control characters (and lone surrogates)
    (leaf("event.city", "eq", "a\x00b"), ("value",), "condition_text"),
    (leaf("event.city", "eq", "a\nb"), ("value",), "condition_text"),
    (leaf("event.city", "eq", "\x1f"), ("value",), "condition_text"),
    (leaf("event.city", "eq", "\x7f"), ("value",), "condition_text"),
    (leaf("event.city", "starts_with", "\ud800"), ("value",), "string_unicode"),
    (leaf("event.city", "not_in", ["ok", "\t"]), ("value", 1), "condition_text"),
    (leaf("order.skus", "contains", "\r"), ("value",), "condition_text"),
    ({"all": [GOOD, {"has_tag": "v\x01"}]}, ("all", 1, "has_tag"), "condition_text"),
    # unknown field, unknown op for the field's kind
    ({"all": [leaf("order.nope", "gt", 1)]}, ("all", 0, "field"), "condition_field"),
    (leaf(["order.total_minor"], "gt", 1), ("field",), "condition_field"),
    ({"field": {}, "op": "is_null"}, ("field",), "condition_field"),
    (leaf("order.total_minor", "contains", "x"), ("op",), "condition_op"),
    (leaf("order.total_minor", "starts_with", "x"), ("op",), "condition_op"),
    (leaf("event.city", "gt", 1), ("op",), "condition_op"),
    (leaf("event.city", "between", [1, 2]), ("op",), "condition_op"),
    (leaf("order.skus", "eq", "x"), ("op",), "condition_op"),
    (leaf("order.skus", "in", ["x"]), ("op",), "condition_op"),
    (leaf("order.paid", "ne", True), ("op",), "condition_op"),
    (leaf("order.paid", "EQ", True), ("op",), "condition_op"),
    ({"field": "order.paid", "op": ["eq"], "value": True}, ("op",), "condition_op"),
    ({"not": {"field": "order.paid", "op": None, "value": True}}, ("not", "op"), "condition_op"),
    # missing and extra keys
    ({"field": "order.paid", "op": "eq"}, ("value",), "missing"),
    ({"field": "order.total_minor", "value": 1}, ("op",), "missing"),
    ({"field": "order.paid", "op": "is_null", "value": True}, ("value",), "extra_forbidden"),
    ({**GOOD, "note": "x"}, ("note",), "extra_forbidden"),
    ({"has_tag": "vip", "value": "x"}, ("value",), "extra_forbidden"),
    ({"all": [GOOD], "any": [GOOD]}, ("any",), "extra_forbidden"),
    ({"not": GOOD, "AllOf": 1}, ("AllOf",), "extra_forbidden"),
    ({"all": [{"not": GOOD, "field": "x"}]}, ("all", 0, "field"), "extra_forbidden"),
    # combinators
    ({"all": []}, ("all",), "too_short"),
    ({"any": [GOOD, {"any": []}]}, ("any", 1, "any"), "too_short"),
    ({"all": GOOD}, ("all",), "list_type"),
    ({"not": [GOOD]}, ("not",), "condition_shape"),
    ({"not": None}, ("not",), "condition_shape"),
    ({}, (), "condition_shape"),
    ({"foo": 1}, (), "condition_shape"),
    ([GOOD], (), "condition_shape"),
    ("all", (), "condition_shape"),
    (None, (), "condition_shape"),
    ({"all": [GOOD, 3]}, ("all", 1), "condition_shape"),
    # depth (counting the leaf) and size
    (nots(MAX_DEPTH, GOOD), ("not",) * MAX_DEPTH, "condition_too_deep"),
    (
        {"all": [GOOD, nots(MAX_DEPTH - 1, {"any": [GOOD]})]},
        ("all", 1, *("not",) * (MAX_DEPTH - 1)),
        "condition_too_deep",
    ),
    ({"all": [GOOD] * MAX_NODES}, ("all", MAX_NODES - 1), "condition_too_large"),
    (
        {"any": [{"all": [GOOD] * 60}, {"all": [GOOD] * 60}]},
        ("any", 1, "all", MAX_NODES - 63),
        "condition_too_large",
    ),
]


def errors_of(exc: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    return [(tuple(e["loc"]), e["type"]) for e in exc.errors()]


@pytest.mark.parametrize(("obj", "loc", "kind"), BAD)
def test_bad_input_is_refused_at_its_exact_path(
    obj: object, loc: tuple[str | int, ...], kind: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_condition(obj)
    assert errors_of(caught.value) == [(loc, kind)]
    assert caught.value.title == "Condition"


class Step(BaseModel):
    name: str
    if_: Condition


@pytest.mark.parametrize(("obj", "loc", "kind"), BAD)
def test_bad_input_in_a_field_is_refused_at_the_field_name_and_path(
    obj: object, loc: tuple[str | int, ...], kind: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Step.model_validate({"name": "s", "if_": obj})
    assert errors_of(caught.value) == [(("if_", *loc), kind)]


def test_the_limits_themselves_are_accepted() -> None:
    deepest = nots(MAX_DEPTH - 1, GOOD)
    assert dump_condition(parse_condition(deepest)) == deepest
    largest = {"all": [GOOD] * (MAX_NODES - 1)}
    assert dump_condition(parse_condition(largest)) == largest
    edges = {
        "all": [
            leaf("order.total_minor", "between", [-NUMBER_MAX, NUMBER_MAX]),
            leaf("event.city", "in", ["x" * TEXT_MAX] * LIST_MAX),
            {"has_tag": ""},
        ]
    }
    assert dump_condition(parse_condition(edges)) == edges
    # two conditions in one model each have their own budget
    two = TypeAdapter(tuple[Condition, Condition]).validate_python((largest, largest))
    assert len(two) == 2


def test_messages_name_the_known_fields_and_ops() -> None:
    with pytest.raises(ValidationError) as caught:
        Step.model_validate({"name": "s", "if_": {"all": [leaf("order.nope", "gt", 1)]}})
    [error] = caught.value.errors()
    assert error["loc"] == ("if_", "all", 0, "field")
    assert "order.nope" in error["msg"]
    assert all(name in error["msg"] for name in FIELDS)
    with pytest.raises(ValidationError) as caught:
        parse_condition(leaf("order.paid", "gt", 1))
    [error] = caught.value.errors()
    assert error["msg"] == (
        "op 'gt' does not apply to bool field 'order.paid'; ops are eq, is_null, not_null"
    )


def test_several_errors_each_at_its_path() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_condition(
            {
                "any": [
                    leaf("order.total_minor", "gt", 1.5),
                    {"not": {"all": [GOOD, {"has_tag": 7}]}},
                    leaf("order.nope", "eq", 1),
                ]
            }
        )
    assert errors_of(caught.value) == [
        (("any", 0, "value"), "int_type"),
        (("any", 1, "not", "all", 1, "has_tag"), "string_type"),
        (("any", 2, "field"), "condition_field"),
    ]


def test_trees_built_in_python_are_held_to_the_limits() -> None:
    base = parse_condition(GOOD)
    deep: Condition = base
    for _ in range(MAX_DEPTH - 1):
        deep = Not(not_=deep)
    with pytest.raises(ValidationError) as caught:
        Not(not_=deep)
    assert [e["type"] for e in caught.value.errors()] == ["condition_too_deep"]
    with pytest.raises(ValidationError) as caught:
        AllOf(all=[base] * MAX_NODES)
    assert [e["type"] for e in caught.value.errors()] == ["condition_too_large"]
    big = AllOf(all=[base] * (MAX_NODES - 1))
    with pytest.raises(ValidationError) as caught:
        parse_condition({"any": [big]})  # parts already built count too
    assert errors_of(caught.value) == [(("any", 0), "condition_too_large")]
    with pytest.raises(ValidationError) as caught:
        NumberCompare(field="event.city", op="eq", value=1)
    assert errors_of(caught.value) == [(("field",), "literal_error")]


# --- round trips, schema ------------------------------------------------------------------

ROUND_TRIPS: list[dict[str, Any]] = [
    *(obj for obj, _, _ in OP_CASES),
    {"has_tag": "vip"},
    {"not": {"any": [{"has_tag": "a"}, {"all": [GOOD, leaf("order.paid", "not_null")]}]}},
]


@pytest.mark.parametrize("obj", ROUND_TRIPS)
def test_dump_and_parse_round_trip(obj: dict[str, Any]) -> None:
    parsed = parse_condition(obj)
    dumped = dump_condition(parsed)
    assert dumped == obj
    assert parse_condition(dumped) == parsed
    assert Step.model_validate({"name": "s", "if_": obj}).model_dump(mode="json") == {
        "name": "s",
        "if_": obj,
    }


def test_parse_takes_conditions_already_built() -> None:
    tag = HasTag(has_tag="vip")
    assert parse_condition(tag) is tag
    assert dump_condition(parse_condition({"not": tag})) == {"not": {"has_tag": "vip"}}


SCHEMA = Draft202012Validator(TypeAdapter(Condition).json_schema())
SCHEMALESS = {
    "condition_between",
    "condition_too_deep",
    "condition_too_large",
    "string_unicode",  # a pattern sees code points, a lone surrogate is one
}
"""What the JSON schema cannot say."""


def integral_float(obj: object) -> bool:
    """Holds 3.0, which JSON Schema counts as an integer (the validation refuses it)."""
    if isinstance(obj, dict):
        return any(integral_float(v) for v in obj.values())
    if isinstance(obj, list):
        return any(integral_float(v) for v in obj)
    return isinstance(obj, float) and obj.is_integer()


@pytest.mark.parametrize("obj", ROUND_TRIPS)
def test_the_json_schema_takes_valid_conditions(obj: dict[str, Any]) -> None:
    SCHEMA.validate(obj)


@pytest.mark.parametrize(
    ("obj", "kind"),
    [(obj, kind) for obj, _, kind in BAD if kind not in SCHEMALESS and not integral_float(obj)],
)
def test_the_json_schema_refuses_what_it_can(obj: object, kind: str) -> None:
    assert not SCHEMA.is_valid(obj), kind


def test_the_condition_is_in_the_openapi_document() -> None:
    app = FastAPI()

    @app.post("/steps")
    def create(step: Step) -> None:
        return None

    schemas = app.openapi()["components"]["schemas"]
    assert schemas["Step"]["properties"]["if_"]["oneOf"]
    assert {"AllOf", "Not", "NumberBetween", "NullCheck", "HasTag"} <= set(schemas)
    assert schemas["NumberCompare"]["properties"]["value"]["maximum"] == NUMBER_MAX


# --- evaluation against an independent reference ------------------------------------------

NUMBERS = st.one_of(st.integers(-3, 3), st.sampled_from([NUMBER_MAX, -NUMBER_MAX]))
TEXTS = st.sampled_from(["", "a", "ab", "abc", "A", "b", "杭州"])
TEXT_LISTS = st.lists(TEXTS, min_size=1, max_size=4)
DECIMALS = st.one_of(
    st.sampled_from([0, 0.3, 0.30000000000000004, 1, 1.5, -2.25]),
    st.floats(-3, 3, allow_nan=False),
)
VALUES = {
    "number": NUMBERS,
    "decimal": DECIMALS,
    "text": TEXTS,
    "text_list": st.lists(TEXTS, max_size=4),
    "bool": st.booleans(),
}


@st.composite
def leaves(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.integers(0, 9)) == 0:
        return {"has_tag": draw(TEXTS)}
    field = draw(st.sampled_from(sorted(FIELDS)))
    kind = FIELDS[field]
    op = draw(st.sampled_from((*OPS[kind], *NULL_OPS)))
    if op in NULL_OPS:
        return {"field": field, "op": op}
    value: Any
    if op == "between":
        drawn = DECIMALS if kind == "decimal" else NUMBERS
        lo, hi = sorted((draw(drawn), draw(drawn)))
        value = [lo, hi]
    elif op in ("in", "not_in") and kind == "number":
        value = draw(st.lists(NUMBERS, min_size=1, max_size=4))
    elif op in ("in", "not_in", "contains_any", "contains_none"):
        value = draw(TEXT_LISTS)
    elif kind == "bool":
        value = draw(st.booleans())
    elif kind == "number":
        value = draw(NUMBERS)
    elif kind == "decimal":
        value = draw(DECIMALS)
    else:
        value = draw(TEXTS)
    return {"field": field, "op": op, "value": value}


def trees(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    if depth == 1:
        return leaves()
    sub = trees(depth - 1)
    return st.one_of(
        leaves(),
        st.lists(sub, min_size=1, max_size=3).map(lambda cs: {"all": cs}),
        st.lists(sub, min_size=1, max_size=3).map(lambda cs: {"any": cs}),
        sub.map(lambda c: {"not": c}),
    )


@st.composite
def fact_sets(draw: st.DrawFn) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for field, kind in FIELDS.items():
        state = draw(st.sampled_from(["absent", "none", "value", "value"]))
        if state == "none":
            facts[field] = None
        elif state == "value":
            facts[field] = draw(VALUES[kind])
    return facts


def reference(cond: dict[str, Any], facts: dict[str, Any]) -> bool:
    """The semantics written out once more, over the JSON itself."""
    if "all" in cond:
        return all(reference(c, facts) for c in cond["all"])
    if "any" in cond:
        return any(reference(c, facts) for c in cond["any"])
    if "not" in cond:
        return not reference(cond["not"], facts)
    if "has_tag" in cond:
        cond = {"field": "customer.tags", "op": "contains", "value": cond["has_tag"]}
    x: Any = facts.get(cond["field"])
    op: str = cond["op"]
    v: Any = cond.get("value")
    if op == "is_null":
        return x is None
    if op == "not_null":
        return x is not None
    if x is None:
        return False
    if op == "eq":
        return bool(x == v)
    if op == "ne":
        return bool(x != v)
    if op in ("gt", "gte", "lt", "lte"):
        return bool({"gt": x > v, "gte": x >= v, "lt": x < v, "lte": x <= v}[op])
    if op == "between":
        return bool(v[0] <= x and x <= v[1])
    if op == "in":
        return any(x == item for item in v)
    if op == "not_in":
        return all(x != item for item in v)
    if op == "starts_with":
        return bool(x[: len(v)] == v)
    if op == "contains":
        return any(item == v for item in x)
    overlap = [item for item in v if item in x]
    return bool(overlap) if op == "contains_any" else not overlap


property_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@property_settings
@given(leaves(), fact_sets())
def test_leaves_evaluate_as_the_reference(cond: dict[str, Any], facts: dict[str, Any]) -> None:
    parsed = parse_condition(cond)
    assert evaluate(parsed, facts) is reference(cond, facts)
    assert evaluate(Not(not_=parsed), facts) is not reference(cond, facts)


@property_settings
@given(trees(4), fact_sets())
def test_trees_evaluate_as_the_reference_and_round_trip(
    cond: dict[str, Any], facts: dict[str, Any]
) -> None:
    parsed = parse_condition(cond)
    assert evaluate(parsed, facts) is reference(cond, facts)
    assert dump_condition(parsed) == cond
    assert SCHEMA.is_valid(cond)

"""The rule language: Python evaluation equals the SQL on SQLite and PostgreSQL (for any
64-bit numbers, as rules stored before the bounds may hold), validation errors name the
failing part, new rules are held to the bounds their JSON schema states, and recency
thresholds are exactly where truth can flip."""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.lifecycle.models import customer_tags, customers, metadata
from services.lifecycle.rules import (
    AMOUNT_MAX,
    DEFAULT_LEVEL_ORDER,
    EXPECTED_PURCHASES_MAX,
    RECENCY_DAYS_MAX,
    AllOf,
    CustomerFacts,
    HasTag,
    Not,
    Rule,
    dump_rule,
    evaluate,
    facts_from_row,
    parse_rule,
    recency_thresholds,
    to_sql,
)
from services.lifecycle.stages import STAGES
from tests.servers import fresh_database

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
TAGS = ("vip", "gift", "wholesale", "标签")
LEVELS = ("VIP1", "VIP2", "VIP3", "GOLD")
TEXTS: dict[str, tuple[str, ...]] = {
    "stage": STAGES,
    "member_level": LEVELS,
    "city": ("杭州", "Hangzhou", "hangzhou", ""),
    "province": ("浙江", "Zhejiang"),
    "source": ("taobao", "douyin", "wechat"),
}

# --- strategies ---------------------------------------------------------------------------

small_ints = st.integers(-2, 12)
numeric_values = {
    "frequency": small_ints,
    "item_count": small_ints,
    "monetary_minor": st.sampled_from([-1, 0, 1, 99_999, 100_000, 100_001, 2**40, -(2**63)]),
    "aov_minor": st.sampled_from([0, 500, 1000, 2**63 - 1]),
    "recency_days": st.one_of(
        st.integers(-3, 40),
        st.sampled_from([10**6, -(10**6), 10**9, -(10**9), 2**63 - 1, -(2**63)]),
    ),
}


bounded_values = {
    "frequency": st.integers(0, 12),
    "item_count": st.integers(0, 12),
    "monetary_minor": st.sampled_from([0, 1, 99_999, 100_000, 2**40, AMOUNT_MAX]),
    "aov_minor": st.sampled_from([0, 500, AMOUNT_MAX]),
    "recency_days": st.one_of(
        st.integers(-3, 40), st.sampled_from([RECENCY_DAYS_MAX, -RECENCY_DAYS_MAX])
    ),
}
"""Numbers within the bounds a new rule is held to, the bounds themselves included."""

PREDICTIONS: dict[str, tuple[float, ...]] = {
    "p_alive": (
        0,
        1,
        0.0,
        5e-324,
        0.1 + 0.2,
        math.nextafter(0.5, 0),
        0.5,
        math.nextafter(0.5, 1),
        math.nextafter(1, 0),
        1.0,
    ),
    "expected_purchases_90d": (
        0,
        3,
        0.0,
        0.1 + 0.2,
        math.nextafter(3, 0),
        3.0,
        math.nextafter(3, 4),
        90.0,
        EXPECTED_PURCHASES_MAX,
    ),
}
"""Prediction values, always within their bounds (for stored rules too): ints and floats,
the bounds, and values a double's step either side of each other."""


@st.composite
def numeric_leaf(
    draw: st.DrawFn,
    fields: tuple[str, ...] = tuple(numeric_values),
    values_of: dict[str, st.SearchStrategy[int]] = numeric_values,
) -> dict[str, Any]:
    field = draw(st.sampled_from(fields))
    values = values_of[field]
    if draw(st.booleans()):
        op = draw(st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte"]))
        return {"field": field, "op": op, "value": draw(values)}
    lo, hi = sorted([draw(values), draw(values)])
    return {"field": field, "op": "between", "value": [lo, hi]}


@st.composite
def text_leaf(draw: st.DrawFn) -> dict[str, Any]:
    field = draw(st.sampled_from(sorted(TEXTS)))
    values = st.sampled_from(TEXTS[field])
    op = draw(st.sampled_from(["eq", "ne", "in", "not_in", "is_null", "not_null"]))
    if op in ("is_null", "not_null"):
        return {"field": draw(st.sampled_from([field, "recency_days"])), "op": op}
    if op in ("in", "not_in"):
        return {"field": field, "op": op, "value": draw(st.lists(values, min_size=1, max_size=3))}
    return {"field": field, "op": op, "value": draw(values)}


@st.composite
def prediction_leaf(draw: st.DrawFn) -> dict[str, Any]:
    field = draw(st.sampled_from(sorted(PREDICTIONS)))
    values = st.sampled_from(PREDICTIONS[field])
    op = draw(st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte", "between", "is_null"]))
    if op == "is_null":
        return {"field": field, "op": draw(st.sampled_from(["is_null", "not_null"]))}
    if op == "between":
        return {"field": field, "op": op, "value": sorted([draw(values), draw(values)])}
    return {"field": field, "op": op, "value": draw(values)}


def leaves(values_of: dict[str, st.SearchStrategy[int]]) -> st.SearchStrategy[dict[str, Any]]:
    recency_leaf = numeric_leaf(("recency_days",), values_of)
    return st.one_of(
        prediction_leaf(),
        recency_leaf,
        numeric_leaf(tuple(values_of), values_of),
        text_leaf(),
        recency_leaf,
        st.builds(lambda v: {"field": "returning", "op": "eq", "value": v}, st.booleans()),
        text_leaf(),
        st.builds(lambda t: {"has_tag": t}, st.sampled_from(TAGS)),
        recency_leaf,
        st.builds(lambda lv: {"member_level_at_least": lv}, st.sampled_from(LEVELS)),
    )


def rules_json(
    values_of: dict[str, st.SearchStrategy[int]] = numeric_values,
) -> st.SearchStrategy[dict[str, Any]]:
    """Rule JSON with a combinator on top, at most 4 deep and 40 nodes (within the limits);
    recency leaves and `not` come often. Numbers from `values_of` (by default any 64-bit
    ones, as a stored rule may hold; `bounded_values` for rules the API accepts now)."""

    def compound(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        parts = st.lists(inner, min_size=1, max_size=3)
        return st.one_of(
            st.builds(lambda r: {"not": r}, inner),
            st.builds(lambda rs: {"all": rs}, parts),
            st.builds(lambda rs: {"any": rs}, parts),
        )

    leaf = leaves(values_of)
    strategy: st.SearchStrategy[dict[str, Any]] = leaf
    for _ in range(2):
        strategy = st.one_of(leaf, compound(strategy))
    return compound(strategy)


def optional(values: tuple[str, ...]) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), st.sampled_from(values))


# Last orders at whole-day distances from NOW, exactly or a microsecond either side.
last_orders = st.one_of(
    st.none(),
    st.builds(
        lambda days, jitter: NOW - days * DAY + jitter,
        st.integers(-3, 40),
        st.sampled_from(
            [timedelta(0), timedelta(microseconds=1), -timedelta(microseconds=1), DAY / 2]
        ),
    ),
)

facts_strategy = st.builds(
    CustomerFacts,
    frequency=st.integers(0, 10),
    monetary_minor=st.sampled_from([0, 1, 99_999, 100_000, 100_001, 2**40]),
    aov_minor=st.sampled_from([0, 500, 1000]),
    item_count=st.integers(0, 10),
    last_order_at=last_orders,
    stage=st.sampled_from(STAGES),
    member_level=optional(LEVELS),
    city=optional(TEXTS["city"]),
    province=optional(TEXTS["province"]),
    source=optional(TEXTS["source"]),
    returning=st.booleans(),
    tags=st.frozensets(st.sampled_from(TAGS), max_size=3),
    p_alive=st.one_of(st.none(), st.sampled_from([float(v) for v in PREDICTIONS["p_alive"]])),
    expected_purchases_90d=st.one_of(
        st.none(), st.sampled_from([float(v) for v in PREDICTIONS["expected_purchases_90d"]])
    ),
)

# `now` exactly NOW or a microsecond either side, in UTC or in UTC+8.
nows = st.builds(
    lambda jitter, tz: (NOW + jitter).astimezone(tz),
    st.sampled_from([timedelta(0), timedelta(microseconds=1), -timedelta(microseconds=1)]),
    st.sampled_from([UTC, timezone(timedelta(hours=8))]),
)
level_orders = st.sampled_from([DEFAULT_LEVEL_ORDER, ("VIP3", "VIP2", "VIP1"), ("GOLD", "VIP1")])

# --- databases ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AsyncEngine]:
    path: Path = tmp_path_factory.mktemp("rules") / "rules.db"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all, tables=[customers, customer_tags])
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
async def pg_engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(await fresh_database(pg_url))
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all, tables=[customers, customer_tags])
    yield engine
    await engine.dispose()


def row(shop: str, customer_id: str, f: CustomerFacts) -> dict[str, Any]:
    return {
        "shop_id": shop,
        "customer_id": customer_id,
        "first_seen_at": NOW - 400 * DAY,
        "frequency": f.frequency,
        "monetary_minor": f.monetary_minor,
        "aov_minor": f.aov_minor,
        "item_count": f.item_count,
        "last_order_at": f.last_order_at,
        "stage": f.stage,
        "member_level": f.member_level,
        "city": f.city,
        "province": f.province,
        "source": f.source,
        "is_returning": f.returning,
        "p_alive": f.p_alive,
        "expected_purchases_90d": f.expected_purchases_90d,
    }


def with_boundaries(
    population: list[CustomerFacts], rule_json: dict[str, Any], now: datetime
) -> list[CustomerFacts]:
    """The population plus customers whose last order lies exactly at, or a microsecond
    either side of, each instant where the rule's recency comparisons flip."""
    extra = [
        replace(f, last_order_at=now - n * DAY + timedelta(microseconds=us))
        for n in recency_thresholds(parse_rule(rule_json))
        if abs(n) <= 1000
        for us in (-1, 0, 1)
        for f in population[:1]
    ]
    return population + extra


async def matching_in_db(
    engine: AsyncEngine,
    population: list[CustomerFacts],
    decoy_tags: frozenset[str],
    rule_json: dict[str, Any],
    now: datetime,
    level_order: tuple[str, ...],
) -> set[str]:
    """Ids the SQL selects in shop s1 (another shop tags the same ids with `decoy_tags`)."""
    rule = parse_rule(rule_json)
    async with engine.connect() as conn, conn.begin() as tx:
        await conn.execute(delete(customer_tags))
        await conn.execute(delete(customers))
        ids = [f"c{i}" for i in range(len(population))]
        await conn.execute(
            customers.insert(),
            [row("s1", i, f) for i, f in zip(ids, population, strict=True)]
            + [row("s2", "other", population[0])],
        )
        tag_rows = [
            {"shop_id": shop, "customer_id": i, "tag": tag, "assigned_at": NOW}
            for i, f in zip(ids, population, strict=True)
            for shop, tags in (("s1", f.tags), ("s2", decoy_tags))
            for tag in tags
        ]
        if tag_rows:
            await conn.execute(customer_tags.insert(), tag_rows)
        # The rows read back give the same facts (the stored times are exact).
        stored = (await conn.execute(select(customers).where(customers.c.shop_id == "s1"))).all()
        by_id = {r.customer_id: r for r in stored}
        for i, f in zip(ids, population, strict=True):
            assert facts_from_row(by_id[i]._mapping, f.tags) == f
        query = select(customers.c.customer_id).where(
            customers.c.shop_id == "s1", to_sql(rule, now, level_order)
        )
        found = set((await conn.execute(query)).scalars())
        await tx.rollback()
    return found


def matching_in_python(
    population: list[CustomerFacts],
    rule_json: dict[str, Any],
    now: datetime,
    level_order: tuple[str, ...],
) -> set[str]:
    rule = parse_rule(rule_json)
    return {f"c{i}" for i, f in enumerate(population) if evaluate(rule, f, now, level_order)}


property_settings = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@property_settings
@given(
    population=st.lists(facts_strategy, min_size=1, max_size=8),
    decoy_tags=st.frozensets(st.sampled_from(TAGS)),
    rule_json=rules_json(),
    now=nows,
    level_order=level_orders,
)
async def test_sql_equals_python_on_sqlite(
    sqlite_engine: AsyncEngine,
    population: list[CustomerFacts],
    decoy_tags: frozenset[str],
    rule_json: dict[str, Any],
    now: datetime,
    level_order: tuple[str, ...],
) -> None:
    population = with_boundaries(population, rule_json, now)
    expected = matching_in_python(population, rule_json, now, level_order)
    found = await matching_in_db(sqlite_engine, population, decoy_tags, rule_json, now, level_order)
    assert found == expected


@property_settings
@given(
    population=st.lists(facts_strategy, min_size=1, max_size=8),
    decoy_tags=st.frozensets(st.sampled_from(TAGS)),
    rule_json=rules_json(),
    now=nows,
    level_order=level_orders,
)
async def test_sql_equals_python_on_postgres(
    pg_engine: AsyncEngine,
    population: list[CustomerFacts],
    decoy_tags: frozenset[str],
    rule_json: dict[str, Any],
    now: datetime,
    level_order: tuple[str, ...],
) -> None:
    population = with_boundaries(population, rule_json, now)
    expected = matching_in_python(population, rule_json, now, level_order)
    found = await matching_in_db(pg_engine, population, decoy_tags, rule_json, now, level_order)
    assert found == expected


@settings(max_examples=150, deadline=None)
@given(rules_json())
def test_dump_reads_back_as_given(rule_json: dict[str, Any]) -> None:
    assert dump_rule(parse_rule(rule_json)) == rule_json


# --- semantics ----------------------------------------------------------------------------


def facts(**overrides: Any) -> CustomerFacts:
    base: dict[str, Any] = {
        "frequency": 2,
        "monetary_minor": 300_000,
        "aov_minor": 150_000,
        "item_count": 3,
        "last_order_at": NOW - 10 * DAY,
        "stage": "active",
        "member_level": "VIP1",
        "city": "杭州",
        "province": "浙江",
        "source": "taobao",
        "returning": True,
        "tags": frozenset({"vip"}),
    }
    base.update(overrides)
    return CustomerFacts(**base)


def holds(rule_json: dict[str, Any], f: CustomerFacts, now: datetime = NOW) -> bool:
    return evaluate(parse_rule(rule_json), f, now)


def test_recency_is_whole_days_since_the_last_order() -> None:
    at_10 = {"field": "recency_days", "op": "eq", "value": 10}
    assert holds(at_10, facts(last_order_at=NOW - 10 * DAY))
    assert holds(at_10, facts(last_order_at=NOW - 11 * DAY + timedelta(microseconds=1)))
    assert not holds(at_10, facts(last_order_at=NOW - 11 * DAY))
    assert not holds(at_10, facts(last_order_at=NOW - 10 * DAY + timedelta(microseconds=1)))
    assert holds({"field": "recency_days", "op": "eq", "value": -1}, facts(last_order_at=NOW + DAY))


def test_comparisons_on_missing_values_are_false_and_not_negates_them() -> None:
    never = facts(frequency=0, last_order_at=None, city=None, member_level=None)
    for rule_json in (
        {"field": "recency_days", "op": "ne", "value": 5},
        {"field": "recency_days", "op": "lt", "value": 10**6},
        {"field": "recency_days", "op": "between", "value": [-(2**63), 2**63 - 1]},
        {"field": "city", "op": "ne", "value": "杭州"},
        {"field": "city", "op": "not_in", "value": ["杭州"]},
        {"member_level_at_least": "VIP1"},
    ):
        assert not holds(rule_json, never)
        assert holds({"not": rule_json}, never)
    assert holds({"field": "recency_days", "op": "is_null"}, never)
    assert holds({"field": "city", "op": "is_null"}, never)
    assert not holds({"field": "city", "op": "not_null"}, never)


def test_member_level_at_least_follows_the_given_order() -> None:
    rule = parse_rule({"member_level_at_least": "VIP2"})
    assert not evaluate(rule, facts(member_level="VIP1"), NOW)
    assert evaluate(rule, facts(member_level="VIP3"), NOW)
    assert evaluate(rule, facts(member_level="VIP1"), NOW, ("VIP3", "VIP2", "VIP1"))
    assert not evaluate(rule, facts(member_level="VIP3"), NOW, ("VIP1", "VIP3"))  # unknown level


def test_naive_now_is_refused() -> None:
    rule = parse_rule({"has_tag": "vip"})
    with pytest.raises(ValueError):
        evaluate(rule, facts(), NOW.replace(tzinfo=None))
    with pytest.raises(ValueError):
        to_sql(rule, NOW.replace(tzinfo=None))


# --- validation ---------------------------------------------------------------------------


def errors_of(obj: object) -> list[tuple[str, tuple[int | str, ...]]]:
    with pytest.raises(ValidationError) as exc:
        parse_rule(obj)
    return [(e["type"], tuple(e["loc"])) for e in exc.value.errors()]


def leaf(value: int = 1) -> dict[str, Any]:
    return {"field": "frequency", "op": "gte", "value": value}


def nested(depth: int) -> dict[str, Any]:
    rule: dict[str, Any] = leaf()
    for _ in range(depth - 1):
        rule = {"not": rule}
    return rule


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"field": "spend", "op": "gt", "value": 1}, [("rule_field", ("field",))]),
        ({"field": 7, "op": "gt", "value": 1}, [("rule_field", ("field",))]),
        ({"field": "frequency", "op": "in", "value": 1}, [("rule_op", ("op",))]),
        ({"field": "frequency", "op": "is_null"}, [("rule_op", ("op",)), ("missing", ("value",))]),
        ({"field": "city", "op": "gt", "value": "x"}, [("rule_op", ("op",))]),
        ({"field": "frequency", "op": "gt", "value": "1"}, [("int_type", ("value",))]),
        ({"field": "frequency", "op": "gt", "value": 1.0}, [("int_type", ("value",))]),
        ({"field": "frequency", "op": "gt", "value": True}, [("int_type", ("value",))]),
        ({"field": "frequency", "op": "gt", "value": 2**63}, [("less_than_equal", ("value",))]),
        ({"field": "frequency", "op": "between", "value": [3, 1]}, [("rule_bounds", ("value",))]),
        ({"field": "frequency", "op": "between", "value": 3}, [("tuple_type", ("value",))]),
        ({"field": "city", "op": "eq", "value": ["a"]}, [("string_type", ("value",))]),
        ({"field": "city", "op": "in", "value": "a"}, [("list_type", ("value",))]),
        ({"field": "city", "op": "in", "value": []}, [("too_short", ("value",))]),
        ({"field": "city", "op": "eq", "value": "a\x00b"}, [("rule_text", ("value",))]),
        ({"field": "stage", "op": "eq", "value": "vip"}, [("rule_stage", ("value",))]),
        ({"field": "stage", "op": "in", "value": ["new", "x"]}, [("rule_stage", ("value",))]),
        ({"field": "city", "op": "is_null", "value": "x"}, [("extra_forbidden", ("value",))]),
        ({"field": "returning", "op": "eq", "value": 1}, [("bool_type", ("value",))]),
        ({"field": "returning", "op": "ne", "value": True}, [("literal_error", ("op",))]),
        ({"has_tag": ""}, [("string_too_short", ("has_tag",))]),
        ({"has_tag": "vip", "extra": 1}, [("extra_forbidden", ("extra",))]),
        ({"member_level_at_least": 2}, [("string_type", ("member_level_at_least",))]),
        ({"all": []}, [("too_short", ("all",))]),
        ({"any": {"has_tag": "x"}}, [("list_type", ("any",))]),
        ({"nothing": 1}, [("rule_shape", ())]),
        ("frequency > 1", [("rule_shape", ())]),
        (
            {"all": [leaf(), {"any": [leaf(), {"not": {"field": "city", "op": "eq"}}]}]},
            [("missing", ("all", 1, "any", 1, "not", "value"))],
        ),
        ({"not": {"all": [leaf(), 5]}}, [("rule_shape", ("not", "all", 1))]),
        (nested(9), [("rule_too_deep", ("not",) * 8)]),
        ({"any": [nested(8), leaf()]}, [("rule_too_deep", ("any", 0, *("not",) * 7))]),
        ({"all": [leaf(i) for i in range(100)]}, [("rule_too_large", ("all", 99))]),
        (
            {"any": [{"all": [leaf(i) for i in range(60)]}, {"not": {"all": [leaf()] * 40}}]},
            [("rule_too_large", ("any", 1, "not", "all", 36))],
        ),
    ],
)
def test_invalid_rules_name_the_failing_part(
    obj: object, expected: list[tuple[str, tuple[int | str, ...]]]
) -> None:
    assert errors_of(obj) == expected


def test_limits_are_inclusive() -> None:
    parse_rule(nested(8))
    parse_rule({"all": [leaf(i) for i in range(99)]})  # 100 nodes
    parse_rule({"any": [{"all": [leaf(i) for i in range(60)]}, {"not": {"all": [leaf()] * 35}}]})


def test_limits_hold_for_rules_built_in_python() -> None:
    deep: Any = HasTag(has_tag="vip")
    for _ in range(7):
        deep = Not(not_=deep)
    with pytest.raises(ValidationError):
        Not(not_=deep)
    with pytest.raises(ValidationError):
        AllOf(all=[HasTag(has_tag=str(i)) for i in range(100)])


# --- recency thresholds -------------------------------------------------------------------


def test_recency_thresholds() -> None:
    def thresholds(rule_json: dict[str, Any]) -> set[int]:
        return recency_thresholds(parse_rule(rule_json))

    def r(op: str, value: Any) -> dict[str, Any]:
        return {"field": "recency_days", "op": op, "value": value}

    assert thresholds(r("gte", 30)) == {30}
    assert thresholds(r("gt", 30)) == {31}
    assert thresholds(r("lte", 30)) == {31}
    assert thresholds(r("lt", 30)) == {30}
    assert thresholds(r("eq", 30)) == {30, 31}
    assert thresholds(r("ne", 30)) == {30, 31}
    assert thresholds(r("between", [7, 14])) == {7, 15}
    assert thresholds({"all": [leaf(), {"not": r("lt", 90)}, {"any": [r("gt", 180)]}]}) == {
        90,
        181,
    }
    assert thresholds({"field": "recency_days", "op": "is_null"}) == set()
    assert thresholds({"any": [leaf(), {"field": "stage", "op": "eq", "value": "new"}]}) == set()


@settings(max_examples=150, deadline=None)
@given(
    rule_json=rules_json(),
    f=facts_strategy,
    offsets=st.lists(st.integers(-5 * 86_400_000_000, 45 * 86_400_000_000), max_size=20),
)
def test_truth_changes_only_at_recency_thresholds(
    rule_json: dict[str, Any], f: CustomerFacts, offsets: list[int]
) -> None:
    """Between two instants, the rule's truth changes only if some last_order_at + N days
    (N a threshold) lies in (t1, t2]. The instants: every whole day after the last order
    and a microsecond either side, from -5 to 45 days, plus random ones."""
    rule = parse_rule(rule_json)
    last = f.last_order_at or NOW
    f = replace(f, last_order_at=last)
    flips = {last + n * DAY for n in recency_thresholds(rule) if abs(n) <= 1000}
    grid = {last + k * DAY + timedelta(microseconds=us) for k in range(-5, 46) for us in (-1, 0, 1)}
    times = sorted(grid | {last + timedelta(microseconds=o) for o in offsets})
    for t1, t2 in itertools.pairwise(times):
        if evaluate(rule, f, t1) != evaluate(rule, f, t2):
            assert any(t1 < at <= t2 for at in flips)


# --- bounds -------------------------------------------------------------------------------


def bounded_errors_of(obj: object) -> list[tuple[str, tuple[int | str, ...]]]:
    with pytest.raises(ValidationError) as exc:
        parse_rule(obj, bounded=True)
    return [(e["type"], tuple(e["loc"])) for e in exc.value.errors()]


BEYOND_THE_BOUNDS = [
    (
        {"field": "recency_days", "op": "lt", "value": 3_000_000},
        [("less_than_equal", ("value",))],
    ),
    (
        {"field": "recency_days", "op": "gte", "value": -(RECENCY_DAYS_MAX + 1)},
        [("greater_than_equal", ("value",))],
    ),
    (
        {"field": "recency_days", "op": "between", "value": [0, RECENCY_DAYS_MAX + 1]},
        [("less_than_equal", ("value", 1))],
    ),
    (
        {"field": "monetary_minor", "op": "gt", "value": AMOUNT_MAX + 1},
        [("less_than_equal", ("value",))],
    ),
    ({"field": "frequency", "op": "gte", "value": -1}, [("greater_than_equal", ("value",))]),
    (
        {"all": [leaf(), {"not": {"field": "aov_minor", "op": "between", "value": [-1, 5]}}]},
        [("greater_than_equal", ("all", 1, "not", "value", 0))],
    ),
    (
        {"any": [{"field": "item_count", "op": "lte", "value": 2**62}]},
        [("less_than_equal", ("any", 0, "value"))],
    ),
]


@pytest.mark.parametrize(("obj", "expected"), BEYOND_THE_BOUNDS)
def test_new_rules_are_held_to_the_bounds_and_errors_name_the_part(
    obj: object, expected: list[tuple[str, tuple[int | str, ...]]]
) -> None:
    assert bounded_errors_of(obj) == expected
    parse_rule(obj)  # stored before the bounds existed, it still loads


def test_the_bounds_are_inclusive() -> None:
    for obj in (
        {"field": "recency_days", "op": "lt", "value": RECENCY_DAYS_MAX},
        {"field": "recency_days", "op": "between", "value": [-RECENCY_DAYS_MAX, RECENCY_DAYS_MAX]},
        {"field": "monetary_minor", "op": "lte", "value": AMOUNT_MAX},
        {"field": "item_count", "op": "between", "value": [0, AMOUNT_MAX]},
        {"field": "frequency", "op": "gte", "value": 0},
    ):
        assert parse_rule(obj, bounded=True) == parse_rule(obj)


def test_stored_rules_beyond_the_bounds_evaluate_without_raising() -> None:
    """A rule saved before the bounds (the API refused nothing in 64 bits) must not stop
    its shop: every part of the evaluation takes it, and no threshold lies so far that
    `last_order_at + N days` could leave the range of dates."""
    far = parse_rule({"field": "recency_days", "op": "lt", "value": 3_000_000})
    bought = facts(last_order_at=NOW - 10 * DAY)
    assert evaluate(far, bought, NOW)
    assert not evaluate(far, facts(last_order_at=None), NOW)
    to_sql(far, NOW)
    assert recency_thresholds(far) == set()
    extreme = parse_rule(
        {
            "any": [
                {"field": "recency_days", "op": "gt", "value": 2**63 - 1},
                {"field": "recency_days", "op": "lte", "value": -(2**63)},
                {"field": "recency_days", "op": "between", "value": [RECENCY_DAYS_MAX, 10**9]},
                {"field": "monetary_minor", "op": "ne", "value": -(2**63)},
            ]
        }
    )
    to_sql(extreme, NOW)
    evaluate(extreme, bought, NOW)
    assert recency_thresholds(extreme) == {RECENCY_DAYS_MAX}
    latest = datetime(2099, 12, 31, 23, 59, tzinfo=UTC)  # events are dated before 2100
    for n in recency_thresholds(extreme) | {RECENCY_DAYS_MAX + 1, -RECENCY_DAYS_MAX}:
        assert latest + n * DAY < datetime.max.replace(tzinfo=UTC)


RULE_SCHEMA = Draft202012Validator(TypeAdapter(Rule).json_schema())
"""The JSON schema of the rule grammar, as /openapi.json states it for `rule`/`filter`."""


@settings(max_examples=150, deadline=None)
@given(rules_json(bounded_values))
def test_the_json_schema_takes_every_rule_within_the_bounds(rule_json: dict[str, Any]) -> None:
    parse_rule(rule_json, bounded=True)
    RULE_SCHEMA.validate(rule_json)  # exactly one member of each `oneOf` matches


@pytest.mark.parametrize(
    "obj",
    [
        *(obj for obj, _ in BEYOND_THE_BOUNDS),
        {"field": "spend", "op": "gt", "value": 1},
        {"field": "frequency", "op": "in", "value": [1]},
        {"field": "stage", "op": "eq", "value": "vip"},
        {"field": "stage", "op": "in", "value": ["new", "x"]},
        {"field": "city", "op": "eq", "value": "a\x00b"},
        {"field": "city", "op": "is_null", "value": "x"},
        {"field": "returning", "op": "eq", "value": 1},
        {"has_tag": ""},
        {"all": []},
        {"nothing": 1},
    ],
)
def test_the_json_schema_refuses_what_the_grammar_refuses(obj: object) -> None:
    """All a schema can say: not `lo <= hi` in `between`, nor the depth and size limits,
    nor that 1.0 is no JSON integer here (JSON Schema's `integer` takes it)."""
    with pytest.raises(ValidationError):
        parse_rule(obj, bounded=True)
    assert not RULE_SCHEMA.is_valid(obj)


@pytest.mark.parametrize(
    "bad",
    [
        {"field": {}},
        {"field": []},
        {"field": {}, "op": "eq", "value": False},
        {"field": "city", "op": {}},
    ],
)
def test_an_object_or_list_where_a_name_belongs_is_refused_not_a_crash(
    bad: dict[str, object],
) -> None:
    """Found by the fuzzer: these raised TypeError (unhashable) and answered 500."""
    with pytest.raises(ValidationError):
        parse_rule(bad)

"""Where predictions are used: the customer body, the list's filters and sorts (keyset
pages that run through customers without a prediction), and the rule fields `p_alive` and
`expected_purchases_90d` (Python equals SQL, nulls included; validation names the part).

Each test runs on SQLite and on PostgreSQL, against lifecycle's migrated database, with the
lifecycle routes served in this process. The prediction columns are written directly (the
fitting job is tested elsewhere)."""

from __future__ import annotations

import base64
import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import orjson
import pytest
from fastapi import FastAPI
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select

from libs.common.auth import Principal
from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.problems import install_problem_handlers
from libs.common.service import ServiceContext
from services.lifecycle import migrations
from services.lifecycle.api import build_router
from services.lifecycle.models import customers
from services.lifecycle.rules import (
    EXPECTED_PURCHASES_MAX,
    CustomerFacts,
    Rule,
    dump_rule,
    evaluate,
    facts_from_row,
    parse_rule,
    to_sql,
)
from tests.servers import fresh_database

SHOP = "shop-p"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
THIRD = 0.1 + 0.2  # 0.30000000000000004: a double that no 4-decimal rounding keeps
BELOW_HALF, ABOVE_HALF = math.nextafter(0.5, 0), math.nextafter(0.5, 1)

# --- the database and the API -------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """Lifecycle's database, migrated (m0005 adds the prediction columns), in each dialect."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'lifecycle.db'}"
    else:
        url = await fresh_database(request.getfixturevalue("pg_url"))
    database = Database(url, "lifecycle")
    await migrate(database, migrations)
    yield database
    await database.dispose()


@asynccontextmanager
async def api(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    """The lifecycle routes with the service's problem handlers, called with SHOP's key."""

    async def shop_key() -> Principal:
        return Principal(shop_id=SHOP)

    ctx = SimpleNamespace(
        db=db, settings=SimpleNamespace(topic_namespace=""), auth=shop_key, outbox=None
    )
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(build_router(cast(ServiceContext, ctx)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://huitou.test") as client:
        yield client


Predicted = tuple[float | None, float | None]
"""(p_alive, expected_purchases_90d) of a customer; (None, None) without a model."""


async def seed(db: Database, people: dict[str, Predicted], shop: str = SHOP) -> None:
    """Customers with no orders, then their predictions set with SQL updates."""
    async with db.begin() as conn:
        await conn.execute(
            customers.insert(),
            [
                {"shop_id": shop, "customer_id": cid, "first_seen_at": NOW - timedelta(days=400)}
                for cid in people
            ],
        )
        for cid, (p_alive, expected) in people.items():
            if p_alive is None and expected is None:
                continue
            await conn.execute(
                customers.update()
                .where(customers.c.shop_id == shop, customers.c.customer_id == cid)
                .values(
                    p_alive=p_alive,
                    expected_purchases_90d=expected,
                    next_purchase_at=NOW + timedelta(days=20) if p_alive else None,
                )
            )


async def ok(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    r = await client.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def refused(client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> list[str]:
    """The fields a 422 problem names."""
    r = await client.request(method, path, **kw)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return [e["field"] for e in r.json()["errors"]]


# --- the body -----------------------------------------------------------------------------


async def test_the_body_carries_the_prediction_exactly_as_stored(db: Database) -> None:
    await seed(db, {"fitted": (THIRD, 2.5), "unfitted": (None, None), "lapsed": (0.0, 0.0)})
    async with api(db) as client:
        fitted = await ok(client, "/v1/customers/fitted")
        assert fitted["prediction"] == {
            "p_alive": THIRD,
            "expected_purchases_90d": 2.5,
            "next_purchase_at": fitted["prediction"]["next_purchase_at"],
        }
        assert fitted["prediction"]["p_alive"] == 0.30000000000000004  # not rounded
        at = datetime.fromisoformat(fitted["prediction"]["next_purchase_at"])
        assert at == NOW + timedelta(days=20)
        assert at.utcoffset() == timedelta(0)
        lapsed = await ok(client, "/v1/customers/lapsed")
        assert lapsed["prediction"] == {
            "p_alive": 0.0,
            "expected_purchases_90d": 0.0,
            "next_purchase_at": None,
        }
        unfitted = await ok(client, "/v1/customers/unfitted")
        assert "prediction" in unfitted and unfitted["prediction"] is None
        listed = await ok(client, "/v1/customers")
        by_id = {c["customer_id"]: c["prediction"] for c in listed["items"]}
        assert by_id == {
            "fitted": fitted["prediction"],
            "lapsed": lapsed["prediction"],
            "unfitted": None,
        }


# --- filters and sorts --------------------------------------------------------------------

PEOPLE: dict[str, Predicted] = {
    "a": (0.5, 3.0),
    "b": (None, None),
    "c": (THIRD, 0.3),
    "d": (0.5, 3.0),
    "e": (1.0, 90.0),
    "f": (0.3, THIRD),
    "g": (None, None),
    "h": (0.0, 0.0),
    "i": (BELOW_HALF, 2.0),
    "j": (ABOVE_HALF, 4.5),
    "k": (0.5, 0.0),
    "l": (None, None),
    "m": (1.0, 1_000_000.0),
    "n": (5e-324, 5e-324),
}
"""Ties (a, d, k; e, m), doubles a step apart (i, a, j; f, c), the bounds, a subnormal, and
customers without a prediction whose ids fall between the others'."""


def expected_order(field: int, descending: bool) -> list[str]:
    """Python's order: by the value (nulls last either way), then by id."""

    def key(cid: str) -> tuple[bool, float, str]:
        value = PEOPLE[cid][field]
        if value is None:
            return (True, 0.0, cid)
        return (False, -value if descending else value, cid)

    return sorted(PEOPLE, key=key)


async def walk(client: httpx.AsyncClient, limit: int, **params: Any) -> list[str]:
    """Every id the list gives, following `next_cursor` to the end."""
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        page = await ok(
            client, "/v1/customers", limit=limit, **params, **({"cursor": cursor} if cursor else {})
        )
        assert len(page["items"]) <= limit
        seen += [c["customer_id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("the pages never end")


@pytest.mark.parametrize(
    ("sort", "field", "descending"),
    [
        ("p_alive", 0, False),
        ("-p_alive", 0, True),
        ("expected_purchases_90d", 1, False),
        ("-expected_purchases_90d", 1, True),
    ],
)
async def test_prediction_sorts_page_through_ties_and_nulls(
    db: Database, sort: str, field: int, descending: bool
) -> None:
    await seed(db, PEOPLE)
    await seed(db, {"other": (0.5, 3.0), "other-null": (None, None)}, shop="another-shop")
    want = expected_order(field, descending)
    assert want[-3:] == ["b", "g", "l"]
    async with api(db) as client:
        for limit in (1, 2, 3, 5, 50):
            assert await walk(client, limit, sort=sort) == want, limit
        # With a filter: only customers with a prediction, still in order.
        assert await walk(client, 2, sort=sort, min_p_alive=0.5) == [
            cid for cid in want if (p := PEOPLE[cid][0]) is not None and p >= 0.5
        ]


async def test_a_cursor_past_a_customer_without_a_prediction_goes_on_among_them(
    db: Database,
) -> None:
    await seed(db, PEOPLE)

    def cursor(value: Any, customer_id: Any) -> str:
        return base64.urlsafe_b64encode(orjson.dumps([value, customer_id])).decode()

    async with api(db) as client:
        for sort in ("p_alive", "-p_alive", "expected_purchases_90d"):
            page = await ok(client, "/v1/customers", sort=sort, cursor=cursor(None, "c"))
            assert [c["customer_id"] for c in page["items"]] == ["g", "l"]
        # A cursor made by hand with an integer sort value reads as that number.
        page = await ok(client, "/v1/customers", sort="-p_alive", cursor=cursor(1, "e"))
        assert [c["customer_id"] for c in page["items"]][:2] == ["m", "j"]
        page = await ok(client, "/v1/customers", sort="p_alive", cursor=cursor(1, "m"))
        assert [c["customer_id"] for c in page["items"]] == ["b", "g", "l"]
        for sort, forged in (
            ("p_alive", cursor(True, "c")),
            ("-p_alive", cursor("0.5", "c")),
            ("expected_purchases_90d", cursor([0.5], "c")),
            ("-expected_purchases_90d", cursor(0.5, 7)),
            ("p_alive", cursor(0.5, "a\x00b")),
            ("p_alive", base64.urlsafe_b64encode(b'[1e400, "c"]').decode()),
            ("p_alive", base64.urlsafe_b64encode(b"[" + b"9" * 330 + b', "c"]').decode()),
            ("p_alive", "not a cursor"),
            ("monetary", cursor(0.5, "c")),  # a float cursor on an integer sort
        ):
            fields = await refused(
                client, "GET", "/v1/customers", params={"sort": sort, "cursor": forged}
            )
            assert fields == ["cursor"], (sort, forged)


BOUNDS: tuple[float, ...] = (
    0,
    5e-324,
    0.3,
    THIRD,
    BELOW_HALF,
    0.5,
    ABOVE_HALF,
    1,
    3,
    90,
    EXPECTED_PURCHASES_MAX,
)


async def test_prediction_filters_are_inclusive_exact_and_leave_out_the_unpredicted(
    db: Database,
) -> None:
    await seed(db, PEOPLE)
    await seed(db, {"other": (0.5, 3.0)}, shop="another-shop")

    def within(cid: str, field: int, low: float | None, high: float | None) -> bool:
        value = PEOPLE[cid][field]
        if value is None:
            return low is None and high is None
        return (low is None or value >= low) and (high is None or value <= high)

    async with api(db) as client:
        for name, field, bounds in (
            ("p_alive", 0, [b for b in BOUNDS if b <= 1]),
            ("expected_purchases_90d", 1, list(BOUNDS)),
        ):
            for low, high in itertools.product([None, *bounds], repeat=2):
                params = {
                    k: repr(float(v))
                    for k, v in ((f"min_{name}", low), (f"max_{name}", high))
                    if v is not None
                }
                listed = await ok(client, "/v1/customers", limit=500, **params)
                found = {c["customer_id"] for c in listed["items"]}
                assert found == {cid for cid in PEOPLE if within(cid, field, low, high)}, params
        both = await ok(
            client,
            "/v1/customers",
            min_p_alive=0.5,
            max_expected_purchases_90d=3,
            sort="-expected_purchases_90d",
        )
        assert [c["customer_id"] for c in both["items"]] == ["a", "d", "k"]


OUT_OF_BOUNDS: list[tuple[str, str]] = [
    ("min_p_alive", "1.5"),
    ("max_p_alive", "-0.1"),
    ("min_p_alive", "1.0000000000000002"),
    ("min_p_alive", "nan"),
    ("max_p_alive", "inf"),
    ("min_p_alive", "true"),
    ("max_p_alive", "abc"),
    ("min_expected_purchases_90d", "-1"),
    ("max_expected_purchases_90d", "1000000.0000001"),
    ("max_expected_purchases_90d", "1e7"),
    ("min_expected_purchases_90d", "Infinity"),
    ("max_expected_purchases_90d", "-inf"),
    ("min_expected_purchases_90d", "NaN"),
    ("max_expected_purchases_90d", "1e400"),
]


async def test_prediction_filters_out_of_bounds_answer_422(db: Database) -> None:
    async with api(db) as client:
        for name, value in OUT_OF_BOUNDS:
            fields = await refused(client, "GET", "/v1/customers", params={name: value})
            assert fields == [f"query.{name}"], (name, value)


async def test_the_widest_prediction_filters_and_unknown_sorts(db: Database) -> None:
    await seed(db, PEOPLE)
    async with api(db) as client:
        widest = {
            "min_p_alive": 0,
            "max_p_alive": 1,
            "min_expected_purchases_90d": 0,
            "max_expected_purchases_90d": EXPECTED_PURCHASES_MAX,
        }
        listed = await ok(client, "/v1/customers", **widest)
        assert {c["customer_id"] for c in listed["items"]} == {
            cid for cid, p in PEOPLE.items() if p[0] is not None
        }
        for sort in ("p_alive_desc", "+p_alive", "--p_alive", "expected_purchases"):
            assert await refused(client, "GET", "/v1/customers", params={"sort": sort}) == ["sort"]


# --- rules --------------------------------------------------------------------------------

P_VALUES: tuple[float, ...] = (0, 5e-324, 0.3, THIRD, BELOW_HALF, 0.5, ABOVE_HALF, 1)
E_VALUES: tuple[float, ...] = (
    0,
    5e-324,
    THIRD,
    3,
    math.nextafter(3, 4),
    90,
    EXPECTED_PURCHASES_MAX,
)


def leaves_over(field: str, values: tuple[float, ...]) -> list[dict[str, Any]]:
    """Every comparison of the field with every value (and every `between`), both null
    checks; each also under `not`."""
    plain: list[dict[str, Any]] = [
        {"field": field, "op": op, "value": v}
        for op in ("eq", "ne", "gt", "gte", "lt", "lte")
        for v in values
    ]
    plain += [
        {"field": field, "op": "between", "value": [lo, hi]}
        for lo, hi in itertools.combinations_with_replacement(values, 2)
    ]
    plain += [{"field": field, "op": op} for op in ("is_null", "not_null")]
    return plain + [{"not": leaf} for leaf in plain]


async def test_prediction_rules_in_sql_equal_python_at_every_boundary(db: Database) -> None:
    """Customers at every value a rule names (and a double's step either side), and without
    a prediction; each rule selects in SQL exactly whom Python's `evaluate` holds for, with
    the facts read back from the rows (`facts_from_row`)."""
    ps = sorted({float(v) for v in P_VALUES} | {math.nextafter(0.3, 0), math.nextafter(1, 0)})
    es = sorted({float(v) for v in E_VALUES} | {math.nextafter(3, 0), 2.5, 1e6 - 0.5})
    people: dict[str, Predicted] = {"none": (None, None), "half-none": (0.5, None)}
    people |= {f"p{i:02d}": (v, es[i % len(es)]) for i, v in enumerate(ps)}
    people |= {f"e{i:02d}": (ps[i % len(ps)], v) for i, v in enumerate(es)}
    await seed(db, people)
    await seed(db, {"decoy": (0.5, 3.0)}, shop="another-shop")
    async with db.connect() as conn:
        rows = (await conn.execute(select(customers).where(customers.c.shop_id == SHOP))).all()
        facts = {r.customer_id: facts_from_row(r._mapping) for r in rows}
        for cid, predicted in people.items():
            assert (facts[cid].p_alive, facts[cid].expected_purchases_90d) == predicted
        checked = 0
        for rule_json in [
            *leaves_over("p_alive", P_VALUES),
            *leaves_over("expected_purchases_90d", E_VALUES),
        ]:
            rule = parse_rule(rule_json, bounded=True)
            query = select(customers.c.customer_id).where(
                customers.c.shop_id == SHOP, to_sql(rule, NOW)
            )
            found = set((await conn.execute(query)).scalars())
            assert found == {cid for cid, f in facts.items() if evaluate(rule, f, NOW)}, rule_json
            checked += 1
    assert checked > 300


def test_null_semantics_of_the_prediction_fields() -> None:
    without = CustomerFacts(
        frequency=0,
        monetary_minor=0,
        aov_minor=0,
        item_count=0,
        last_order_at=None,
        stage="prospect",
        member_level=None,
        city=None,
        province=None,
        source=None,
        returning=False,
    )  # built as before the fields existed: no prediction
    assert (without.p_alive, without.expected_purchases_90d) == (None, None)

    def holds(rule_json: dict[str, Any], facts: CustomerFacts) -> bool:
        return evaluate(parse_rule(rule_json, bounded=True), facts, NOW)

    for field in ("p_alive", "expected_purchases_90d"):
        for op, value in (("ne", 0.5), ("lt", 1), ("gte", 0), ("between", [0, 1])):
            rule_json = {"field": field, "op": op, "value": value}
            assert not holds(rule_json, without)
            assert holds({"not": rule_json}, without)
        assert holds({"field": field, "op": "is_null"}, without)
        assert not holds({"field": field, "op": "not_null"}, without)
    predicted = replace(without, p_alive=0.0, expected_purchases_90d=0.0)
    assert holds({"field": "p_alive", "op": "eq", "value": 0}, predicted)
    assert holds({"field": "p_alive", "op": "not_null"}, predicted)
    assert holds({"field": "expected_purchases_90d", "op": "lte", "value": 0}, predicted)


# --- validation ---------------------------------------------------------------------------


def errors_of(obj: object, *, bounded: bool) -> list[tuple[str, tuple[int | str, ...]]]:
    with pytest.raises(ValidationError) as exc:
        parse_rule(obj, bounded=bounded)
    return [(e["type"], tuple(e["loc"])) for e in exc.value.errors()]


def p(op: str, value: Any) -> dict[str, Any]:
    return {"field": "p_alive", "op": op, "value": value}


def e(op: str, value: Any) -> dict[str, Any]:
    return {"field": "expected_purchases_90d", "op": op, "value": value}


INVALID: list[tuple[object, list[tuple[str, tuple[int | str, ...]]]]] = [
    (p("gt", 1.5), [("less_than_equal", ("value",))]),
    (p("gt", 2), [("less_than_equal", ("value",))]),
    (p("gte", -0.1), [("greater_than_equal", ("value",))]),
    (p("eq", True), [("float_type", ("value",))]),
    (p("eq", "0.5"), [("float_type", ("value",))]),
    (p("eq", None), [("float_type", ("value",))]),
    (p("eq", [0.5]), [("float_type", ("value",))]),
    (p("lt", math.nan), [("finite_number", ("value",))]),
    (p("lt", math.inf), [("finite_number", ("value",))]),
    (p("between", [0.9, 0.1]), [("rule_bounds", ("value",))]),
    (p("between", [0, 1.5]), [("less_than_equal", ("value", 1))]),
    (p("between", 0.5), [("tuple_type", ("value",))]),
    (p("in", 0.5), [("rule_op", ("op",))]),
    ({"field": "p_alive", "op": "gt"}, [("missing", ("value",))]),
    ({"field": "p_alive", "op": "is_null", "value": 1}, [("extra_forbidden", ("value",))]),
    (e("lte", EXPECTED_PURCHASES_MAX + 1), [("less_than_equal", ("value",))]),
    (e("lte", 10**400), [("float_type", ("value",))]),
    (e("gt", -1), [("greater_than_equal", ("value",))]),
    (e("gt", False), [("float_type", ("value",))]),
    (e("gt", -math.inf), [("finite_number", ("value",))]),
    (e("between", [0, math.nan]), [("finite_number", ("value", 1))]),
    (e("between", [3, 2.5]), [("rule_bounds", ("value",))]),
    (
        {"all": [p("gt", 0.5), {"any": [{"not": e("gte", "3")}]}]},
        [("float_type", ("all", 1, "any", 0, "not", "value"))],
    ),
    (
        {"not": {"all": [p("not_in", [0.5])]}},
        [("rule_op", ("not", "all", 0, "op")), ("float_type", ("not", "all", 0, "value"))],
    ),
]


@pytest.mark.parametrize(("obj", "expected"), INVALID)
def test_invalid_prediction_rules_name_the_failing_part(
    obj: object, expected: list[tuple[str, tuple[int | str, ...]]]
) -> None:
    # The bounds hold for new rules and stored ones alike: no rule predates these fields.
    assert errors_of(obj, bounded=True) == expected
    assert errors_of(obj, bounded=False) == expected


RULE_SCHEMA = Draft202012Validator(TypeAdapter(Rule).json_schema())


@pytest.mark.parametrize(
    "obj",
    [
        obj
        for obj, expected in INVALID
        # A schema cannot say `lo <= hi`; NaN and the infinities are no JSON.
        if not {kind for kind, _ in expected} & {"rule_bounds", "finite_number"}
    ],
)
def test_the_json_schema_refuses_what_the_grammar_refuses(obj: object) -> None:
    assert not RULE_SCHEMA.is_valid(obj)


@pytest.mark.parametrize(
    "obj",
    [
        p("eq", 0),
        p("lte", 1),
        p("gt", THIRD),
        p("between", [0, 1]),
        e("lt", 0),
        e("gte", EXPECTED_PURCHASES_MAX),
        e("between", [0.5, 90]),
        {"field": "expected_purchases_90d", "op": "not_null"},
        {"all": [p("gte", 0.8), {"not": e("lt", 1)}, {"field": "p_alive", "op": "is_null"}]},
    ],
)
def test_prediction_rules_at_the_bounds_are_taken_and_read_back(obj: dict[str, Any]) -> None:
    rule = parse_rule(obj, bounded=True)
    assert RULE_SCHEMA.is_valid(obj)
    dumped = orjson.loads(orjson.dumps(dump_rule(parse_rule(obj))))
    assert dumped == obj  # numbers read as floats: 1 comes back as 1.0, which equals 1
    assert parse_rule(dumped, bounded=True) == rule


async def test_the_api_refuses_bad_prediction_rules_naming_the_part(db: Database) -> None:
    async with api(db) as client:
        cases: list[tuple[str, str, dict[str, Any], list[str]]] = [
            ("POST", "/v1/tags", {"name": "t", "rule": p("gt", 2)}, ["rule.value"]),
            (
                "POST",
                "/v1/tags",
                {"name": "t", "rule": {"all": [p("gt", 0.5), e("lte", True)]}},
                ["rule.all.1.value"],
            ),
            (
                "POST",
                "/v1/segments",
                {"name": "s", "filter": {"not": e("between", [0, 1e7])}},
                ["filter.not.value.1"],
            ),
            ("POST", "/v1/segments", {"name": "s", "filter": p("eq", "0.5")}, ["filter.value"]),
        ]
        for method, path, body, fields in cases:
            assert await refused(client, method, path, json=body) == fields, body
        assert await ok(client, "/v1/segments") == []


async def test_a_segment_over_predictions_selects_what_evaluate_holds_for(db: Database) -> None:
    await seed(db, PEOPLE)
    rule_json = {
        "any": [
            {"all": [p("gte", 0.5), {"not": e("gt", 3)}]},
            {"field": "p_alive", "op": "is_null"},
        ]
    }
    rule = parse_rule(rule_json, bounded=True)

    def facts_of(pred: Predicted) -> CustomerFacts:
        return CustomerFacts(
            frequency=0,
            monetary_minor=0,
            aov_minor=0,
            item_count=0,
            last_order_at=None,
            stage="prospect",
            member_level=None,
            city=None,
            province=None,
            source=None,
            returning=False,
            p_alive=pred[0],
            expected_purchases_90d=pred[1],
        )

    want = sorted(cid for cid, pred in PEOPLE.items() if evaluate(rule, facts_of(pred), NOW))
    assert want == ["a", "b", "d", "g", "k", "l"]  # not i (0.5 less a step), not j (4.5)
    async with api(db) as client:
        r = await client.post("/v1/segments", json={"name": "likely", "filter": rule_json})
        assert r.status_code == 201, r.text
        segment_id = r.json()["segment_id"]
        assert r.json()["filter"] == rule_json
        count = await ok(client, f"/v1/segments/{segment_id}/count")
        listed = await ok(client, f"/v1/segments/{segment_id}/customers", limit=500)
    assert sorted(c["customer_id"] for c in listed["items"]) == want
    assert count == {"count": len(want)}

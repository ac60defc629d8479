"""Bounds at the lifecycle API: whatever it accepts can be stored, evaluated and compared
later (no date `N days` away out of range, no integer beyond a 64-bit column); what it
refuses gets a 422 naming the bad part and leaves nothing behind."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from libs.common.http import build_app
from libs.common.settings import Settings
from services.lifecycle.rules import AMOUNT_MAX, RECENCY_DAYS_MAX
from services.platform import SERVICES
from tests.lifecycle.test_lifecycle_api import get, new_shop, order, post, wait_for
from tests.platform import Platform

FAR = {"field": "recency_days", "op": "lt", "value": 3_000_000}
"""The rule that stopped a shop: `last_order_at + 3,000,000 days` is past the year 9999."""


async def refused(platform: Platform, key: str, method: str, path: str, **kw: Any) -> list[str]:
    """The fields a 422 answer names."""
    r = await platform.request(method, path, key=key, **kw)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return [e["field"] for e in r.json()["errors"]]


async def test_a_rule_beyond_the_bounds_is_refused_and_nothing_is_stored(
    platform: Platform,
) -> None:
    _, key = await new_shop(platform)
    assert await refused(platform, key, "POST", "/v1/tags", json={"name": "far", "rule": FAR}) == [
        "rule.value"
    ]
    deep = {
        "all": [
            {"field": "frequency", "op": "gte", "value": 1},
            {"not": {"field": "monetary_minor", "op": "between", "value": [0, 2**63]}},
        ]
    }
    assert await refused(
        platform, key, "POST", "/v1/tags", json={"name": "deep", "rule": deep}
    ) == ["rule.all.1.not.value.1"]
    assert await refused(
        platform,
        key,
        "POST",
        "/v1/segments",
        json={"name": "s", "filter": {"field": "item_count", "op": "gte", "value": -1}},
    ) == ["filter.value"]
    assert await get(platform, key, "/v1/tags") == []
    assert await get(platform, key, "/v1/segments") == []

    recent = {"field": "recency_days", "op": "lt", "value": 30}
    r = await platform.request("POST", "/v1/tags", key=key, json={"name": "recent", "rule": recent})
    assert r.status_code == 201, r.text
    assert await refused(platform, key, "PUT", "/v1/tags/recent/rule", json={"rule": FAR}) == [
        "rule.value"
    ]
    r = await platform.request(
        "POST", "/v1/segments", key=key, json={"name": "recent", "filter": recent}
    )
    segment_id = r.json()["segment_id"]
    assert await refused(
        platform,
        key,
        "PUT",
        f"/v1/segments/{segment_id}",
        json={"name": "far", "filter": FAR},
    ) == ["filter.value"]
    assert [t["rule"] for t in await get(platform, key, "/v1/tags")] == [recent]
    segment = await get(platform, key, f"/v1/segments/{segment_id}")
    assert (segment["name"], segment["filter"]) == ("recent", recent)


async def test_a_rule_at_the_bounds_tags_customers_end_to_end(platform: Platform) -> None:
    """The largest recency and amounts a rule may name: customers who bought before the
    tag and after it are both tagged (their events processed, none dead-lettered)."""
    shop, key = await new_shop(platform)
    await post(platform, key, [order(shop, {"id": "before"}, "o1", "paid", days_ago=3)])
    await wait_for(platform, key, "before", rfm__frequency=1)
    ever = {
        "all": [
            {"field": "recency_days", "op": "lt", "value": RECENCY_DAYS_MAX},
            {"field": "recency_days", "op": "gte", "value": -RECENCY_DAYS_MAX},
            {"field": "monetary_minor", "op": "between", "value": [0, AMOUNT_MAX]},
        ]
    }
    r = await platform.request("POST", "/v1/tags", key=key, json={"name": "ever", "rule": ever})
    assert r.status_code == 201, r.text
    assert r.json()["rule"] == ever
    await wait_for(platform, key, "before", tags=["ever"])
    await post(platform, key, [order(shop, {"id": "after"}, "o2", "paid")])
    await wait_for(platform, key, "after", tags=["ever"])
    r = await platform.request(
        "POST",
        "/v1/segments",
        key=key,
        json={
            "name": "everyone who bought",
            "filter": {
                "field": "recency_days",
                "op": "between",
                "value": [-RECENCY_DAYS_MAX, RECENCY_DAYS_MAX],
            },
        },
    )
    assert r.status_code == 201, r.text
    segment_id = r.json()["segment_id"]
    assert await get(platform, key, f"/v1/segments/{segment_id}/count") == {"count": 2}


async def test_list_filters_beyond_the_bounds_answer_422(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await post(platform, key, [order(shop, {"id": "c1"}, "o1", "paid", days_ago=3)])
    await wait_for(platform, key, "c1", rfm__frequency=1)
    for name, value in (
        ("min_recency_days", 800_000),
        ("max_recency_days", 800_000),
        ("min_recency_days", 3_000_000_000),
        ("max_recency_days", RECENCY_DAYS_MAX + 1),
        ("min_recency_days", -1),
        ("min_monetary", 2**63),
        ("max_monetary", AMOUNT_MAX + 1),
        ("min_frequency", 2**63),
        ("max_frequency", 2**63),
        ("max_frequency", -1),
    ):
        fields = await refused(platform, key, "GET", "/v1/customers", params={name: value})
        assert fields == [f"query.{name}"], (name, value)
    widest = {
        "min_recency_days": 0,
        "max_recency_days": RECENCY_DAYS_MAX,
        "min_monetary": 0,
        "max_monetary": AMOUNT_MAX,
        "min_frequency": 0,
        "max_frequency": AMOUNT_MAX,
    }
    listed = await get(platform, key, "/v1/customers", **widest)
    assert [c["customer_id"] for c in listed["items"]] == ["c1"]
    listed = await get(platform, key, "/v1/customers", min_recency_days=RECENCY_DAYS_MAX)
    assert listed["items"] == []


async def test_a_forged_cursor_is_refused(platform: Platform) -> None:
    _, key = await new_shop(platform)

    def cursor(value: Any, customer_id: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps([value, customer_id]).encode()).decode()

    for sort, forged in (
        ("-monetary", cursor(2**63, "c1")),
        ("aov", cursor(2**70, "c1")),
        ("monetary", cursor("x", "c1")),
        ("frequency", cursor(True, "c1")),
        ("customer_id", cursor(None, "a\x00b")),
        ("customer_id", cursor(None, 7)),
    ):
        fields = await refused(
            platform, key, "GET", "/v1/customers", params={"sort": sort, "cursor": forged}
        )
        assert fields == ["cursor"], sort
    for sort in ("frequency", "-frequency", "monetary"):  # past int32, within 64 bits
        listed = await get(platform, key, "/v1/customers", sort=sort, cursor=cursor(2**40, "c"))
        assert listed["items"] == []


async def test_search_refuses_control_characters_and_takes_wildcards_literally(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    await post(
        platform,
        key,
        [
            order(shop, {"id": "a", "name": "Alice"}, "o1", "paid"),
            order(shop, {"id": "b", "name": "Bob_100%"}, "o2", "paid"),
            order(shop, {"id": "c", "name": "Carol"}, "o3", "paid"),
        ],
    )
    for cid in "abc":
        await wait_for(platform, key, cid, rfm__frequency=1)
    for q in ("\x00", "a\x00", "\t", "ali\nce", "\x7f"):
        assert await refused(platform, key, "GET", "/v1/customers", params={"q": q}) == ["query.q"]

    async def found(q: str) -> list[str]:
        listed = await get(platform, key, "/v1/customers", q=q)
        return [c["customer_id"] for c in listed["items"]]

    assert await found("%") == ["b"]
    assert await found("_") == ["b"]
    assert await found("b_1") == ["b"]
    assert await found("0%") == ["b"]
    assert await found("a%e") == []
    assert await found("ALI") == ["a"]


async def test_text_in_paths_and_queries_has_no_control_characters(platform: Platform) -> None:
    """A NUL reaches neither database (PostgreSQL cannot bind it): 422 before any query."""
    _, key = await new_shop(platform)
    for method, path, params in (
        ("GET", "/v1/customers/a%00b", {}),
        ("GET", "/v1/customers/a%00b/timeline", {}),
        ("DELETE", "/v1/tags/x%00", {}),
        ("GET", "/v1/segments/s%00/count", {}),
        ("GET", "/v1/customers", {"city": "杭州\x00"}),
        ("GET", "/v1/customers", {"tag": "\x00"}),
    ):
        r = await platform.request(method, path, key=key, params=params)
        assert r.status_code == 422, (path, params, r.text)


async def test_the_openapi_document_carries_the_rule_grammar_and_its_bounds() -> None:
    """A client generated from /openapi.json can send a valid rule, and a fuzzer generates
    rules rather than arbitrary objects: `rule` and `filter` are the grammar's schema."""
    settings = Settings(data_dir=Path(tempfile.mkdtemp()), admin_key="k")
    document = build_app(settings, [SERVICES["lifecycle"]]).openapi()

    def validator(name: str) -> Draft202012Validator:
        return Draft202012Validator(
            {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        )

    ok = {"field": "recency_days", "op": "lt", "value": RECENCY_DAYS_MAX}
    nested = {"any": [{"not": ok}, {"field": "stage", "op": "in", "value": ["new", "active"]}]}
    for name, valid, invalid in (
        ("TagIn", {"name": "x", "rule": nested}, {"name": "x", "rule": FAR}),
        ("RuleIn", {"rule": ok}, {"rule": {"field": "shoe_size", "op": "eq", "value": 42}}),
        ("SegmentIn", {"name": "x", "filter": ok}, {"name": "x", "filter": {"all": []}}),
    ):
        assert validator(name).is_valid(valid), name
        assert not validator(name).is_valid(invalid), name
    assert validator("TagOut").is_valid({"name": "x", "kind": "auto", "rule": ok, "customers": 1})
    assert validator("SegmentOut").is_valid(
        {"segment_id": "s", "name": "x", "filter": nested, "created_at": "2026-01-01T00:00:00Z"}
    )
    parameters = {
        p["name"]: p["schema"] for p in document["paths"]["/v1/customers"]["get"]["parameters"]
    }
    assert parameters["max_recency_days"]["anyOf"][0]["maximum"] == RECENCY_DAYS_MAX
    assert parameters["min_monetary"]["anyOf"][0]["maximum"] == AMOUNT_MAX

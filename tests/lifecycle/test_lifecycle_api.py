"""Lifecycle through a running Huitou: identities, tags, segments, policy, overview; and
the overview's figures, aggregated in the database, against a computation in Python."""

from __future__ import annotations

import itertools
import random
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from libs.common.events import Money
from services.lifecycle import queries
from services.lifecycle.derivation import derive
from services.lifecycle.models import customers, metadata, orders
from services.lifecycle.orders import is_purchase
from services.lifecycle.schemas import Figures
from services.lifecycle.stages import DEFAULT_POLICY, STAGES, Level, StagePolicy
from tests.platform import Platform, until
from tests.servers import fresh_database


def order(
    shop: str,
    customer: dict[str, Any],
    order_id: str,
    status: str,
    *,
    amount: int = 25_900,
    days_ago: float = 1,
    subject: str | None = None,
    city: str = "杭州市",
) -> dict[str, Any]:
    created = datetime.now(UTC) - timedelta(days=days_ago)
    return {
        "specversion": "1.0",
        "id": f"{order_id}-{status}",
        "source": f"test/{shop}",
        "type": f"order.{status}",
        "time": created.isoformat(),
        "shop_id": shop,
        "subject": subject,
        "data": {
            "order_id": order_id,
            "customer": customer,
            "status": status,
            "total": {"amount_minor": amount, "currency": "CNY"},
            "items": [{"sku": "LJ-250", "quantity": 2}],
            "shipping": {"country": "CN", "province": "浙江省", "city": city},
            "created_at": created.isoformat(),
        },
    }


async def new_shop(platform: Platform) -> tuple[str, str]:
    shop = f"shop-{uuid.uuid4().hex[:8]}"
    return shop, await platform.create_shop(shop)


async def post(platform: Platform, key: str, events: list[dict[str, Any]]) -> None:
    r = await platform.request("POST", "/v1/events", key=key, json=events)
    assert r.status_code == 202, r.text


async def get(platform: Platform, key: str, path: str, **params: Any) -> Any:
    r = await platform.request("GET", path, key=key, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def wait_for(platform: Platform, key: str, customer_id: str, **expected: Any) -> Any:
    found: dict[str, Any] = {}

    async def matches() -> bool:
        r = await platform.request("GET", f"/v1/customers/{customer_id}", key=key)
        if r.status_code != 200:
            return False
        found.update(r.json())
        return all(_dig(found, k) == v for k, v in expected.items())

    await until(matches)
    return found


def _dig(body: dict[str, Any], path: str) -> Any:
    value: Any = body
    for part in path.split("__"):
        value = value[part]
    return value


async def test_a_guest_and_an_account_with_the_same_phone_become_one_customer(
    platform: Platform,
) -> None:
    shop, key = await new_shop(platform)
    guest = {"phone": "13800138001", "name": "Guest"}
    await post(platform, key, [order(shop, guest, "g1", "paid", subject="+8613800138001")])
    await wait_for(platform, key, "+8613800138001", rfm__frequency=1)
    account = {"id": "acct-7", "phone": "13800138001", "name": "王芳"}
    await post(platform, key, [order(shop, account, "a1", "paid", subject="acct-7")])
    merged = await wait_for(platform, key, "acct-7", rfm__frequency=2)
    assert sorted(o["order_id"] for o in merged["orders"]) == ["a1", "g1"]
    assert merged["returning"] is True
    via_phone = await get(platform, key, "/v1/customers/+8613800138001")
    assert via_phone["customer_id"] == "acct-7"
    listed = await get(platform, key, "/v1/customers")
    assert [c["customer_id"] for c in listed["items"]] == ["acct-7"]
    other = {"id": "acct-8", "phone": "13800138001"}
    await post(platform, key, [order(shop, other, "b1", "paid", subject="acct-8")])
    await wait_for(platform, key, "acct-8", rfm__frequency=1)
    assert (await get(platform, key, "/v1/customers/acct-7"))["rfm"]["frequency"] == 2, (
        "two platform accounts sharing a phone stay two customers"
    )


async def test_manual_and_automatic_tags(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await post(
        platform,
        key,
        [
            order(shop, {"id": "big"}, "o1", "paid", amount=80_000),
            order(shop, {"id": "small"}, "o2", "paid", amount=5_000),
            order(shop, {"id": "small"}, "o3", "created", amount=5_000),
        ],
    )
    await wait_for(platform, key, "big", rfm__frequency=1)
    await wait_for(platform, key, "small", rfm__frequency=1)

    r = await platform.request(
        "POST",
        "/v1/tags",
        key=key,
        json={
            "name": "big-spender",
            "rule": {
                "all": [
                    {"field": "monetary_minor", "op": "gte", "value": 50_000},
                    {"field": "city", "op": "eq", "value": "杭州市"},
                ]
            },
        },
    )
    assert r.status_code == 201, r.text
    await wait_for(platform, key, "big", tags=["big-spender"])
    assert (await get(platform, key, "/v1/customers/small"))["tags"] == []

    await post(platform, key, [order(shop, {"id": "small"}, "o4", "paid", amount=60_000)])
    await wait_for(platform, key, "small", tags=["big-spender"])

    r = await platform.request("POST", "/v1/tags", key=key, json={"name": "vip-list"})
    assert r.status_code == 201
    r = await platform.request(
        "POST", "/v1/tags/vip-list/customers", key=key, json={"customer_ids": ["small"]}
    )
    assert r.json() == {"changed": 1}
    r = await platform.request("POST", "/v1/tags", key=key, json={"name": "call-list"})
    r = await platform.request(
        "POST", "/v1/tags/big-spender/copy", key=key, json={"to": "call-list"}
    )
    assert r.json() == {"changed": 2}
    r = await platform.request("POST", "/v1/tags/vip-list/move", key=key, json={"to": "call-list"})
    assert r.json() == {"changed": 0}
    small = await get(platform, key, "/v1/customers/small")
    assert small["tags"] == ["big-spender", "call-list"]
    tags = {t["name"]: t for t in await get(platform, key, "/v1/tags")}
    assert (tags["big-spender"]["kind"], tags["big-spender"]["customers"]) == ("auto", 2)
    assert tags["vip-list"]["customers"] == 0

    r = await platform.request(
        "POST", "/v1/tags/big-spender/customers", key=key, json={"customer_ids": ["small"]}
    )
    assert r.status_code == 409, "an automatic tag's rule decides, not the operator"
    r = await platform.request(
        "POST", "/v1/tags/call-list/customers", key=key, json={"customer_ids": ["nobody"]}
    )
    assert r.status_code == 422
    r = await platform.request(
        "POST",
        "/v1/tags",
        key=key,
        json={"name": "broken", "rule": {"all": [{"field": "shoe_size", "op": "eq", "value": 42}]}},
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"].startswith("rule.all.0")

    other_shop, other_key = await new_shop(platform)
    assert await get(platform, other_key, "/v1/tags") == []
    r = await platform.request("POST", "/v1/tags", key=other_key, json={"name": "mine"})
    r = await platform.request(
        "POST", "/v1/tags/mine/customers", key=other_key, json={"customer_ids": ["small"]}
    )
    assert r.status_code == 422, "another shop's customers do not exist for this key"
    assert other_shop != shop


async def test_segments_count_list_and_export(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await post(
        platform,
        key,
        [
            order(
                shop,
                {"id": f"c{i}", "name": f"n{i}"},
                f"o{i}",
                "paid",
                amount=1000 * (i + 1),
                city="杭州市" if i % 2 else "上海市",
            )
            for i in range(12)
        ],
    )
    # Orders are partitioned by order: one customer applied says nothing about the others.
    await platform.settle()
    r = await platform.request(
        "POST",
        "/v1/segments",
        key=key,
        json={
            "name": "Hangzhou new buyers",
            "filter": {
                "all": [
                    {"field": "stage", "op": "eq", "value": "new"},
                    {"field": "city", "op": "eq", "value": "杭州市"},
                ]
            },
        },
    )
    assert r.status_code == 201, r.text
    segment_id = r.json()["segment_id"]
    assert (await get(platform, key, f"/v1/segments/{segment_id}/count")) == {"count": 6}
    # The same filter counted unsaved (a rule builder's live count), and a narrower one.
    hangzhou = r.json()["filter"]
    for rule, expected in (
        (hangzhou, 6),
        ({"all": [hangzhou, {"field": "monetary_minor", "op": "gte", "value": 8000}]}, 3),
    ):
        r = await platform.request("POST", "/v1/segments/count", key=key, json={"filter": rule})
        assert r.status_code == 200 and r.json() == {"count": expected}, r.text
    bad = {"filter": {"field": "stage", "op": "eq", "value": "asleep"}}
    r = await platform.request("POST", "/v1/segments/count", key=key, json=bad)
    assert r.status_code == 422, r.text
    first = await get(platform, key, f"/v1/segments/{segment_id}/customers", limit=4)
    second = await get(
        platform, key, f"/v1/segments/{segment_id}/customers", limit=4, cursor=first["next_cursor"]
    )
    ids = [c["customer_id"] for c in first["items"] + second["items"]]
    assert ids == ["c1", "c11", "c3", "c5", "c7", "c9"]
    assert second["next_cursor"] is None
    r = await platform.request("GET", f"/v1/segments/{segment_id}/export.csv", key=key)
    lines = r.text.strip().splitlines()
    assert lines[0].startswith("customer_id,name,phone,email,stage")
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted(ids)
    r = await platform.request(
        "POST",
        "/v1/segments",
        key=key,
        json={"name": "bad", "filter": {"field": "stage", "op": "eq", "value": "asleep"}},
    )
    assert r.status_code == 422
    _, other_key = await new_shop(platform)
    r = await platform.request("GET", f"/v1/segments/{segment_id}/count", key=other_key)
    assert r.status_code == 404


async def test_a_policy_change_restages_the_shop(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await post(platform, key, [order(shop, {"id": "c1"}, "o1", "paid", days_ago=12)])
    await wait_for(platform, key, "c1", stage="new")
    policy = await get(platform, key, "/v1/policy")
    assert policy["after_sale_days"] == 15
    r = await platform.request("PUT", "/v1/policy", key=key, json={**policy, "after_sale_days": 10})
    assert r.status_code == 200, r.text
    await wait_for(platform, key, "c1", stage="active")
    r = await platform.request(
        "PUT", "/v1/policy", key=key, json={**policy, "silent_after_days": 10}
    )
    assert r.status_code == 422, "thresholds must increase"
    timeline = await get(platform, key, "/v1/customers/c1/timeline")
    kinds = {(e["kind"], e["detail"].get("current")) for e in timeline}
    assert ("stage", "new") in kinds and ("stage", "active") in kinds


async def test_notes_source_correction_and_list_filters(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    await post(
        platform,
        key,
        [
            order(
                shop,
                {"id": "a", "name": "Alice", "email": "alice@example.com"},
                "o1",
                "paid",
                amount=90_000,
            ),
            order(shop, {"id": "b", "name": "Bob"}, "o2", "paid", amount=1_000),
            order(shop, {"id": "b", "name": "Bob"}, "o3", "paid", amount=2_000, days_ago=2),
        ],
    )
    await wait_for(platform, key, "b", rfm__frequency=2)
    await wait_for(platform, key, "a", rfm__frequency=1)
    r = await platform.request(
        "POST", "/v1/customers/a/notes", key=key, json={"text": "prefers SMS"}
    )
    assert r.status_code == 201
    r = await platform.request("PATCH", "/v1/customers/a", key=key, json={"source": "wechat"})
    assert r.json()["source"] == "wechat"
    timeline = await get(platform, key, "/v1/customers/a/timeline")
    assert any(e["kind"] == "note" and e["detail"]["text"] == "prefers SMS" for e in timeline)
    by_spend = await get(platform, key, "/v1/customers", sort="-monetary")
    assert [c["customer_id"] for c in by_spend["items"]] == ["a", "b"]
    assert [
        c["customer_id"]
        for c in (await get(platform, key, "/v1/customers", min_frequency=2))["items"]
    ] == ["b"]
    assert [
        c["customer_id"] for c in (await get(platform, key, "/v1/customers", q="alice@"))["items"]
    ] == ["a"]
    assert [
        c["customer_id"]
        for c in (await get(platform, key, "/v1/customers", stage="after_sale"))["items"]
    ] == ["b"]
    overview = await get(platform, key, "/v1/overview")
    assert overview["stages"]["new"] == 1 and overview["stages"]["after_sale"] == 1
    assert overview["returning_share"] == 0.5
    assert overview["aov_returning"] == {"amount_minor": 1500, "currency": "CNY"}
    assert overview["aov_new"] == {"amount_minor": 90_000, "currency": "CNY"}
    assert overview["previous"]["stages"]["new"] == 0, "30 days ago nobody had bought"
    cycle = overview["repurchase_cycle_days"]
    assert cycle["repeat_purchases"] == 1
    assert 0.99 < cycle["p50"] < 1.01, "Bob bought again a day after his first order"


async def test_time_alone_moves_a_customer_to_sleeping(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    almost = 180 - 4 / 86400  # the sleeping threshold is four seconds away
    await post(platform, key, [order(shop, {"id": "c1"}, "o1", "paid", days_ago=almost)])
    await wait_for(platform, key, "c1", stage="silent")
    await wait_for(platform, key, "c1", stage="sleeping")
    timeline = await get(platform, key, "/v1/customers/c1/timeline")
    assert {"previous": "silent", "current": "sleeping"} in [
        e["detail"] for e in timeline if e["kind"] == "stage"
    ]


# --- the overview, computed in the database -------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def figures_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """Lifecycle's customers and orders tables, empty, on SQLite or PostgreSQL."""
    if request.param == "sqlite":
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'figures.db'}")
    else:
        engine = create_async_engine(await fresh_database(request.getfixturevalue("pg_url")))
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all, tables=[customers, orders])
    yield engine
    await engine.dispose()


def random_shop(
    rng: random.Random, now: datetime, policy: StagePolicy, people: int = 300
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Customer rows (as the live profiles hold them) and order rows of one shop "s", with
    times often within a microsecond of a boundary of `now` or of 30 days before it."""
    boundaries = [
        0,
        7,
        30,
        365,
        policy.interested_days,
        policy.after_sale_days,
        policy.silent_after_days,
        policy.sleeping_after_days,
        policy.churned_after_days,
    ]

    def when() -> datetime:
        if rng.random() < 0.5:
            return now - timedelta(days=rng.uniform(-5, 500))
        anchor = now - timedelta(days=rng.choice([0, 30]))
        return anchor - timedelta(days=rng.choice(boundaries), microseconds=rng.choice([-1, 0, 1]))

    def maybe(value: Any) -> Any:
        return value if rng.random() < 0.7 else None

    customer_rows, order_rows = [], []
    for i in range(people):
        first, last = sorted([when(), when()])
        frequency = rng.choice([0, 0, 1, 1, 2, 3, 7])
        customer_rows.append(
            {
                "shop_id": "s",
                "customer_id": f"c{i}",
                "first_seen_at": now - timedelta(days=600),
                "stage": rng.choice(STAGES),
                "frequency": frequency,
                "monetary_minor": rng.choice([0, 990, 25_900, 600_000, 10**13]) if frequency else 0,
                "currency": maybe("CNY"),
                "member_level": maybe(rng.choice(["VIP1", "VIP2", "GOLD"])),
                "first_order_at": maybe(first),
                "last_order_at": maybe(last),
                "last_interest_at": maybe(when()),
                "merged_into": "c0" if rng.random() < 0.05 else None,
            }
        )
        for k in range(rng.choice([0, 1, 1, 2, 3, 5])):
            created = maybe(when())
            total = maybe(rng.choice([990, 25_900, 600_000, 10**13]))
            status_times = {
                name: maybe(when()) if rng.random() < 0.5 else None
                for name in ("paid_at", "shipped_at", "completed_at", "cancelled_at")
            }
            refunded_at = when() if rng.random() < 0.2 else None
            order_rows.append(
                {
                    "shop_id": "s",
                    "order_id": f"c{i}-o{k}",
                    "customer_id": f"c{i}",
                    "status": "created",
                    "total_minor": total,
                    "currency": maybe("CNY"),
                    "refunded_minor": rng.choice([0, 500, (total or 0) * 2]) if refunded_at else 0,
                    "created_at": created,
                    "refunded_at": refunded_at,
                    "data_time": now,
                    **status_times,
                }
            )
    # Another shop's rows change nothing.
    customer_rows.append({**customer_rows[1], "shop_id": "other"})
    order_rows += [{**o, "shop_id": "other"} for o in order_rows[:5]]
    return customer_rows, order_rows


@dataclass(frozen=True)
class Person:
    stage: str
    frequency: int
    monetary: int
    currency: str | None
    level: str | None
    first_order_at: datetime | None
    last_order_at: datetime | None
    last_interest_at: datetime | None


def figures_in_python(now: datetime, people: list[Person]) -> Figures:
    """The overview's figures as they were computed before, one Python object per
    customer (the currency: the smallest code among the buyers')."""
    stages = dict.fromkeys(STAGES, 0)
    for p in people:
        stages[p.stage] += 1
    buyers = [p for p in people if p.frequency > 0]
    returning = [p for p in buyers if p.frequency > 1]
    first_time = [p for p in buyers if p.frequency == 1]
    currency = min((p.currency for p in buyers if p.currency), default=None)

    def aov(group: list[Person]) -> Money | None:
        orders_count = sum(p.frequency for p in group)
        if not orders_count or currency is None:
            return None
        return Money(amount_minor=sum(p.monetary for p in group) // orders_count, currency=currency)

    def rate(stage: str) -> float | None:
        in_stage = [p for p in people if p.stage == stage]
        if not in_stage:
            return None
        return round(sum(1 for p in in_stage if p.frequency > 1) / len(in_stage), 4)

    def after(t: datetime | None, days: int) -> bool:
        return t is not None and t > now - timedelta(days=days)

    return Figures(
        as_of=now,
        interested_30d=sum(1 for p in people if p.frequency == 0 and after(p.last_interest_at, 30)),
        buyers_365d=sum(1 for p in buyers if after(p.last_order_at, 365)),
        members=sum(1 for p in people if p.level is not None),
        new_customers_7d=sum(1 for p in buyers if after(p.first_order_at, 7)),
        stages=stages,
        returning_share=round(len(returning) / len(buyers), 4) if buyers else None,
        repurchase_rate_by_stage={stage: rate(stage) for stage in STAGES},
        aov_new=aov(first_time),
        aov_returning=aov(returning),
    )


def as_of_in_python(
    customer_rows: list[dict[str, Any]],
    order_rows: list[dict[str, Any]],
    at: datetime,
    policy: StagePolicy,
) -> list[Person]:
    """Each customer with an order placed by `at`, derived by `derivation.derive` from its
    orders as they were known at `at` (later statuses and refunds unknown)."""
    merged = {r["customer_id"] for r in customer_rows if r["merged_into"] and r["shop_id"] == "s"}
    placed: dict[str, list[SimpleNamespace]] = {}
    for o in order_rows:
        if o["shop_id"] != "s" or o["created_at"] is None or o["created_at"] > at:
            continue
        known = {
            name: t if t is not None and t <= at else None
            for name in ("paid_at", "shipped_at", "completed_at", "cancelled_at", "refunded_at")
            for t in [o[name]]
        }
        row = {
            **o,
            **known,
            "refunded_minor": o["refunded_minor"] if known["refunded_at"] else 0,
            "item_count": 1,
            "shipping_province": None,
            "shipping_city": None,
        }
        placed.setdefault(o["customer_id"], []).append(SimpleNamespace(**row))
    people = []
    for cid, rows in placed.items():
        if cid in merged:
            continue
        interest = max(r.created_at for r in rows)
        before = SimpleNamespace(last_interest_at=interest, currency=None, province=None, city=None)
        d = derive(before, rows, policy, at, ZoneInfo("UTC"))
        people.append(
            Person(
                d.stage,
                d.frequency,
                d.monetary,
                min((r.currency for r in rows if r.currency and is_purchase(r)), default=None),
                d.level,
                d.first_order_at,
                d.last_order_at,
                interest,
            )
        )
    return people


def cycle_in_python(order_rows: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """Percentiles (nearest rank) of the days between a customer's consecutive purchases."""
    by_customer: dict[str, list[datetime]] = {}
    for o in order_rows:
        if o["shop_id"] == "s" and o["created_at"] and is_purchase(SimpleNamespace(**o)):
            by_customer.setdefault(o["customer_id"], []).append(o["created_at"])
    gaps = sorted(
        (b - a).total_seconds() / 86400
        for times in by_customer.values()
        for a, b in itertools.pairwise(sorted(times))
    )

    def rank(q: float) -> float | None:
        if not gaps:
            return None
        return round(gaps[max(0, min(len(gaps) - 1, int(q * len(gaps) + 0.999999) - 1))], 2)

    return {
        "repeat_purchases": len(gaps),
        "p25": rank(0.25),
        "p50": rank(0.5),
        "p75": rank(0.75),
        "p90": rank(0.9),
    }


POLICIES = [
    DEFAULT_POLICY,
    StagePolicy(
        interested_days=7,
        after_sale_days=10,
        silent_after_days=30,
        sleeping_after_days=60,
        churned_after_days=365,
        level_basis="orders",
        levels=(Level(name="GOLD", threshold=2), Level(name="PLATINUM", threshold=3)),
    ),
    StagePolicy(levels=()),
]


@pytest.mark.parametrize("seed", [1, 2])
async def test_overview_figures_in_sql_equal_the_python_computation(
    figures_db: AsyncEngine, seed: int
) -> None:
    """The overview is aggregated in the database now; the answer is what one Python
    object per customer gave, on SQLite and PostgreSQL, with times on the boundaries."""
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(microsecond=123_456)
    at = now - timedelta(days=30)
    for policy in POLICIES:
        customer_rows, order_rows = random_shop(rng, now, policy)
        async with figures_db.begin() as conn:
            await conn.execute(delete(customers))
            await conn.execute(delete(orders))
            await conn.execute(customers.insert(), customer_rows)
            await conn.execute(orders.insert(), order_rows)
        live = [
            Person(
                r["stage"],
                r["frequency"],
                r["monetary_minor"],
                r["currency"],
                r["member_level"],
                r["first_order_at"],
                r["last_order_at"],
                r["last_interest_at"],
            )
            for r in customer_rows
            if r["shop_id"] == "s" and r["merged_into"] is None
        ]
        async with figures_db.connect() as conn:
            assert await queries.figures_now(conn, "s", now) == figures_in_python(now, live)
            assert await queries.figures_as_of(conn, "s", at, policy) == figures_in_python(
                at, as_of_in_python(customer_rows, order_rows, at, policy)
            )
            assert await queries.repurchase_cycle(conn, "s") == cycle_in_python(order_rows)
            empty = await queries.figures_now(conn, "nobody", now)
            assert empty.stages == dict.fromkeys(STAGES, 0) and empty.returning_share is None
            assert await queries.repurchase_cycle(conn, "nobody") == {
                "repeat_purchases": 0,
                "p25": None,
                "p50": None,
                "p75": None,
                "p90": None,
            }


async def test_the_overview_of_a_large_shop_is_computed_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """10,000 customers with two purchases each: the overview's Python allocations stay
    within a few megabytes (one object per customer or order took ~14 MB here; a shop of
    1,000,000 would take gigabytes), because the database does the aggregating."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'large.db'}")
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all, tables=[customers, orders])
            people = range(10_000)
            await conn.execute(
                customers.insert(),
                [
                    {
                        "shop_id": "s",
                        "customer_id": f"c{i:05d}",
                        "first_seen_at": now,
                        "stage": "active",
                        "frequency": 2,
                        "monetary_minor": 2000,
                        "currency": "CNY",
                        "first_order_at": now - timedelta(days=100 + i % 50),
                        "last_order_at": now - timedelta(days=i % 40),
                    }
                    for i in people
                ],
            )
            await conn.execute(
                orders.insert(),
                [
                    {
                        "shop_id": "s",
                        "order_id": f"o{i}-{k}",
                        "customer_id": f"c{i:05d}",
                        "status": "paid",
                        "total_minor": 1000,
                        "currency": "CNY",
                        "created_at": now - timedelta(days=100 + 7 * k + i % 50),
                        "paid_at": now - timedelta(days=100 + 7 * k),
                        "data_time": now,
                    }
                    for i in people
                    for k in range(2)
                ],
            )
        tracemalloc.start()
        try:
            async with engine.connect() as conn:
                current = await queries.figures_now(conn, "s", now)
                before = await queries.figures_as_of(
                    conn, "s", now - timedelta(days=30), DEFAULT_POLICY
                )
                cycle = await queries.repurchase_cycle(conn, "s")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        await engine.dispose()
    assert current.stages["active"] == 10_000
    assert before.returning_share == 1.0
    assert cycle["repeat_purchases"] == 10_000 and cycle["p50"] == 7.0
    assert peak < 3_000_000, f"{peak / 1e6:.1f} MB allocated in Python"

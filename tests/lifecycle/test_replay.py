"""Replaying a few thousand generated orders through ingest ends in the stage
distribution, tags and overview figures an independent recomputation gives."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.lifecycle import reference
from tests.lifecycle.scenarios import PATHS, order_events
from tests.platform import Platform

CUSTOMERS = 300


def generate(shop: str, rng: random.Random, now: datetime) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for c in range(CUSTOMERS):
        for o in range(rng.randint(0, 6)):
            # Whole days plus noon keeps every purchase far from a boundary at test time.
            created = (now - timedelta(days=rng.randint(1, 500))).replace(
                hour=12, minute=0, second=0, microsecond=0
            )
            if abs((now - created) - timedelta(days=round((now - created).days))) < timedelta(
                hours=2
            ):
                created -= timedelta(hours=6)
            total = rng.choice([990, 25_900, 60_000, 250_000, 600_000])
            events += order_events(
                shop,
                f"c{c:03d}",
                f"c{c:03d}-o{o}",
                rng.choice(PATHS),
                created,
                total,
                refund=rng.choice([total, total // 2]),
            )
    rng.shuffle(events)
    return events


@pytest.fixture
def platform(replay_platform: Platform) -> Platform:
    """Default batch sizes: the replay is about 1,700 events."""
    return replay_platform


async def test_replayed_orders_match_an_independent_recomputation(platform: Platform) -> None:
    shop = f"shop-{uuid.uuid4().hex[:8]}"
    key = await platform.create_shop(shop)
    now = datetime.now(UTC)
    events = generate(shop, random.Random(11), now)
    assert len(events) > 1500
    r = await platform.request(
        "POST",
        "/v1/tags",
        key=key,
        json={
            "name": "loyal",
            "rule": {
                "all": [
                    {"field": "frequency", "op": "gte", "value": 3},
                    {"field": "recency_days", "op": "lt", "value": 180},
                ]
            },
        },
    )
    assert r.status_code == 201
    for start in range(0, len(events), 1000):
        r = await platform.request("POST", "/v1/events", key=key, json=events[start : start + 1000])
        assert r.status_code == 202, r.text

    people = reference.model(events)
    check_at = datetime.now(UTC)
    expected = {cid: reference.figures(p, check_at) for cid, p in people.items()}
    expected_loyal = sorted(
        cid
        for cid, p in people.items()
        if expected[cid]["frequency"] >= 3
        and any(
            check_at - o.created_at < timedelta(days=180)
            for o in p.orders.values()
            if set(reference.PAID_OR_LATER) & o.reached
        )
    )

    async def listed() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cursor:
                params["cursor"] = cursor
            page = (await platform.request("GET", "/v1/customers", key=key, params=params)).json()
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items

    # Everything published is applied once the markers behind it are: then the figures
    # must be exact (a refund applied twice shows as monetary too low, not as a timeout).
    await platform.settle()
    items = {i["customer_id"]: i for i in await listed()}
    assert sorted(items) == sorted(expected)
    assert sorted(cid for cid, i in items.items() if "loyal" in i["tags"]) == expected_loyal
    for cid, figures in expected.items():
        got = items[cid]
        assert (got["stage"], got["rfm"]["frequency"], got["returning"], got["member_level"]) == (
            figures["stage"],
            figures["frequency"],
            figures["returning"],
            figures["member_level"],
        ), cid
        assert (got["rfm"]["monetary"] or {"amount_minor": 0})["amount_minor"] == figures[
            "monetary"
        ], cid
    overview = (await platform.request("GET", "/v1/overview", key=key)).json()
    stages = Counter(f["stage"] for f in expected.values())
    assert overview["stages"] == {s: stages.get(s, 0) for s in overview["stages"]}
    buyers = [f for f in expected.values() if f["frequency"] > 0]
    assert overview["members"] == sum(1 for f in expected.values() if f["member_level"])
    assert overview["returning_share"] == round(
        sum(1 for f in buyers if f["returning"]) / len(buyers), 4
    )
    last_purchase = {
        cid: max(
            (o.created_at for o in p.orders.values() if set(reference.PAID_OR_LATER) & o.reached),
            default=None,
        )
        for cid, p in people.items()
    }
    assert overview["buyers_365d"] == sum(
        1 for t in last_purchase.values() if t and check_at - t < timedelta(days=365)
    )

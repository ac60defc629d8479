"""One order's events, however they are shuffled and split into batches, end in one stored
row: the same owner, total, items, shipping, status times and refunds (both modes). A
batch folds its own events in Python and the stored row in SQL; this fails whenever the
two foldings disagree or either depends on arrival order."""

from __future__ import annotations

import uuid
from datetime import timedelta
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from libs.common.db import Database
from libs.common.events import Envelope, parse_event
from libs.common.inbox import claim_new
from services.lifecycle.handlers import apply_events
from services.lifecycle.models import customers, orders
from tests.lifecycle.scenarios import EPOCH

STATUSES = ("created", "paid", "shipped", "completed", "refunded")
IDENTITIES = (
    {"id": "acct-1", "email": "owner@example.com"},
    {"phone": "+8613800138000"},
    {"email": "guest@example.com"},
    {"email": "other@example.com"},
)


@st.composite
def order_history(draw: st.DrawFn, shop: str) -> list[dict[str, Any]]:
    """Events about one order, each carrying a random part of what platforms send."""
    count = draw(st.integers(2, 6))
    events = []
    for n in range(count):
        status = draw(st.sampled_from(STATUSES))
        data: dict[str, Any] = {
            "order_id": "o-1",
            "customer": draw(st.sampled_from(IDENTITIES)),
            "status": status,
        }
        if draw(st.booleans()):
            data["total"] = {"amount_minor": draw(st.integers(100, 9_999)), "currency": "CNY"}
        if draw(st.booleans()):
            data["items"] = [{"sku": "LJ", "quantity": draw(st.integers(1, 5))}]
        if draw(st.booleans()):
            data["shipping"] = {"city": draw(st.sampled_from(("杭州市", "上海市", "北京市")))}
        if status == "refunded":
            data["refund"] = {"amount_minor": draw(st.integers(1, 99)), "currency": "CNY"}
        at = EPOCH + timedelta(minutes=draw(st.integers(0, 30)))
        events.append(
            {
                "specversion": "1.0",
                "id": f"e{n}",
                "source": f"gen/{shop}",
                "type": f"order.{status}",
                "time": at.isoformat(),
                "shop_id": shop,
                "data": data,
            }
        )
    return events


async def deliver(db: Database, batches: list[list[Envelope]]) -> None:
    for batch in batches:
        async with db.begin() as conn:
            new = await claim_new(conn, "lifecycle", [e.dedupe_key for e in batch])
            fresh = [e for e in batch if e.dedupe_key in new]
            if fresh:
                await apply_events(conn, fresh, namespace="", now=EPOCH + timedelta(days=1))


COLUMNS = (
    "customer_id",
    "total_minor",
    "currency",
    "item_count",
    "shipping_city",
    "created_at",
    "paid_at",
    "shipped_at",
    "completed_at",
    "refunded_at",
    "refunded_minor",
)


async def stored(db: Database, shop: str) -> tuple[dict[str, Any], dict[str, int]]:
    async with db.begin() as conn:
        row = (
            (
                await conn.execute(
                    select(*(orders.c[n] for n in COLUMNS)).where(orders.c.shop_id == shop)
                )
            )
            .mappings()
            .one()
        )
        buyers = {
            r.customer_id: r.frequency
            for r in await conn.execute(
                select(customers.c.customer_id, customers.c.frequency).where(
                    customers.c.shop_id == shop, customers.c.frequency > 0
                )
            )
        }
    return {n: row[n] or None for n in COLUMNS}, buyers


@given(data=st.data())
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_an_orders_row_does_not_depend_on_arrival_or_batching(
    lifecycle_db: Database, data: st.DataObject
) -> None:
    one, other = f"s{uuid.uuid4().hex[:10]}", f"s{uuid.uuid4().hex[:10]}"
    history = data.draw(order_history(one), label="history")
    arrival = data.draw(st.permutations(history), label="arrival")
    splits = data.draw(st.lists(st.integers(1, len(arrival)), max_size=3), label="splits")

    def as_shop(events: list[dict[str, Any]], shop: str) -> list[Envelope]:
        return [parse_event({**e, "shop_id": shop, "source": f"gen/{shop}"}) for e in events]

    shuffled = as_shop(arrival, one)
    cuts = sorted({0, *splits, len(shuffled)})
    await deliver(lifecycle_db, [shuffled[a:b] for a, b in pairwise(cuts)])
    # The reference: oldest first, one event per transaction.
    in_time = as_shop(sorted(history, key=lambda e: (e["time"], e["id"])), other)
    await deliver(lifecycle_db, [[e] for e in in_time])

    got, got_buyers = await stored(lifecycle_db, one)
    want, want_buyers = await stored(lifecycle_db, other)
    assert got == want
    assert got_buyers == want_buyers
    assert sum(got_buyers.values()) <= 1, "one order is at most one purchase of one buyer"
    if got_buyers:
        assert got_buyers == {got["customer_id"]: 1}


@pytest.mark.parametrize("batching", ["together", "apart"])
async def test_a_tie_of_strength_and_time_goes_to_the_smaller_event_id(
    lifecycle_db: Database, batching: str
) -> None:
    """Found by the property above: two events of one order at the same instant, naming two
    emails. Whatever order they arrive in, alone or in one batch, the same one owns it."""
    shop = f"s{uuid.uuid4().hex[:10]}"

    def created(event_id: str, email: str) -> Envelope:
        return parse_event(
            {
                "specversion": "1.0",
                "id": event_id,
                "source": f"gen/{shop}",
                "type": "order.created",
                "time": "2025-01-01T00:00:00+00:00",
                "shop_id": shop,
                "data": {"order_id": "o-1", "customer": {"email": email}, "status": "created"},
            }
        )

    late, early = created("e1", "other@example.com"), created("e0", "guest@example.com")
    await deliver(lifecycle_db, [[late, early]] if batching == "together" else [[late], [early]])
    row, _ = await stored(lifecycle_db, shop)
    assert row["customer_id"] == "guest@example.com"

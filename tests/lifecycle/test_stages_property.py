"""The lifecycle service against an independent reference model: random histories,
delivered shuffled, duplicated and in random batches under a moving clock, end in the
figures and stages the spec gives (in both modes)."""

from __future__ import annotations

import functools
import uuid
from datetime import timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from libs.common.db import Database
from libs.common.db.tables import outbox
from libs.common.events import Envelope, parse_event
from libs.common.inbox import claim_new
from libs.common.timers import TimerWorker
from services.lifecycle.derivation import RESTAGE_TIMER, on_restage_timers
from services.lifecycle.handlers import apply_events
from services.lifecycle.models import customers
from tests.lifecycle import reference
from tests.lifecycle.scenarios import EPOCH, histories


async def deliver(db: Database, batch: list[Envelope], now: Any) -> None:
    """What the consumer does with a batch: skip seen ids, apply the rest, one transaction."""
    async with db.begin() as conn:
        new = await claim_new(conn, "lifecycle", [e.dedupe_key for e in batch])
        fresh = list({e.dedupe_key: e for e in batch if e.dedupe_key in new}.values())
        if fresh:
            await apply_events(conn, fresh, namespace="", now=now)


@given(data=st.data())
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_service_converges_to_the_reference_model(
    lifecycle_db: Database, data: st.DataObject
) -> None:
    shop = f"s{uuid.uuid4().hex[:10]}"
    events = data.draw(histories(shop), label="history")
    duplicates = data.draw(st.lists(st.sampled_from(events), max_size=6)) if events else []
    arrival = data.draw(st.permutations(events + duplicates), label="arrival")
    envelopes = [parse_event(e) for e in arrival]

    clock = EPOCH
    position = 0
    while position < len(envelopes):
        size = data.draw(st.integers(1, 8))
        batch = envelopes[position : position + size]
        position += size
        clock = max(clock, *(e.time for e in batch)) + timedelta(
            minutes=data.draw(st.integers(0, 600))
        )
        await deliver(lifecycle_db, batch, clock)

    final = clock + timedelta(days=data.draw(st.integers(0, 500), label="days later"))
    purchases = [
        o.created_at
        for p in reference.model(arrival).values()
        for o in p.orders.values()
        if set(reference.PAID_OR_LATER) & o.reached
    ]
    probe = data.draw(st.booleans(), label="probe a boundary")
    if purchases and probe:
        # Put the clock right around a stage boundary of the latest purchase.
        boundary = data.draw(st.sampled_from([15, 90, 180, 365]))
        nudge = data.draw(st.sampled_from([-1440, -2, 0, 2, 1440]))
        final = max(clock, max(purchases) + timedelta(days=boundary, minutes=nudge))
    worker = TimerWorker(
        lifecycle_db,
        "lifecycle",
        {RESTAGE_TIMER: functools.partial(on_restage_timers, namespace="", now=final)},
        clock=lambda: final,
    )
    for _ in range(20):
        if not await worker.fire_due():
            break

    expected = {cid: reference.figures(p, final) for cid, p in reference.model(arrival).items()}
    async with lifecycle_db.connect() as conn:
        rows = (await conn.execute(select(customers).where(customers.c.shop_id == shop))).all()
        emitted = [
            orjson.loads(r.value)
            for r in await conn.execute(
                select(outbox.c.value).where(outbox.c.key.like(f"{shop}:%")).order_by(outbox.c.id)
            )
        ]
    actual = {
        r.customer_id: {
            "frequency": r.frequency,
            "monetary": r.monetary_minor,
            "stage": r.stage,
            "returning": r.is_returning,
            "member_level": r.member_level,
        }
        for r in rows
    }
    assert actual == expected

    for cid, figures in expected.items():
        changes = [
            e["data"]
            for e in emitted
            if e["type"] == "customer.stage_changed" and e["subject"] == cid
        ]
        chain = ["prospect"] + [c["current"] for c in changes]
        assert [c["previous"] for c in changes] == chain[:-1], (
            "each change starts where the last ended"
        )
        assert chain[-1] == figures["stage"]

"""Frequency caps read a fired batch's recent sends once, not once per message.

Forty reminders of a capped journey (one message a day per customer) come due in one
batch; half of the customers already got a message today. The fire requests the other
twenty and skips those, and the sends table is read by one statement for the batch (the
walk asked once per reminder and cap before)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import event, func, insert, select

from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.db.tables import shops, timers
from libs.common.settings import Settings
from libs.common.timers import Timer, timer_key
from services.campaigns import migrations
from services.campaigns.engine import TIMER_KINDS
from services.campaigns.firing import fire_timers
from services.campaigns.models import enrollments, journey_versions, journeys, sends

SHOP = "cap-shop"
JOURNEY = "j_capped"
CUSTOMERS = 40
DEFINITION = {
    "name": "capped reminder",
    "category": "marketing",
    "key": "order",
    "trigger": {"event": "order.created"},
    "steps": [
        {"id": "wait", "wait": "PT1H"},
        {"id": "send", "send": {"channel": "sms", "template": "nudge"}},
    ],
    "reentry": {"per": "order"},
    "caps": [{"scope": "journey", "max": 1, "period": "P1D", "on_cap": "skip"}],
}


@contextmanager
def reads_of_sends(db: Database) -> Iterator[list[str]]:
    """Every SELECT statement on the sends table run meanwhile."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "journey_sends" in statement:
            seen.append(statement)

    engine = db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def _seed(db: Database, now: datetime) -> list[Timer]:
    context = orjson.dumps({"facts": {}, "vars": {"order": {"id": "x"}}, "trigger": "x"})
    due = now - timedelta(seconds=1)
    fired = []
    async with db.begin() as conn:
        await conn.execute(
            insert(shops).values(
                shop_id=SHOP, name=SHOP, timezone="Asia/Shanghai", currency="CNY", created_at=now
            )
        )
        await conn.execute(
            insert(journeys).values(
                shop_id=SHOP,
                journey_id=JOURNEY,
                name="capped",
                category="marketing",
                status="active",
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
        await conn.execute(
            insert(journey_versions).values(
                shop_id=SHOP,
                journey_id=JOURNEY,
                version=1,
                definition=orjson.dumps(DEFINITION).decode(),
                created_at=now,
                active_since=now - timedelta(days=1),
            )
        )
        for n in range(CUSTOMERS):
            eid = f"e{n}"
            await conn.execute(
                insert(enrollments).values(
                    shop_id=SHOP,
                    enrollment_id=eid,
                    journey_id=JOURNEY,
                    version=1,
                    customer_id=f"c{n}",
                    order_id=f"o{n}",
                    status="waiting",
                    step_id="wait",
                    due_at=due,
                    held_out=False,
                    context=context.decode(),
                    entered_at=due - timedelta(hours=1),
                    updated_at=due,
                    messaged=False,
                )
            )
            payload = {"e": eid, "s": "wait", "m": "wait"}
            key = timer_key(SHOP, "enr", eid)
            kind = TIMER_KINDS["marketing"]
            await conn.execute(
                insert(timers).values(
                    key=key,
                    kind=kind,
                    shop_id=SHOP,
                    due_at=due,
                    payload=orjson.dumps(payload).decode(),
                    attempts=0,
                )
            )
            fired.append(Timer(key, kind, SHOP, due, payload))
            if n % 2 == 0:  # this customer got the journey's message two hours ago
                await conn.execute(
                    insert(sends).values(
                        shop_id=SHOP,
                        idempotency_key=f"earlier-{n}",
                        journey_id=JOURNEY,
                        version=1,
                        enrollment_id=f"earlier-{n}",
                        customer_id=f"c{n}",
                        category="marketing",
                        channel="sms",
                        requested_at=now - timedelta(hours=2),
                        status="requested",
                        reason=None,
                    )
                )
    return fired


async def test_a_capped_batch_reads_the_sends_once(settings: Settings) -> None:
    db = Database(settings.database_url_for("campaigns"), "campaigns")
    try:
        await db.ensure_schema()
        await migrate(db, migrations)
        now = datetime.now(UTC)
        fired = await _seed(db, now)
        with reads_of_sends(db) as reads:
            async with db.begin() as conn:
                await fire_timers(conn, fired, now=now)
        async with db.connect() as conn:
            requested = (
                await conn.execute(select(sends.c.customer_id).where(sends.c.requested_at == now))
            ).scalars()
            statuses: dict[str, int] = dict(
                list(
                    await conn.execute(
                        select(enrollments.c.status, func.count()).group_by(enrollments.c.status)
                    )
                )
            )
    finally:
        await db.dispose()
    assert sorted(requested) == sorted(f"c{n}" for n in range(1, CUSTOMERS, 2))
    assert statuses == {"completed": CUSTOMERS}
    assert len(reads) == 1, f"{len(reads)} reads of the sends for one batch"

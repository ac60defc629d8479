"""What the notifier did with each requested message (`notification.status`), kept on the
journey's send row and counted for its report: sent, delivered, failed, and suppressed or
skipped with the reason. Each status counts once per message however often it arrives."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence

from sqlalchemy import select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.events import Envelope
from services.campaigns.engine import add_counts
from services.campaigns.models import sends

REPORTED = ("sent", "delivered", "failed", "suppressed", "skipped")


async def apply_statuses(conn: AsyncConnection, events: Sequence[Envelope]) -> None:
    wanted = sorted(
        {(e.shop_id, str(e.data["idempotency_key"])) for e in events if "idempotency_key" in e.data}
    )
    if not wanted:
        return
    s = sends.c
    rows = {
        (r.shop_id, r.idempotency_key): r
        for r in await conn.execute(
            select(s.shop_id, s.idempotency_key, s.journey_id, s.version, s.status).where(
                tuple_(s.shop_id, s.idempotency_key).in_(wanted)
            )
        )
    }
    seen: dict[tuple[str, str], set[str]] = {}
    tally: Tally[tuple[str, str, int, str]] = Tally()
    latest: dict[tuple[str, str], tuple[str, str | None]] = {}
    for event in events:
        key = (event.shop_id, str(event.data.get("idempotency_key")))
        row = rows.get(key)
        status = str(event.data.get("status"))
        if row is None or status not in REPORTED:
            continue  # not a journey's message (or one this version does not know)
        statuses = seen.setdefault(key, {row.status})
        if status in statuses:
            continue
        statuses.add(status)
        reason = event.data.get("reason")
        tally[(row.shop_id, row.journey_id, row.version, f"msg:{status}")] += 1
        if status in ("suppressed", "skipped", "failed"):
            label = str(reason or "unknown")[:60]
            tally[(row.shop_id, row.journey_id, row.version, f"{status}:{label}")] += 1
        latest[key] = (status, str(reason)[:200] if reason else None)
    for (shop, idempotency_key), (status, reason) in sorted(latest.items()):
        await conn.execute(
            update(sends)
            .where(s.shop_id == shop, s.idempotency_key == idempotency_key)
            .values(status=status, reason=reason)
        )
    await add_counts(conn, tally)

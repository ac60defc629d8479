"""A message's status changes: its history rows, and each change that a journey report
counts emitted as `notification.status` through the outbox, in the same transaction.

Statuses: `queued` (waiting for its send), `deferred` (quiet hours, a rate limit or a
retry: its timer says when), `sending` (a provider call is under way or its outcome is
being reconciled), `sent` (the provider accepted it), `delivered` (the provider's receipt
said so), `failed` (with the provider's code and message, or the rule that failed it),
`suppressed` (a rule stopped it before any call: no consent, opted out, bounced, no
address).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Counter
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus import Message
from libs.common.db.keysets import by_shop
from libs.common.events import NotificationStatusData, new_event, topic_for
from libs.common.outbox import enqueue
from services.notifier.models import history

EMITTED = ("sent", "delivered", "failed", "suppressed")
"""The statuses `notification.status` carries (the journey reports count them)."""

MESSAGES = Counter(
    "huitou_notifier_messages_total",
    "Message status changes, by channel and status",
    ["channel", "status"],
)


@dataclass
class Change:
    shop_id: str
    message_id: str
    status: str
    reason: str | None
    at: datetime
    message: dict[str, Any] = field(default_factory=dict)
    """The message's row (channel, idempotency key, provider, provider id)."""


async def record(
    conn: AsyncConnection, changes: Sequence[Change], *, namespace: str, first: bool = False
) -> None:
    """Append the changes to the history and emit those a report counts. `first`: the
    messages are new (their history starts at 1 without a read)."""
    if not changes:
        return
    seqs: dict[tuple[str, str], int] = {}
    if not first:
        h = history.c
        keys = {(c.shop_id, c.message_id) for c in changes}
        for where in by_shop(history, "message_id", keys):
            for shop, message_id, seq in await conn.execute(
                select(h.shop_id, h.message_id, func.max(h.seq))
                .where(where)
                .group_by(h.shop_id, h.message_id)
            ):
                seqs[(shop, message_id)] = int(seq)
    rows = []
    out = []
    for change in changes:
        key = (change.shop_id, change.message_id)
        seqs[key] = seqs.get(key, 0) + 1
        rows.append(
            {
                "shop_id": change.shop_id,
                "message_id": change.message_id,
                "seq": seqs[key],
                "status": change.status,
                "reason": change.reason,
                "at": change.at,
            }
        )
        MESSAGES.labels(str(change.message.get("channel")), change.status).inc()
        if change.status in EMITTED:
            out.append(_status_event(change, seqs[key], namespace))
    await conn.execute(insert(history), rows)
    await enqueue(conn, out)


def _status_event(change: Change, seq: int, namespace: str) -> Message:
    m = change.message
    event = new_event(
        type="notification.status",
        shop_id=change.shop_id,
        source=f"huitou/notifier/{change.shop_id}",
        data=NotificationStatusData(
            idempotency_key=m["idempotency_key"],
            status=change.status,
            channel=m["channel"],
            reason=change.reason,
            provider=m.get("provider"),
            provider_message_id=m.get("provider_message_id"),
        ),
        subject=m.get("customer_id"),
        # One event per history row: a replayed change is the same event.
        id=hashlib.sha256(f"{change.message_id}|{seq}".encode()).hexdigest()[:40],
        time=change.at,
    )
    return Message(topic_for(event.type, namespace), event.key, event.to_bytes())

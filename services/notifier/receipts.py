"""What providers tell the notifier after a send, and what recipients tell it back.

`apply` records, in one transaction, the receipts of one callback request (parsed and
verified by the provider's adapter):

- a delivery report moves its message (found by the provider's message id, or Huitou's
  id where the provider echoes it) from `sent` — or from `sending`, when the report
  arrives before the send's own answer was recorded or after it was lost — to
  `delivered`, or to `failed` with the provider's code; a report for a message already
  `delivered` or `failed`, or for no message of this shop, changes nothing (providers
  repeat their pushes);
- an opt-out: a reply whose whole text is an opt-out keyword (`OPT_OUT_REPLIES`: 退订,
  TD, T, N, R, STOP, …) or a provider's own opt-out report, suppresses the sender's
  address for marketing on that channel (reason `opt_out`);
- a hard bounce or a complaint suppresses the address for every message (`bounce`,
  `complaint`).

What each reason holds back: `rules.MARKETING_ONLY`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from prometheus_client import Counter
from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.timers import cancel, timer_key
from services.notifier.models import messages
from services.notifier.providers.base import Receipt
from services.notifier.sending import suppress
from services.notifier.statuses import Change, record

OPT_OUT_REPLIES: Final = frozenset(
    {"退订", "TD", "T", "N", "R", "STOP", "UNSUBSCRIBE", "拒收", "取消", "退", "QUIT", "CANCEL"}
)
"""Whole replies that mean "no more marketing" (case and surrounding punctuation ignored)."""

RECEIPTS = Counter(
    "huitou_notifier_receipts_total",
    "Provider callbacks' receipts applied, by provider and kind",
    ["provider", "kind"],
)


@dataclass(frozen=True)
class Applied:
    delivered: int = 0
    failed: int = 0
    suppressed: int = 0
    ignored: int = 0


def is_opt_out_reply(text: str | None) -> bool:
    if not text:
        return False
    word = text.strip().strip("。.!！,，\"'“”").strip().upper()
    return word in OPT_OUT_REPLIES


async def apply(
    conn: AsyncConnection,
    shop: str,
    provider: str,
    channel: str,
    receipts: Sequence[Receipt],
    *,
    namespace: str,
    now: datetime,
) -> Applied:
    delivered = failed = suppressed = ignored = 0
    changes: list[Change] = []
    for receipt in receipts:
        RECEIPTS.labels(provider, receipt.kind).inc()
        if receipt.kind in ("delivered", "failed"):
            change = await _report(conn, shop, provider, receipt, now)
            if change is None:
                ignored += 1
                continue
            changes.append(change)
            if change.status == "delivered":
                delivered += 1
            else:
                failed += 1
            continue
        reason = {
            "opt_out": "opt_out",
            "bounce": "bounce",
            "complaint": "complaint",
            "reply": "opt_out" if is_opt_out_reply(receipt.text) else None,
        }.get(receipt.kind)
        if reason is None or not receipt.address:
            ignored += 1
            continue
        await suppress(conn, shop, channel, receipt.address, reason, now)
        suppressed += 1
    await record(conn, changes, namespace=namespace)
    return Applied(delivered, failed, suppressed, ignored)


async def _report(
    conn: AsyncConnection, shop: str, provider: str, receipt: Receipt, now: datetime
) -> Change | None:
    m = messages.c
    ids = []
    if receipt.provider_message_id:
        ids.append(m.provider_message_id == receipt.provider_message_id)
    if receipt.message_id:
        ids.append(m.message_id == receipt.message_id)
    if not ids:
        return None
    query = select(messages).where(
        m.shop_id == shop, m.provider == provider, m.status.in_(("sending", "sent")), or_(*ids)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = (await conn.execute(query.limit(1))).first()
    if row is None:
        return None
    status = "delivered" if receipt.kind == "delivered" else "failed"
    reason = None
    if status == "failed":
        parts = [p for p in (receipt.code, receipt.detail) if p]
        reason = ("undelivered: " + ": ".join(parts or ["no reason given"]))[:300]
    values = {
        "status": status,
        "reason": reason,
        "sending_since": None,
        "updated_at": now,
        "provider_message_id": row.provider_message_id or receipt.provider_message_id,
    }
    await conn.execute(
        update(messages).where(m.shop_id == shop, m.message_id == row.message_id).values(values)
    )
    if row.status == "sending":
        # The receipt settles an attempt whose answer was not recorded: no query needed.
        await cancel(conn, [timer_key(shop, "rec", row.message_id)])
    current = dict(row._mapping)
    current.update(values)
    return Change(shop, row.message_id, status, reason, now, current)

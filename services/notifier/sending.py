"""The sending path: one provider call per attempt, recorded before it is made.

1. `notify.send` fires (`fire_sends`, in the claim's transaction): the shop's rate limit
   is taken from its bucket (a row, so it holds across workers; short of tokens, the
   timer comes back when they are there), the attempt is recorded (`sending`, attempts
   + 1, `sending_since`) with a `notify.reconcile` timer as its safety net, and the call
   is handed to the `Sender` only once that transaction committed (`after_commit`).
   Nothing here runs inside a consumer's transaction, so a redelivered batch never calls
   a provider.
2. The `Sender` calls the provider and records the outcome in a transaction of its own
   (`finish`): `sent`; `failed` with the provider's code (a hard bounce or a provider's
   opt-out also suppresses the address); a transient failure retries with exponential
   backoff and jitter on the durable timers, then fails over to the channel's fallback
   provider, then fails; an unknown outcome (the answer was lost) waits for the
   reconciliation.
3. `notify.reconcile` fires for an attempt still `sending` (the process died between the
   call and its record, or the answer was lost): the provider's status query says
   whether it has the message (`sent`/`failed`) or not (then it is sent again: the
   provider never saw it). Where the provider cannot tell (SMTP), the message is failed
   with the reason `outcome_unknown` rather than risk a second copy: at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from prometheus_client import Counter, Histogram
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db import Database
from libs.common.db.dialect import insert_ignore, upsert
from libs.common.db.keysets import by_shop
from libs.common.timers import Timer, after_commit, cancel, schedule, timer_key
from services.notifier import links, rules
from services.notifier.config import OUTBOX, Channel, load_channels, load_policies
from services.notifier.intake import SEND_TIMER, send_timer
from services.notifier.models import messages, rate_buckets, suppressions
from services.notifier.providers.base import Adapter, Outcome, Outgoing, ProviderTemplate
from services.notifier.statuses import Change, record

log = logging.getLogger(__name__)

RECONCILE_TIMER = "notify.reconcile"
QUERY_GRACE = timedelta(minutes=10)
"""A status query that does not find an attempt younger than this is asked again later
rather than taken as "never sent" (providers' send records can lag the send)."""
BUSY_RETRY = timedelta(seconds=1)
"""When a sender has `max_in_flight` calls under way, when the sends it cannot take yet
are due again."""
ATTEMPTS_PER_PROVIDER = 3
BACKOFF_MAX_S = 300.0
HARD_BOUNCE = {"550", "551", "553", "554"}
"""SMTP codes that mean the mailbox does not exist or refuses for good."""
OPTED_OUT = {"21610"}
"""Provider codes that mean the recipient opted out at the provider (Twilio STOP)."""

CALLS = Counter(
    "huitou_notifier_provider_calls_total",
    "Provider calls by provider and outcome",
    ["provider", "outcome"],
)
CALL_SECONDS = Histogram(
    "huitou_notifier_provider_call_seconds", "Provider call latency", ["provider"]
)


def reconcile_timer(shop: str, message_id: str, due: datetime) -> Timer:
    """The safety net of an attempt still `sending` at `due` (`notifier_reconcile_after_s`)."""
    return Timer(timer_key(shop, "rec", message_id), RECONCILE_TIMER, shop, due, {"m": message_id})


def backoff(attempts: int, base: float) -> timedelta:
    """Exponential from `base` seconds, capped, with jitter (half the ceiling to all of
    it, so retries of a burst spread out)."""
    ceiling = min(BACKOFF_MAX_S, base * 2 ** max(0, attempts - 1))
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))


@dataclass(frozen=True)
class Attempt:
    shop_id: str
    message_id: str
    attempt: int
    provider: str
    settings: Mapping[str, Any]
    outgoing: Outgoing
    reconcile: bool = False
    """A status query of an earlier attempt rather than a send."""


def _outgoing(row: Any, sent_at: datetime, links_of: Links) -> Outgoing:
    template = None
    spec = orjson.loads(row.provider_template).get(row.provider) if row.provider_template else None
    if spec is not None:
        template = ProviderTemplate(spec["id"], spec["params"])
    headers: dict[str, str] = {}
    if row.channel == "email" and row.category == "marketing":
        # RFC 8058 one-click: mail clients POST `List-Unsubscribe=One-Click` to the link.
        url = links_of.unsubscribe(row.shop_id, row.message_id)
        headers = {
            "List-Unsubscribe": f"<{url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
    return Outgoing(
        message_id=row.message_id,
        shop_id=row.shop_id,
        channel=row.channel,
        to=row.recipient or "",
        text=row.body or "",
        subject=row.subject,
        html=row.html,
        template=template,
        headers=headers,
        status_callback=links_of.callback(row.shop_id, row.provider),
        sent_at=sent_at,
    )


@dataclass(frozen=True)
class Links:
    """The public links of a batch's messages (their shops' secrets, read once)."""

    base: str
    secrets: Mapping[str, str]

    def unsubscribe(self, shop: str, message_id: str) -> str:
        return links.unsubscribe_url(self.base, self.secrets[shop], shop, message_id)

    def callback(self, shop: str, provider: str | None) -> str | None:
        if provider != "twilio":
            return None  # only Twilio takes a callback URL per message
        return links.callback_url(self.base, "", shop, provider)

    @classmethod
    async def of(cls, conn: AsyncConnection, base: str, rows: list[Any], now: datetime) -> Links:
        shops = {r.shop_id for r in rows if r.channel == "email" and r.category == "marketing"}
        return cls(base, await links.shop_secrets(conn, shops, now=now))


async def _take(
    conn: AsyncConnection, shop: str, provider: str, rate: rules.RateLimit, wanted: int
) -> tuple[int, float]:
    """Take up to `wanted` tokens from the (shop, provider) bucket: (granted, seconds
    until the rest would be there)."""
    b = rate_buckets.c
    query = select(b.tokens, b.refilled_at).where(b.shop_id == shop, b.provider == provider)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    now = datetime.now(UTC).timestamp()
    tokens, refilled = (float(rate.burst), now) if row is None else (row[0], row[1])
    granted, left, refilled = rules.take_tokens(tokens, refilled, rate, now, wanted)
    await conn.execute(
        upsert(conn, rate_buckets, ["shop_id", "provider"], ["tokens", "refilled_at"]),
        {"shop_id": shop, "provider": provider, "tokens": left, "refilled_at": refilled},
    )
    return granted, rules.wait_for_tokens(left, rate, wanted - granted)


class Sending:
    """The timer handlers and the sender of one notifier process."""

    def __init__(
        self,
        db: Database,
        adapters: Mapping[str, Adapter],
        *,
        namespace: str,
        public_base: str,
        reconcile_after: timedelta = timedelta(seconds=60),
        retry_base: timedelta = timedelta(seconds=2),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        concurrency: int = 64,
        finish_batch: int = 200,
        defaults: Mapping[str, Channel] | None = None,
    ) -> None:
        self.db = db
        self.defaults = dict(defaults or {})
        """The platform's channels for shops that configured none."""
        self.adapters = adapters
        self.namespace = namespace
        self.public_base = public_base
        self.reconcile_after = reconcile_after
        self.retry_base = retry_base
        self.clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.finish_batch = finish_batch
        self.max_in_flight = concurrency * 4
        self._outcomes: list[tuple[Attempt, Outcome | None, asyncio.Future[None]]] = []
        self._finisher: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Let calls under way finish (a call cut off would leave its outcome unknown)."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # Timer handlers -----------------------------------------------------------------

    async def fire_sends(self, conn: AsyncConnection, fired: list[Timer]) -> None:
        now = self.clock()
        rows = await self._rows(conn, fired, ("queued", "deferred"))
        room = max(0, self.max_in_flight - len(self._tasks))
        if len(rows) > room:
            # Backpressure: no more calls in flight here than the sender works through
            # before their reconciliation would start asking; the rest come back soon
            # (still queued: nothing was attempted).
            back = now + BUSY_RETRY
            await schedule(conn, [send_timer(r.shop_id, r.message_id, back) for r in rows[room:]])
            rows = rows[:room]
        if not rows:
            return
        shops = {r.shop_id for r in rows}
        policy = await load_policies(conn, shops)
        configured = await load_channels(conn, shops, self.defaults)
        links_of = await Links.of(conn, self.public_base, rows, now)
        by_bucket: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            by_bucket.setdefault((row.shop_id, row.provider), []).append(row)
        attempts: list[Attempt] = []
        changes: list[Change] = []
        later: list[Timer] = []
        for (shop, provider), group in sorted(by_bucket.items()):
            rate = policy[shop].rate(provider)
            granted, wait = (
                (len(group), 0.0)
                if rate is None
                else await _take(conn, shop, provider, rate, len(group))
            )
            for row in group[granted:]:
                later.append(send_timer(shop, row.message_id, now + timedelta(seconds=wait)))
            going = group[:granted]
            if not going:
                continue
            m = messages.c
            # One statement per bucket: every granted attempt recorded before any call.
            await conn.execute(
                update(messages)
                .where(m.shop_id == shop, m.message_id.in_([r.message_id for r in going]))
                .values(
                    status="sending", attempts=m.attempts + 1, sending_since=now, updated_at=now
                )
            )
            for row in going:
                later.append(reconcile_timer(shop, row.message_id, now + self.reconcile_after))
                changes.append(
                    Change(shop, row.message_id, "sending", None, now, dict(row._mapping))
                )
                attempts.append(
                    Attempt(
                        shop,
                        row.message_id,
                        row.attempts + 1,
                        provider,
                        _channel_of(configured, row).settings_of(provider),
                        _outgoing(row, now, links_of),
                    )
                )
        await schedule(conn, later)
        await record(conn, changes, namespace=self.namespace)
        if attempts:
            after_commit(conn, lambda: self._submit(attempts))

    async def fire_reconciles(self, conn: AsyncConnection, fired: list[Timer]) -> None:
        now = self.clock()
        rows = await self._rows(conn, fired, ("sending",))
        if not rows:
            return
        configured = await load_channels(conn, {r.shop_id for r in rows}, self.defaults)
        links_of = await Links.of(conn, self.public_base, rows, now)
        # The safety net stays: if this process dies before asking, the next one asks.
        due = now + self.reconcile_after
        await schedule(conn, [reconcile_timer(r.shop_id, r.message_id, due) for r in rows])
        checks = [
            Attempt(
                r.shop_id,
                r.message_id,
                r.attempts,
                r.provider,
                _channel_of(configured, r).settings_of(r.provider),
                _outgoing(r, r.sending_since or now, links_of),
                reconcile=True,
            )
            for r in rows
        ]
        after_commit(conn, lambda: self._submit(checks))

    async def _rows(
        self, conn: AsyncConnection, fired: list[Timer], statuses: tuple[str, ...]
    ) -> list[Any]:
        keys = {(t.shop_id, str(t.payload["m"])) for t in fired}
        found: list[Any] = []
        for where in by_shop(messages, "message_id", keys):
            query = select(messages).where(where, messages.c.status.in_(statuses))
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            found += list(await conn.execute(query.order_by(messages.c.message_id)))
        return found

    # The calls ------------------------------------------------------------------------

    async def _submit(self, attempts: list[Attempt]) -> None:
        for attempt in attempts:
            task = asyncio.create_task(self._run(attempt))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, attempt: Attempt) -> None:
        async with self._slots:
            outcome = await self._call(attempt)
        done = asyncio.get_running_loop().create_future()
        self._outcomes.append((attempt, outcome, done))
        if self._finisher is None or self._finisher.done():
            self._finisher = asyncio.create_task(self._finish_pending())
        await done

    async def _finish_pending(self) -> None:
        """Record the outcomes waiting, many per transaction (a group commit: outcomes that
        arrive while one is written go into the next); a batch that fails is recorded one
        outcome at a time, so one bad row costs only itself."""
        while self._outcomes:
            batch = self._outcomes[: self.finish_batch]
            del self._outcomes[: len(batch)]
            try:
                await self.finish_many([(a, o) for a, o, _ in batch])
            except Exception:
                for attempt, outcome, _ in batch:
                    try:
                        await self.finish_many([(attempt, outcome)])
                    except Exception:
                        # The attempt stays `sending`: its reconciliation timer settles it.
                        log.exception(
                            "recording a provider outcome failed",
                            extra={"message": attempt.message_id},
                        )
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _call(self, attempt: Attempt) -> Outcome | None:
        adapter = self.adapters.get(attempt.provider)
        if adapter is None:
            return Outcome("failed", code="provider_unknown", detail=attempt.provider)
        try:
            settings = adapter.settings_model.model_validate(attempt.settings)
        except Exception as exc:
            return Outcome("failed", code="settings_invalid", detail=repr(exc)[:200])
        started = asyncio.get_running_loop().time()
        try:
            if attempt.reconcile:
                if not adapter.can_query:
                    return Outcome(
                        "failed", code="outcome_unknown", detail="the provider cannot tell"
                    )
                return await adapter.query(settings, attempt.outgoing)
            return await adapter.send(settings, attempt.outgoing)
        except Exception as exc:  # an adapter bug must not lose the message
            log.exception("provider call raised", extra={"provider": attempt.provider})
            return Outcome("unknown" if not attempt.reconcile else "retry", detail=repr(exc)[:200])
        finally:
            CALL_SECONDS.labels(attempt.provider).observe(
                asyncio.get_running_loop().time() - started
            )

    async def finish(self, attempt: Attempt, outcome: Outcome | None) -> None:
        """Record one outcome (see `finish_many`)."""
        await self.finish_many([(attempt, outcome)])

    async def finish_many(self, outcomes: list[tuple[Attempt, Outcome | None]]) -> None:
        """Record what each call (or status query: None = the provider never saw it) says,
        for the attempts still their message's current one, in one transaction: one read
        of the messages, one UPDATE statement for all of them."""
        now = self.clock()
        keys = {(a.shop_id, a.message_id) for a, _ in outcomes}
        async with self.db.begin() as conn:
            current: dict[tuple[str, str], dict[str, Any]] = {}
            for where in by_shop(messages, "message_id", keys):
                query = select(messages).where(where).order_by(messages.c.message_id)
                if conn.dialect.name == "postgresql":
                    query = query.with_for_update()
                for found in await conn.execute(query):
                    current[(found.shop_id, found.message_id)] = dict(found._mapping)
            updates: list[dict[str, Any]] = []
            settled: list[str] = []
            timers: list[Timer] = []
            changes: list[Change] = []
            fallbacks: Mapping[tuple[str, str], Channel] | None = None
            for attempt, outcome in outcomes:
                kind = "retry" if outcome is None else outcome.kind
                CALLS.labels(attempt.provider, f"query_{kind}" if attempt.reconcile else kind).inc()
                shop, message_id = attempt.shop_id, attempt.message_id
                row = current.get((shop, message_id))
                if row is None or row["status"] != "sending" or row["attempts"] != attempt.attempt:
                    continue  # settled meanwhile (a reconciliation, a receipt, another worker)
                since = row["sending_since"]
                if outcome is None and since is not None and now - since < QUERY_GRACE:
                    # Not found yet: the record may lag; ask again before ever sending again.
                    timers.append(reconcile_timer(shop, message_id, now + self.reconcile_after))
                    continue
                if kind == "unknown":
                    # The answer was lost: ask the provider soon, never call it blindly again.
                    timers.append(reconcile_timer(shop, message_id, now + self.retry_base))
                    continue
                values: dict[str, Any] = {
                    "provider": row["provider"],
                    "fallback_used": row["fallback_used"],
                    "attempts": row["attempts"],
                    "provider_message_id": row["provider_message_id"],
                }
                if kind == "sent":
                    assert outcome is not None
                    status, reason = "sent", None
                    values["provider_message_id"] = outcome.provider_message_id
                elif kind == "failed":
                    assert outcome is not None
                    status, reason = "failed", _reason(outcome)
                    code, detail = outcome.code or "", outcome.detail or ""
                    # A mailbox refused at RCPT for good, or a recipient who opted out at the
                    # provider: no further message goes to that address.
                    bounced = code in HARD_BOUNCE and detail.startswith("RCPT")
                    if (bounced or code in OPTED_OUT) and row["recipient"]:
                        reason = "bounce" if bounced else "opt_out"
                        await suppress(conn, shop, row["channel"], row["recipient"], reason, now)
                elif row["attempts"] < ATTEMPTS_PER_PROVIDER:  # retry: not sent
                    detail = "not_sent" if outcome is None else _reason(outcome)
                    status, reason = "deferred", f"retry: {detail}"[:300]
                    wait = backoff(row["attempts"], self.retry_base.total_seconds())
                    timers.append(send_timer(shop, message_id, now + wait))
                else:
                    detail = "not_sent" if outcome is None else _reason(outcome)
                    if fallbacks is None:
                        fallbacks = await load_channels(conn, {s for s, _ in keys}, self.defaults)
                    fallback = fallbacks.get((shop, row["channel"]), OUTBOX).fallback_provider
                    if fallback and fallback != row["provider"] and not row["fallback_used"]:
                        status, reason = "queued", f"failover from {row['provider']}: {detail}"
                        values.update(provider=fallback, fallback_used=True, attempts=0)
                        timers.append(send_timer(shop, message_id, now))
                    else:
                        status, reason = "failed", f"gave_up: {detail}"
                    reason = reason[:300]
                values.update(status=status, reason=reason, sending_since=None, updated_at=now)
                row.update(values)
                updates.append({"b_shop": shop, "b_id": message_id, **values})
                settled.append(timer_key(shop, "rec", message_id))
                changes.append(Change(shop, message_id, status, reason, now, dict(row)))
            if updates:
                m = messages.c
                await conn.execute(
                    update(messages)
                    .where(m.shop_id == bindparam("b_shop"), m.message_id == bindparam("b_id"))
                    .values({name: bindparam(name) for name in updates[0] if name[:2] != "b_"}),
                    updates,
                )
            await cancel(conn, settled)
            await schedule(conn, timers)
            await record(conn, changes, namespace=self.namespace)


def _channel_of(configured: Mapping[tuple[str, str], Channel], row: Any) -> Channel:
    return configured.get((row.shop_id, row.channel), OUTBOX)


def _reason(outcome: Outcome) -> str:
    parts = [p for p in (outcome.code, outcome.detail) if p]
    return (": ".join(parts) or outcome.kind)[:300]


async def suppress(
    conn: AsyncConnection, shop: str, channel: str, address: str, reason: str, now: datetime
) -> None:
    """Add an address to the shop's suppression list (kept: the first reason stands)."""
    await conn.execute(
        insert_ignore(conn, suppressions),
        {
            "shop_id": shop,
            "channel": channel,
            "address": address,
            "reason": reason,
            "created_at": now,
        },
    )


__all__ = ["RECONCILE_TIMER", "SEND_TIMER", "Sending", "suppress"]

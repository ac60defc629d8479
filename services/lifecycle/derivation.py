"""Re-deriving customers from their orders: RFM, order statuses, stage, member level and
automatic tags, written in bulk, with change events and one timer per customer.

Every customer a batch touched is re-derived from its orders (`restage`), so the
incremental figures always equal a full recomputation. Changes of stage, level and tags
are written to the outbox with their previous and new values, and each customer keeps one
timer for the moment time alone next changes its stage or an automatic tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import String, and_, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus import Message
from libs.common.db.dialect import insert_ignore
from libs.common.db.keysets import (
    columns_of,
    in_rows,
    insert_select,
    planned_per_execution,
    reused,
    rows_of,
    rows_params,
)
from libs.common.outbox import enqueue
from libs.common.timers import Timer, cancel, schedule, timer_key
from services.lifecycle.emitted import change_event, tag_event
from services.lifecycle.metrics import count_transitions
from services.lifecycle.models import customer_tags, customers, orders, stage_history, tags
from services.lifecycle.orders import is_purchase, order_status, purchased_at
from services.lifecycle.policies import load_policies
from services.lifecycle.prediction.model import BgNbdParams
from services.lifecycle.repurchase import (
    Figures,
    PurchaseDays,
    day_number,
    figures,
    first_fits,
    fitted_models,
    shop_zones,
)
from services.lifecycle.rules import CustomerFacts, Rule, evaluate, parse_rule, recency_thresholds
from services.lifecycle.stages import (
    Facts,
    StagePolicy,
    days_after,
    member_level,
    next_change_at,
    stage_of,
)

RESTAGE_TIMER = "lifecycle.restage"
RESTAGE_SHOP_TIMER = "lifecycle.restage_shop"
CHUNK = 500

CustomerKey = tuple[str, str]
_CUSTOMER_KEY = [("shop_id", String()), ("customer_id", String())]


def restage_timer_key(shop_id: str, customer_id: str) -> str:
    """The key of a customer's one pending restage timer."""
    return timer_key(shop_id, "restage", customer_id)


@dataclass(frozen=True)
class _AutoTag:
    name: str
    rule: Rule


async def _auto_tags(conn: AsyncConnection, shop_ids: set[str]) -> dict[str, list[_AutoTag]]:
    found: dict[str, list[_AutoTag]] = {shop: [] for shop in shop_ids}
    rows = await conn.execute(
        select(tags.c.shop_id, tags.c.name, tags.c.rule).where(
            tags.c.shop_id.in_(shop_ids), tags.c.kind == "auto"
        )
    )
    for row in rows:
        found[row.shop_id].append(_AutoTag(row.name, parse_rule_json(row.rule)))
    return found


def parse_rule_json(text: str) -> Rule:
    return parse_rule(orjson.loads(text))


async def restage(
    conn: AsyncConnection, keys: Sequence[CustomerKey], *, now: datetime, namespace: str
) -> None:
    """Re-derive these customers from their orders: RFM, order statuses, stage, level,
    automatic tags; write what changed, emit change events, keep one timer each."""
    for start in range(0, len(keys), CHUNK):
        await _restage_chunk(conn, list(keys[start : start + CHUNK]), now, namespace)


async def _restage_chunk(
    conn: AsyncConnection, keys: list[CustomerKey], now: datetime, namespace: str
) -> None:
    if not keys:
        return
    async with planned_per_execution(conn):
        changes = await _derive_chunk(conn, keys, now, namespace)
    if changes is not None:
        await changes.write(conn)


@dataclass
class _ChunkChanges:
    """What re-deriving a chunk produced beyond the customers' own columns."""

    history: list[dict[str, Any]]
    tags_added: list[dict[str, Any]]
    tags_removed: list[tuple[str, str, str]]
    timers: list[Timer]
    no_timer: list[str]
    outgoing: list[Message]
    fits: list[Timer]
    """First repurchase fits of shops with purchases (one already pending stays)."""

    async def write(self, conn: AsyncConnection) -> None:
        ct = customer_tags.c
        # Counted as written (a batch that fails and is retried counts again: rare).
        count_transitions(self.history)
        if self.history:
            names = list(self.history[0])
            await conn.execute(
                insert(stage_history).from_select(
                    names,
                    insert_select(
                        conn,
                        stage_history,
                        names,
                        [[h[n] for n in names] for h in self.history],
                        ordered=True,
                    ),
                )
            )
        if self.tags_added:
            await conn.execute(insert_ignore(conn, customer_tags), self.tags_added)
        if self.tags_removed:
            await conn.execute(
                delete(customer_tags).where(
                    in_rows(
                        conn,
                        "removed",
                        [ct.shop_id, ct.customer_id, ct.tag],
                        [*_CUSTOMER_KEY, ("tag", String())],
                        self.tags_removed,
                    )
                )
            )
        await schedule(conn, self.timers)
        await schedule(conn, self.fits, replace=False)
        await cancel(conn, self.no_timer)
        await enqueue(conn, self.outgoing)


async def _derive_chunk(
    conn: AsyncConnection, keys: list[CustomerKey], now: datetime, namespace: str
) -> _ChunkChanges | None:
    """Read the chunk's customers and orders, fix order statuses, write the customers'
    derived columns; returns the rest to write (outside the per-execution planning)."""
    c = customers.c
    chunk = rows_of(conn, "chunk", _CUSTOMER_KEY, keys)
    current = {
        (r.shop_id, r.customer_id): r
        for r in await conn.execute(
            select(customers)
            .join(
                chunk,
                and_(
                    c.shop_id == chunk.c.shop_id,
                    c.customer_id == chunk.c.customer_id,
                    c.merged_into.is_(None),
                ),
            )
            # Locked before their orders are read: a concurrent batch that moves or adds
            # one of their orders commits first or waits, never derives from a stale view.
            .with_for_update(of=customers)
        )
    }
    if not current:
        return None
    live = list(current)
    shops = {shop for shop, _ in current}
    policies = await load_policies(conn, shops)
    zones = await shop_zones(conn, shops)
    models = await fitted_models(conn, shops)
    auto = await _auto_tags(conn, shops)
    auto_names = {(shop, t.name) for shop, ts in auto.items() for t in ts}
    held: dict[CustomerKey, set[str]] = {key: set() for key in current}
    ct = customer_tags.c
    if auto_names:
        # Tags held matter only to shops with automatic tags (their rules may read them).
        holders = rows_of(conn, "holders", _CUSTOMER_KEY, [k for k in live if auto[k[0]]])
        for r in await conn.execute(
            select(ct.shop_id, ct.customer_id, ct.tag).join(
                holders,
                and_(ct.shop_id == holders.c.shop_id, ct.customer_id == holders.c.customer_id),
            )
        ):
            held[(r.shop_id, r.customer_id)].add(r.tag)

    by_customer: dict[CustomerKey, list[Any]] = {key: [] for key in current}
    status_updates: list[tuple[str, str, str]] = []
    o = orders.c
    buyers = rows_of(conn, "buyers", _CUSTOMER_KEY, live)
    for row in await conn.execute(
        select(orders).join(
            buyers, and_(o.shop_id == buyers.c.shop_id, o.customer_id == buyers.c.customer_id)
        )
    ):
        by_customer[(row.shop_id, row.customer_id)].append(row)
        status = order_status(row)
        if status != row.status:
            status_updates.append((row.shop_id, row.order_id, status))
    if status_updates:
        changed = rows_of(
            conn,
            "changed",
            [("s", String()), ("o", String()), ("status", String())],
            status_updates,
        )
        await conn.execute(
            update(orders)
            .where(o.shop_id == changed.c.s, o.order_id == changed.c.o)
            .values(status=changed.c.status)
        )

    updates: list[tuple[Any, ...]] = []
    outgoing: list[Message] = []
    history: list[dict[str, Any]] = []
    tags_added: list[dict[str, Any]] = []
    tags_removed: list[tuple[str, str, str]] = []
    timers: list[Timer] = []
    no_timer: list[str] = []
    derived_all = {
        key: derive(before, by_customer[key], policies[key[0]], now, zones[key[0]])
        for key, before in current.items()
    }
    predicted = _figures(derived_all, models, zones, now)
    for key, found in predicted.items():
        policy, derived = policies[key[0]], derived_all[key]
        if policy.sleeping_rule is not None and derived.purchases.count > 1:
            modelled = replace(derived.facts, p_alive=found.p_alive)
            derived_all[key] = replace(
                derived, facts=modelled, stage=stage_of(modelled, now, policy)
            )
    buying_shops = {key[0] for key, d in derived_all.items() if d.purchases.count}
    fits = first_fits(buying_shops - set(models), now)
    for key, before in current.items():
        policy = policies[key[0]]
        derived = derived_all[key]
        prediction = predicted.get(key)
        updates.append((key[0], key[1], *derived.columns(before, now, prediction).values()))
        if derived.stage != before.stage:
            history.append(
                {
                    "shop_id": key[0],
                    "customer_id": key[1],
                    "at": now,
                    "previous": before.stage,
                    "current": derived.stage,
                }
            )
            outgoing.append(
                change_event(
                    "customer.stage_changed",
                    key,
                    now,
                    namespace,
                    {
                        "customer_id": key[1],
                        "previous": before.stage,
                        "current": derived.stage,
                        "returning": derived.frequency > 1,
                    },
                    discriminator=derived.stage,
                )
            )
        if derived.level != before.member_level:
            outgoing.append(
                change_event(
                    "customer.level_changed",
                    key,
                    now,
                    namespace,
                    {
                        "customer_id": key[1],
                        "previous": before.member_level,
                        "current": derived.level,
                    },
                    discriminator=str(derived.level),
                )
            )
        if prediction is not None and (
            reason := _prediction_news(before, derived, prediction, policy)
        ):
            outgoing.append(
                change_event(
                    "customer.prediction_changed",
                    key,
                    now,
                    namespace,
                    {
                        "customer_id": key[1],
                        "reason": reason,
                        "p_alive": prediction.p_alive,
                        "expected_purchases_90d": prediction.expected_purchases_90d,
                        "next_purchase_at": prediction.next_purchase_at,
                        "previous_p_alive": before.p_alive,
                    },
                    discriminator="p",
                )
            )
        manual = {t for t in held[key] if (key[0], t) not in auto_names}
        facts = derived.rule_facts(before, frozenset(manual), prediction)
        thresholds: set[int] = set()
        for tag in auto[key[0]]:
            thresholds |= recency_thresholds(tag.rule)
            has = tag.name in held[key]
            should = evaluate(tag.rule, facts, now, policy.level_order)
            if should and not has:
                tags_added.append(
                    {"shop_id": key[0], "customer_id": key[1], "tag": tag.name, "assigned_at": now}
                )
                outgoing.append(tag_event("customer.tag_added", key, tag.name, now, namespace))
            elif has and not should:
                tags_removed.append((key[0], key[1], tag.name))
                outgoing.append(tag_event("customer.tag_removed", key, tag.name, now, namespace))
        due = _next_due(derived, policy, thresholds, now)
        pending = restage_timer_key(key[0], key[1])
        if due is None:
            no_timer.append(pending)
        else:
            timers.append(Timer(pending, RESTAGE_TIMER, key[0], due, {"customer_id": key[1]}))

    columns = [("s", String()), ("c", String()), *columns_of(customers, DERIVED_COLUMNS)]

    def build() -> Any:
        derived_rows = rows_of(conn, "derived", columns, None)
        return (
            update(customers)
            .where(c.shop_id == derived_rows.c.s, c.customer_id == derived_rows.c.c)
            .values({name: derived_rows.c[name] for name in DERIVED_COLUMNS})
        )

    await conn.execute(
        reused(conn, "lifecycle.customers.derived", build),
        rows_params(conn, "derived", columns, updates),
    )
    return _ChunkChanges(history, tags_added, tags_removed, timers, no_timer, outgoing, fits)


DERIVED_COLUMNS = (
    "frequency",
    "monetary_minor",
    "item_count",
    "aov_minor",
    "first_order_at",
    "last_order_at",
    "currency",
    "province",
    "city",
    "stage",
    "is_returning",
    "member_level",
    "stage_changed_at",
    "purchase_days",
    "first_purchase_day",
    "last_purchase_day",
    "p_alive",
    "expected_purchases_90d",
    "next_purchase_at",
)


@dataclass(frozen=True)
class Derived:
    """Everything lifecycle derives for one customer from its orders and the policy."""

    frequency: int
    monetary: int
    item_count: int
    first_order_at: datetime | None
    last_order_at: datetime | None
    currency: str | None
    province: str | None
    city: str | None
    stage: str
    level: str | None
    facts: Facts
    purchases: PurchaseDays

    @property
    def aov(self) -> int:
        return self.monetary // self.frequency if self.frequency else 0

    def columns(self, before: Any, now: datetime, figures: Figures | None) -> dict[str, Any]:
        """The customer's derived columns, `DERIVED_COLUMNS` in that order."""
        return {
            "frequency": self.frequency,
            "monetary_minor": self.monetary,
            "item_count": self.item_count,
            "aov_minor": self.aov,
            "first_order_at": self.first_order_at,
            "last_order_at": self.last_order_at,
            "currency": self.currency,
            "province": self.province,
            "city": self.city,
            "stage": self.stage,
            "is_returning": self.frequency > 1,
            "member_level": self.level,
            "stage_changed_at": now if self.stage != before.stage else before.stage_changed_at,
            "purchase_days": self.purchases.count,
            "first_purchase_day": self.purchases.first,
            "last_purchase_day": self.purchases.last,
            "p_alive": figures.p_alive if figures else None,
            "expected_purchases_90d": figures.expected_purchases_90d if figures else None,
            "next_purchase_at": figures.next_purchase_at if figures else None,
        }

    def rule_facts(
        self, before: Any, manual_tags: frozenset[str], figures: Figures | None
    ) -> CustomerFacts:
        return CustomerFacts(
            frequency=self.frequency,
            monetary_minor=self.monetary,
            aov_minor=self.aov,
            item_count=self.item_count,
            last_order_at=self.last_order_at,
            stage=self.stage,
            member_level=self.level,
            city=self.city,
            province=self.province,
            source=before.source,
            returning=self.frequency > 1,
            tags=manual_tags,
            p_alive=figures.p_alive if figures else None,
            expected_purchases_90d=figures.expected_purchases_90d if figures else None,
        )


def derive(
    before: Any, order_rows: list[Any], policy: StagePolicy, now: datetime, zone: ZoneInfo
) -> Derived:
    """A customer's figures, recomputed from scratch from its orders (pure); purchase
    days are calendar days in `zone`, the shop's time zone."""
    purchases = [r for r in order_rows if is_purchase(r)]
    placed = [purchased_at(r) for r in purchases]
    frequency = len(purchases)
    monetary = sum(max(0, (r.total_minor or 0) - r.refunded_minor) for r in purchases)
    latest = max(order_rows, key=lambda r: r.created_at or r.data_time, default=None)
    facts = Facts(frequency, max(placed) if placed else None, before.last_interest_at)
    return Derived(
        frequency=frequency,
        monetary=monetary,
        item_count=sum(r.item_count or 0 for r in purchases),
        first_order_at=min(placed) if placed else None,
        last_order_at=facts.last_order_at,
        currency=next((r.currency for r in purchases if r.currency), before.currency),
        province=latest.shipping_province if latest else before.province,
        city=latest.shipping_city if latest else before.city,
        stage=stage_of(facts, now, policy),
        level=member_level(monetary, frequency, policy),
        facts=facts,
        purchases=PurchaseDays.of(purchases, zone),
    )


def _figures(
    derived: dict[CustomerKey, Derived],
    models: dict[str, BgNbdParams],
    zones: dict[str, ZoneInfo],
    now: datetime,
) -> dict[CustomerKey, Figures]:
    """The figures of the customers whose shop has a fitted model, a shop at a time."""
    found: dict[CustomerKey, Figures] = {}
    for shop, params in models.items():
        keys = [key for key in derived if key[0] == shop]
        each = figures(
            params, [derived[key].purchases for key in keys], day_number(now, zones[shop]), now
        )
        found.update((key, f) for key, f in zip(keys, each, strict=True) if f is not None)
    return found


def _prediction_news(
    before: Any, derived: Derived, prediction: Figures, policy: StagePolicy
) -> str | None:
    """Why the customer's figures are news, if they are: the first ones (`first`), a
    purchase day since the last (`purchase`), or P(alive) across one of the shop's
    thresholds (`threshold`)."""
    if before.p_alive is None:
        return "first"
    if before.purchase_days != derived.purchases.count:
        return "purchase"
    if policy.p_alive_band(before.p_alive) != policy.p_alive_band(prediction.p_alive):
        return "threshold"
    return None


def _next_due(
    derived: Derived, policy: StagePolicy, thresholds: set[int], now: datetime
) -> datetime | None:
    candidates = [next_change_at(derived.facts, now, policy)]
    if derived.last_order_at is not None:
        candidates += [days_after(derived.last_order_at, days) for days in thresholds]
    future = [at for at in candidates if at is not None and at > now]
    return min(future) if future else None


async def on_restage_timers(
    conn: AsyncConnection, fired: list[Timer], *, namespace: str, now: datetime | None = None
) -> None:
    """Time alone moved these customers past a boundary: re-derive them."""
    await restage(
        conn,
        [(t.shop_id, str(t.payload["customer_id"])) for t in fired],
        now=now or datetime.now(UTC),
        namespace=namespace,
    )


def restage_shop_timer(shop_id: str, after: str = "", now: datetime | None = None) -> Timer:
    """A job that re-derives every customer of a shop, a chunk per firing (after a policy
    or automatic-tag change), resuming after customer id `after`."""
    return Timer(
        timer_key(shop_id, "restage-shop"),
        RESTAGE_SHOP_TIMER,
        shop_id,
        now or datetime.now(UTC),
        {"after": after},
    )


async def on_restage_shop_timers(
    conn: AsyncConnection, fired: list[Timer], *, namespace: str, now: datetime | None = None
) -> None:
    now = now or datetime.now(UTC)
    c = customers.c
    for job in fired:
        ids = list(
            (
                await conn.execute(
                    select(c.customer_id)
                    .where(
                        c.shop_id == job.shop_id,
                        c.customer_id > str(job.payload["after"]),
                        c.merged_into.is_(None),
                    )
                    .order_by(c.customer_id)
                    .limit(CHUNK)
                )
            ).scalars()
        )
        await restage(conn, [(job.shop_id, cid) for cid in ids], now=now, namespace=namespace)
        if len(ids) == CHUNK:
            await schedule(conn, [restage_shop_timer(job.shop_id, ids[-1], now)])

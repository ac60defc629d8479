"""Lifecycle's event handlers: identities, the orders projection, RFM, stages, levels and
automatic tags.

Each consumed batch is applied in one transaction with bulk statements: identities are
resolved (merging profiles that prove to be one person), customers and orders are upserted
with merge rules that make the result independent of arrival order (per-status times keep
the earliest seen, descriptive fields the newest event's, refunds add up), then every
touched customer is re-derived from its orders (`restage`), so the incremental figures
always equal a full recomputation. Changes of stage, level and tags are written to the
outbox with their previous and new values, and each customer keeps one timer for the moment
time alone next changes its stage or an automatic tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import String, and_, case, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus import Message
from libs.common.db.dialect import insert_ignore, upsert
from libs.common.db.keysets import (
    columns_of,
    in_rows,
    insert_select,
    planned_per_execution,
    reused,
    rows_of,
    rows_params,
)
from libs.common.db.types import UtcDateTime
from libs.common.events import (
    BEHAVIOR_TYPES,
    LOGISTICS_TYPES,
    ORDER_TYPES,
    SCHEMA_VERSION,
    BehaviorData,
    Customer,
    Envelope,
    LogisticsData,
    OrderData,
    topic_for,
)
from libs.common.outbox import enqueue
from libs.common.timers import Timer, cancel, schedule
from services.lifecycle.identities import Identity, IdentityResolver
from services.lifecycle.models import (
    customer_notes,
    customer_tags,
    customers,
    order_tracking,
    orders,
    stage_history,
    tags,
)
from services.lifecycle.policies import load_policies
from services.lifecycle.rules import CustomerFacts, Rule, evaluate, parse_rule, recency_thresholds
from services.lifecycle.stages import Facts, StagePolicy, member_level, next_change_at, stage_of

SOURCE = "huitou/lifecycle"
RESTAGE_TIMER = "lifecycle.restage"
STATUS_TIMES = (
    "created_at",
    "paid_at",
    "shipped_at",
    "completed_at",
    "cancelled_at",
    "refunded_at",
)
CHUNK = 500

CustomerKey = tuple[str, str]
_CUSTOMER_KEY = [("shop_id", String()), ("customer_id", String())]


def identity_of(event: Envelope, customer: Customer) -> Identity:
    """The identities an event shows: the platform id (the event's subject when it is
    neither the phone nor the email), the phone and the email."""
    platform_id = customer.id
    if platform_id is None and event.subject not in (None, customer.phone, customer.email):
        platform_id = event.subject
    return Identity(event.shop_id, platform_id, customer.phone, customer.email)


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


@dataclass
class _CustomerRow:
    shop_id: str
    customer_id: str
    seen_at: datetime
    source: str
    name: str | None = None
    phone: str | None = None
    email: str | None = None
    interest_at: datetime | None = None

    def merge(self, customer: Customer, at: datetime) -> None:
        if at >= self.seen_at or self.name is None:
            self.name = customer.name or self.name
            self.phone = customer.phone or self.phone
            self.email = customer.email or self.email
        self.seen_at = min(self.seen_at, at)

    def interested(self, at: datetime) -> None:
        self.interest_at = max(self.interest_at or at, at)


def _order_row(event: Envelope, data: OrderData, customer_id: str) -> dict[str, Any]:
    status = event.type.split(".", 1)[1]
    times = {name: getattr(data, name) for name in STATUS_TIMES}
    # The event of a status is itself evidence of when the order reached it.
    times[f"{status}_at"] = times[f"{status}_at"] or event.time
    refunded = 0
    if status == "refunded":
        whole = data.total.amount_minor if data.total else 0
        refunded = data.refund.amount_minor if data.refund else whole
    return {
        "shop_id": event.shop_id,
        "order_id": data.order_id,
        "customer_id": customer_id,
        "status": status,
        "total_minor": data.total.amount_minor if data.total else None,
        "currency": data.total.currency if data.total else None,
        "refunded_minor": refunded,
        "item_count": sum(item.quantity for item in data.items),
        "shipping_province": data.shipping.province if data.shipping else None,
        "shipping_city": data.shipping.city if data.shipping else None,
        **times,
        "data_time": event.time,
    }


def _merge_order_rows(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    newer, older = (b, a) if b["data_time"] >= a["data_time"] else (a, b)
    merged = dict(newer)
    for name in ("total_minor", "currency", "shipping_province", "shipping_city"):
        if merged[name] is None:
            merged[name] = older[name]
    if not merged["item_count"]:
        merged["item_count"] = older["item_count"]
    for name in STATUS_TIMES:
        merged[name] = _earliest(a[name], b[name])
    merged["refunded_minor"] = a["refunded_minor"] + b["refunded_minor"]
    merged["data_time"] = max(a["data_time"], b["data_time"])
    return merged


def order_status(row: Any) -> str:
    """The order's status from the times it reached each status (arrival order free)."""
    if row.refunded_at is not None and row.refunded_minor >= (row.total_minor or 0):
        return "refunded"
    if row.cancelled_at is not None and not is_purchase(row):
        return "cancelled"
    if row.completed_at is not None:
        return "completed"
    if row.shipped_at is not None:
        return "shipped"
    if row.paid_at is not None:
        return "paid"
    if row.cancelled_at is not None:
        return "cancelled"
    if row.refunded_at is not None:
        return "paid"
    return "created"


def is_purchase(row: Any) -> bool:
    """An order counts as a purchase once it reached `paid` or a later status (shipped,
    completed, refunded all imply payment); one cancelled before payment never was."""
    return (
        row.paid_at is not None
        or row.shipped_at is not None
        or row.completed_at is not None
        or row.refunded_at is not None
    )


def purchased_at(row: Any) -> datetime:
    """When a purchase was placed: its creation time, else the earliest status reached."""
    placed: datetime = row.created_at or min(
        t for t in (row.paid_at, row.shipped_at, row.completed_at, row.refunded_at) if t is not None
    )
    return placed


async def apply_events(
    conn: AsyncConnection,
    events: Sequence[Envelope],
    *,
    namespace: str,
    now: datetime | None = None,
) -> None:
    """Apply a batch of new (deduplicated) events in the caller's transaction."""
    now = now or datetime.now(UTC)
    shown: list[tuple[Envelope, Any, Identity]] = []
    tracking: dict[tuple[str, str, str], dict[str, Any]] = {}
    carrier_updates: list[dict[str, Any]] = []
    for event in events:
        if event.type in ORDER_TYPES or event.type in BEHAVIOR_TYPES:
            data = event.typed_data()
            assert isinstance(data, OrderData | BehaviorData)
            shown.append((event, data, identity_of(event, data.customer)))
        elif event.type in LOGISTICS_TYPES:
            parcel = event.typed_data()
            assert isinstance(parcel, LogisticsData)
            carrier_updates.append(
                {
                    "s": event.shop_id,
                    "t": parcel.tracking_number,
                    "status": parcel.status,
                    "at": event.time,
                }
            )
            if parcel.order_id:
                _track(
                    tracking,
                    event.shop_id,
                    parcel.order_id,
                    parcel.tracking_number,
                    parcel.carrier,
                    parcel.status,
                    event.time,
                )
    async with planned_per_execution(conn):
        resolver = await IdentityResolver.load(conn, (identity for _, _, identity in shown))
    resolved = [resolver.resolve(identity) for _, _, identity in shown]

    people: dict[CustomerKey, _CustomerRow] = {}
    order_rows: dict[tuple[str, str], dict[str, Any]] = {}
    for (event, data, _), raw_id in zip(shown, resolved, strict=True):
        cid = resolver.final(event.shop_id, raw_id)
        key = (event.shop_id, cid)
        if key not in people:
            people[key] = _CustomerRow(event.shop_id, cid, event.time, event.source.split("/")[0])
        person = people[key]
        person.merge(data.customer, event.time)
        if isinstance(data, BehaviorData):
            person.interested(data.occurred_at or event.time)
            continue
        if event.type == "order.created":
            # Placing an order shows interest even if it is never paid.
            person.interested(data.created_at or event.time)
        row = _order_row(event, data, cid)
        okey = (event.shop_id, data.order_id)
        order_rows[okey] = _merge_order_rows(order_rows[okey], row) if okey in order_rows else row
        if data.tracking_number:
            _track(
                tracking,
                event.shop_id,
                data.order_id,
                data.tracking_number,
                data.carrier,
                None,
                event.time,
            )

    await resolver.save(conn)
    if people:
        await _upsert_customers(conn, list(people.values()))
    if order_rows:
        await _upsert_orders(conn, list(order_rows.values()))
    await _save_tracking(conn, list(tracking.values()), carrier_updates)
    merges = resolver.merges()
    if merges:
        async with planned_per_execution(conn):
            await _merge_profiles(conn, merges, now, namespace)
    touched = set(people) | {(shop, winner) for shop, _, winner in merges}
    await restage(conn, sorted(touched), now=now, namespace=namespace)


def _track(
    tracking: dict[tuple[str, str, str], dict[str, Any]],
    shop: str,
    order_id: str,
    number: str,
    carrier: str | None,
    status: str | None,
    at: datetime,
) -> None:
    key = (shop, order_id, number)
    row = tracking.get(key)
    if row is None or at >= row["updated_at"]:
        tracking[key] = {
            "shop_id": shop,
            "order_id": order_id,
            "tracking_number": number,
            "carrier": carrier or (row or {}).get("carrier"),
            "status": status or (row or {}).get("status"),
            "updated_at": at,
        }


async def _save_tracking(
    conn: AsyncConnection, rows: list[dict[str, Any]], carrier_updates: list[dict[str, Any]]
) -> None:
    t = order_tracking.c
    if rows:

        def merge(excluded: Any) -> dict[str, Any]:
            newer = excluded.updated_at >= t.updated_at
            return {
                "carrier": case((excluded.carrier.is_(None), t.carrier), else_=excluded.carrier),
                "status": case(
                    (newer & excluded.status.is_not(None), excluded.status), else_=t.status
                ),
                "updated_at": case((newer, excluded.updated_at), else_=t.updated_at),
            }

        await conn.execute(
            upsert(
                conn, order_tracking, ["shop_id", "order_id", "tracking_number"], [], merge=merge
            ),
            rows,
        )
    if carrier_updates:
        # Carrier pushes rarely know the order: join them through the tracking number. Of
        # several pushes for one parcel only the latest can win (a later one on a tie).
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for u in carrier_updates:
            seen = latest.get((u["s"], u["t"]))
            if seen is None or u["at"] >= seen["at"]:
                latest[(u["s"], u["t"])] = u
        pushes = rows_of(
            conn,
            "pushes",
            [("s", String()), ("t", String()), ("status", String()), ("at", UtcDateTime())],
            [(u["s"], u["t"], u["status"], u["at"]) for u in latest.values()],
        )
        async with planned_per_execution(conn):
            await conn.execute(
                update(order_tracking)
                .where(
                    t.shop_id == pushes.c.s,
                    t.tracking_number == pushes.c.t,
                    (t.updated_at.is_(None)) | (t.updated_at <= pushes.c.at),
                )
                .values(status=pushes.c.status, updated_at=pushes.c.at)
            )


_CUSTOMER_COLUMNS = (
    "shop_id",
    "customer_id",
    "name",
    "phone",
    "email",
    "first_seen_at",
    "last_interest_at",
    "stage",
    "source",
)


async def _upsert_customers(conn: AsyncConnection, rows: list[_CustomerRow]) -> None:
    c = customers.c

    def merge(excluded: Any) -> dict[str, Any]:
        return {
            "name": case((excluded.name.is_(None), c.name), else_=excluded.name),
            "phone": case((excluded.phone.is_(None), c.phone), else_=excluded.phone),
            "email": case((excluded.email.is_(None), c.email), else_=excluded.email),
            "first_seen_at": case(
                (excluded.first_seen_at < c.first_seen_at, excluded.first_seen_at),
                else_=c.first_seen_at,
            ),
            "last_interest_at": case(
                (c.last_interest_at.is_(None), excluded.last_interest_at),
                (excluded.last_interest_at > c.last_interest_at, excluded.last_interest_at),
                else_=c.last_interest_at,
            ),
            "source": case((c.source.is_(None), excluded.source), else_=c.source),
        }

    values = [
        (
            r.shop_id,
            r.customer_id,
            r.name,
            r.phone,
            r.email,
            r.seen_at,
            r.interest_at,
            "prospect",
            r.source,
        )
        for r in rows
    ]
    stmt = reused(
        conn,
        "lifecycle.customers.upsert",
        lambda: upsert(
            conn,
            customers,
            ["shop_id", "customer_id"],
            [],
            merge=merge,
            source=insert_select(conn, customers, _CUSTOMER_COLUMNS, None),
        ),
    )
    await conn.execute(
        stmt, rows_params(conn, "new", columns_of(customers, _CUSTOMER_COLUMNS), values)
    )


_ORDER_COLUMNS = (
    "shop_id",
    "order_id",
    "customer_id",
    "status",
    "total_minor",
    "currency",
    "refunded_minor",
    "item_count",
    "shipping_province",
    "shipping_city",
    *STATUS_TIMES,
    "data_time",
)


async def _upsert_orders(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    o = orders.c

    def merge(excluded: Any) -> dict[str, Any]:
        newer = excluded.data_time >= o.data_time
        set_: dict[str, Any] = {
            "customer_id": case((newer, excluded.customer_id), else_=o.customer_id),
            "item_count": case(
                (newer & (excluded.item_count > 0), excluded.item_count), else_=o.item_count
            ),
        }
        for name in ("total_minor", "currency", "shipping_province", "shipping_city"):
            # A message without the field (a refund notice) keeps the known value.
            set_[name] = case(
                (excluded[name].is_(None), o[name]),
                (o[name].is_(None), excluded[name]),
                (newer, excluded[name]),
                else_=o[name],
            )
        for name in STATUS_TIMES:
            set_[name] = case(
                (o[name].is_(None), excluded[name]),
                (excluded[name].is_(None), o[name]),
                (excluded[name] < o[name], excluded[name]),
                else_=o[name],
            )
        set_["refunded_minor"] = o.refunded_minor + excluded.refunded_minor
        set_["data_time"] = case((newer, excluded.data_time), else_=o.data_time)
        return set_

    names = _ORDER_COLUMNS
    stmt = reused(
        conn,
        "lifecycle.orders.upsert",
        lambda: upsert(
            conn,
            orders,
            ["shop_id", "order_id"],
            [],
            merge=merge,
            source=insert_select(conn, orders, names, None),
        ),
    )
    values = [[r[n] for n in names] for r in rows]
    await conn.execute(stmt, rows_params(conn, "new", columns_of(orders, names), values))


async def _merge_profiles(
    conn: AsyncConnection, merges: list[tuple[str, str, str]], now: datetime, namespace: str
) -> None:
    """Fold each loser's orders, tags and notes into its winner, mark it merged, announce."""
    moves = [(s, loser, winner) for s, loser, winner in merges]
    columns = [("s", String()), ("loser", String()), ("winner", String())]
    for table in (orders, customer_notes):
        moved_rows = rows_of(conn, "moves", columns, moves)
        await conn.execute(
            update(table)
            .where(table.c.shop_id == moved_rows.c.s, table.c.customer_id == moved_rows.c.loser)
            .values(customer_id=moved_rows.c.winner)
        )
    keys = [(s, loser) for s, loser, _ in merges]
    winner_of = {(s, loser): winner for s, loser, winner in merges}
    ct = customer_tags.c
    losers = rows_of(conn, "losers", _CUSTOMER_KEY, keys)
    moved = [
        {
            "shop_id": r.shop_id,
            "customer_id": winner_of[(r.shop_id, r.customer_id)],
            "tag": r.tag,
            "assigned_at": r.assigned_at,
        }
        for r in await conn.execute(
            select(customer_tags).join(
                losers, and_(ct.shop_id == losers.c.shop_id, ct.customer_id == losers.c.customer_id)
            )
        )
    ]
    if moved:
        await conn.execute(insert_ignore(conn, customer_tags), moved)
    await conn.execute(
        delete(customer_tags).where(
            in_rows(conn, "losers", [ct.shop_id, ct.customer_id], _CUSTOMER_KEY, keys)
        )
    )
    merged_rows = rows_of(conn, "moves", columns, moves)
    await conn.execute(
        update(customers)
        .where(
            customers.c.shop_id == merged_rows.c.s,
            customers.c.customer_id == merged_rows.c.loser,
        )
        .values(merged_into=merged_rows.c.winner)
    )
    await cancel(conn, [f"restage:{s}:{loser}" for s, loser, _ in merges])
    by_winner: dict[CustomerKey, list[str]] = {}
    for s, loser, winner in merges:
        by_winner.setdefault((s, winner), []).append(loser)
    await enqueue(
        conn,
        [
            _change_event(
                "customer.merged",
                key,
                now,
                namespace,
                {"customer_id": key[1], "merged_ids": sorted(losers)},
                discriminator=",".join(sorted(losers)),
            )
            for key, losers in by_winner.items()
        ],
    )


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

    async def write(self, conn: AsyncConnection) -> None:
        ct = customer_tags.c
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
            select(customers).join(
                chunk,
                and_(
                    c.shop_id == chunk.c.shop_id,
                    c.customer_id == chunk.c.customer_id,
                    c.merged_into.is_(None),
                ),
            )
        )
    }
    if not current:
        return None
    live = list(current)
    shops = {shop for shop, _ in current}
    policies = await load_policies(conn, shops)
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
    for key, before in current.items():
        policy = policies[key[0]]
        derived = derive(before, by_customer[key], policy, now)
        updates.append((key[0], key[1], *derived.columns(before, now).values()))
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
                _change_event(
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
                _change_event(
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
        manual = {t for t in held[key] if (key[0], t) not in auto_names}
        facts = derived.rule_facts(before, frozenset(manual))
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
        timer_key = f"restage:{key[0]}:{key[1]}"
        if due is None:
            no_timer.append(timer_key)
        else:
            timers.append(Timer(timer_key, RESTAGE_TIMER, key[0], due, {"customer_id": key[1]}))

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
    return _ChunkChanges(history, tags_added, tags_removed, timers, no_timer, outgoing)


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

    @property
    def aov(self) -> int:
        return self.monetary // self.frequency if self.frequency else 0

    def columns(self, before: Any, now: datetime) -> dict[str, Any]:
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
        }

    def rule_facts(self, before: Any, manual_tags: frozenset[str]) -> CustomerFacts:
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
        )


def derive(before: Any, order_rows: list[Any], policy: StagePolicy, now: datetime) -> Derived:
    """A customer's figures, recomputed from scratch from its orders (pure)."""
    purchases = [r for r in order_rows if is_purchase(r)]
    placed = [purchased_at(r) for r in purchases]
    frequency = len(purchases)
    monetary = sum(max(0, (r.total_minor or 0) - r.refunded_minor) for r in purchases)
    latest = max(order_rows, key=lambda r: r.created_at or r.data_time, default=None)
    facts = Facts(frequency, max(placed) if placed else None, before.last_interest_at)
    return Derived(
        frequency=frequency,
        monetary=monetary,
        item_count=sum(r.item_count for r in purchases),
        first_order_at=min(placed) if placed else None,
        last_order_at=facts.last_order_at,
        currency=next((r.currency for r in purchases if r.currency), before.currency),
        province=latest.shipping_province if latest else before.province,
        city=latest.shipping_city if latest else before.city,
        stage=stage_of(facts, now, policy),
        level=member_level(monetary, frequency, policy),
        facts=facts,
    )


def _next_due(
    derived: Derived, policy: StagePolicy, thresholds: set[int], now: datetime
) -> datetime | None:
    candidates = [next_change_at(derived.facts, now, policy)]
    if derived.last_order_at is not None:
        candidates += [derived.last_order_at + timedelta(days=days) for days in thresholds]
    future = [at for at in candidates if at is not None and at > now]
    return min(future) if future else None


def _change_event(
    type_: str,
    key: CustomerKey,
    now: datetime,
    namespace: str,
    data: dict[str, Any],
    *,
    discriminator: str,
) -> Message:
    """The event as `new_event(…).to_bytes()` would serialise it (same fields, order and
    formats; `data` without its None fields), written directly: these are built by the
    thousand per batch, from values the database already holds."""
    id_ = f"{type_}:{key[0]}:{key[1]}:{discriminator}:{now.isoformat()}"
    value = orjson.dumps(
        {
            "specversion": "1.0",
            "id": id_,
            "source": SOURCE,
            "type": type_,
            "time": now.astimezone(UTC),
            "shop_id": key[0],
            "subject": key[1],
            "schema_version": SCHEMA_VERSION,
            "data": {name: v for name, v in data.items() if v is not None},
        },
        option=orjson.OPT_UTC_Z,
    )
    return Message(
        topic_for(type_, namespace),
        f"{key[0]}:{key[1]}",
        value,
        {"ce_id": id_, "ce_type": type_},
    )


def tag_event(type_: str, key: CustomerKey, tag: str, now: datetime, namespace: str) -> Message:
    """`customer.tag_added` / `customer.tag_removed` for one customer and tag."""
    return _change_event(
        type_, key, now, namespace, {"customer_id": key[1], "tag": tag}, discriminator=tag
    )


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


RESTAGE_SHOP_TIMER = "lifecycle.restage_shop"


def restage_shop_timer(shop_id: str, after: str = "", now: datetime | None = None) -> Timer:
    """A job that re-derives every customer of a shop, a chunk per firing (after a policy
    or automatic-tag change), resuming after customer id `after`."""
    return Timer(
        f"restage-shop:{shop_id}",
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

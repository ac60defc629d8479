"""Lifecycle's event handler: one consumed batch, applied in one transaction.

The batch is read once and written with bulk statements, in this order:
1. who each event names: an order event that would not own its order (a weaker or later
   identity than the order's owner, stored or in this batch) is attributed to the owner and
   changes no profile; every other event's identities are resolved, merging profiles that
   prove to be one person (`identities`);
2. profiles (`profiles`), orders (`orders`) and parcels (`parcels`), each folded with its
   one merge rule, so the result does not depend on arrival order;
3. deliberate merges move the losers' orders to the winners;
4. every customer touched (including an order's previous owner) is re-derived from its
   orders (`derivation.restage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.keysets import planned_per_execution
from libs.common.events import (
    BEHAVIOR_TYPES,
    LOGISTICS_TYPES,
    ORDER_TYPES,
    BehaviorData,
    Envelope,
    LogisticsData,
    OrderData,
)
from services.lifecycle.derivation import CustomerKey, restage
from services.lifecycle.identities import Identity, IdentityResolver
from services.lifecycle.orders import (
    ORDER_MERGE,
    OrderKey,
    Owner,
    load_owners,
    order_row,
    owner_rank,
    upsert_orders,
)
from services.lifecycle.parcels import ParcelUpdates
from services.lifecycle.profiles import (
    fold_profile,
    identity_of,
    merge_profiles,
    profile_row,
    upsert_customers,
)


@dataclass
class _Shown:
    """An order or behaviour event with the identities it shows."""

    event: Envelope
    data: OrderData | BehaviorData
    identity: Identity
    rank: int

    @property
    def order(self) -> OrderKey | None:
        if isinstance(self.data, OrderData):
            return (self.event.shop_id, self.data.order_id)
        return None


async def apply_events(
    conn: AsyncConnection,
    events: Sequence[Envelope],
    *,
    namespace: str,
    now: datetime | None = None,
) -> None:
    """Apply a batch of new (deduplicated) events in the caller's transaction."""
    now = now or datetime.now(UTC)
    shown: list[_Shown] = []
    parcels = ParcelUpdates()
    for event in events:
        if event.type in ORDER_TYPES or event.type in BEHAVIOR_TYPES:
            data = event.typed_data()
            assert isinstance(data, OrderData | BehaviorData)
            identity = identity_of(event, data.customer)
            shown.append(_Shown(event, data, identity, owner_rank(identity)))
        elif event.type in LOGISTICS_TYPES:
            parcel = event.typed_data()
            assert isinstance(parcel, LogisticsData)
            parcels.status(event.shop_id, parcel.tracking_number, parcel.status, event.time)
            if parcel.order_id:
                parcels.link(
                    event.shop_id,
                    parcel.order_id,
                    parcel.tracking_number,
                    parcel.carrier,
                    event.time,
                )

    stored = await load_owners(conn, (s.order for s in shown if s.order is not None))
    claimant = _claimants(shown, stored)
    naming = [s for s in shown if _names_owner(s, claimant, stored)]
    async with planned_per_execution(conn):
        resolver = await IdentityResolver.load(conn, (s.identity for s in naming))
    owner_of: dict[int, str] = {}
    for s in naming:
        owner_of[id(s)] = resolver.resolve(s.identity)

    people: dict[CustomerKey, dict[str, Any]] = {}
    order_rows: dict[OrderKey, dict[str, Any]] = {}
    moved_from: set[CustomerKey] = set()
    for s in shown:
        event, data, shop = s.event, s.data, s.event.shop_id
        order = s.order
        if id(s) in owner_of:
            cid = resolver.final(shop, owner_of[id(s)])
            contact = data.customer
            if order is not None and order in stored and stored[order].customer_id != cid:
                moved_from.add((shop, stored[order].customer_id))
        else:
            # Names someone else than the order's owner: the event adds facts to the
            # order, never moves it and never changes a profile's contact details.
            assert order is not None
            owner = claimant.get(order)
            cid = (
                resolver.final(shop, owner_of[id(owner)])
                if owner is not None
                else stored[order].customer_id
            )
            contact = None
        interest = None
        if isinstance(data, BehaviorData):
            interest = data.occurred_at or event.time
        elif event.type == "order.created":
            # Placing an order shows interest even if it is never paid.
            interest = data.created_at or event.time
        fold_profile(people, profile_row(event, cid, contact, interest))
        if isinstance(data, OrderData):
            assert order is not None
            row = order_row(event, data, cid, s.rank)
            seen = order_rows.get(order)
            order_rows[order] = row if seen is None else ORDER_MERGE.py(seen, row)
            if data.tracking_number:
                parcels.link(shop, data.order_id, data.tracking_number, data.carrier, event.time)

    await resolver.save(conn)
    if people:
        await upsert_customers(conn, list(people.values()))
    if order_rows:
        await upsert_orders(conn, list(order_rows.values()))
    await parcels.save(conn)
    merges = resolver.merges()
    if merges:
        async with planned_per_execution(conn):
            await merge_profiles(conn, merges, now, namespace)
    touched = set(people) | moved_from | {(shop, winner) for shop, _, winner in merges}
    await restage(conn, sorted(touched), now=now, namespace=namespace)


def _claimants(shown: list[_Shown], stored: dict[OrderKey, Owner]) -> dict[OrderKey, _Shown]:
    """Per order, the event of this batch that names its owner, if any: the strongest
    identity, then the earliest (then the smaller event id), and only if it outranks the
    stored owner."""
    best: dict[OrderKey, _Shown] = {}
    for s in shown:
        order = s.order
        if order is None:
            continue
        current = best.get(order)
        if current is None or Owner(
            "", current.rank, current.event.time, current.event.id
        ).outranked_by(s.rank, s.event.time, s.event.id):
            best[order] = s
    return {
        order: s
        for order, s in best.items()
        if order not in stored or stored[order].outranked_by(s.rank, s.event.time, s.event.id)
    }


def _names_owner(
    s: _Shown, claimant: dict[OrderKey, _Shown], stored: dict[OrderKey, Owner]
) -> bool:
    """Whether the identities an event shows are its order's owner's (so they may be
    resolved, linked and update the profile): the order's claimant in this batch, or an
    event naming the same platform customer as the owner."""
    order = s.order
    if order is None or claimant.get(order) is s:
        return True
    pid = s.identity.platform_id
    if pid is None:
        return False
    if order in claimant:
        return claimant[order].identity.platform_id == pid
    return stored[order].customer_id == pid if order in stored else False

"""Parcels: which tracking numbers belong to which order, and each parcel's latest status.

A carrier push rarely names the order, and may arrive before the order event that carries
its tracking number. So the carrier's status is kept per tracking number (`parcels`, the
newest by event time wins) whether or not an order is known yet, and every order link of
a parcel touched in a batch mirrors it (`order_tracking.status`): a push that arrives first
is parked, not lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import String, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import upsert
from libs.common.db.keysets import in_rows, planned_per_execution
from services.lifecycle.merging import Merge, Pick
from services.lifecycle.models import order_tracking, parcels

PARCEL_MERGE = Merge((Pick(("status",), at="at", prefer="newest"),))
LINK_MERGE = Merge((Pick(("carrier",), at="updated_at", prefer="newest"),))

ParcelKey = tuple[str, str]
_PARCEL_KEY = [("shop_id", String()), ("tracking_number", String())]


@dataclass
class ParcelUpdates:
    """A batch's parcel facts: order links and carrier statuses, folded per key."""

    links: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    statuses: dict[ParcelKey, dict[str, Any]] = field(default_factory=dict)

    def link(
        self, shop: str, order_id: str, number: str, carrier: str | None, at: datetime
    ) -> None:
        row = {
            "shop_id": shop,
            "order_id": order_id,
            "tracking_number": number,
            "carrier": carrier,
            "updated_at": at,
        }
        key = (shop, order_id, number)
        seen = self.links.get(key)
        self.links[key] = row if seen is None else LINK_MERGE.py(seen, row)

    def status(self, shop: str, number: str, status: str, at: datetime) -> None:
        row = {"shop_id": shop, "tracking_number": number, "status": status, "at": at}
        seen = self.statuses.get((shop, number))
        self.statuses[(shop, number)] = row if seen is None else PARCEL_MERGE.py(seen, row)

    async def save(self, conn: AsyncConnection) -> None:
        if self.links:
            await conn.execute(
                upsert(
                    conn,
                    order_tracking,
                    ["shop_id", "order_id", "tracking_number"],
                    [],
                    merge=LINK_MERGE.sql(order_tracking),
                ),
                list(self.links.values()),
            )
        if self.statuses:
            await conn.execute(
                upsert(
                    conn,
                    parcels,
                    ["shop_id", "tracking_number"],
                    [],
                    merge=PARCEL_MERGE.sql(parcels),
                ),
                list(self.statuses.values()),
            )
        touched = sorted({(s, n) for s, _, n in self.links} | set(self.statuses))
        if not touched:
            return
        t, p = order_tracking.c, parcels.c
        async with planned_per_execution(conn):
            await conn.execute(
                update(order_tracking)
                .where(
                    t.shop_id == p.shop_id,
                    t.tracking_number == p.tracking_number,
                    in_rows(
                        conn,
                        "parcels",
                        [p.shop_id, p.tracking_number],
                        _PARCEL_KEY,
                        sorted(touched),
                    ),
                )
                .values(status=p.status)
            )

"""A customer's consent per channel, as the API and the unsubscribe link read and write it."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import upsert
from services.notifier.models import consents


async def read(conn: AsyncConnection, shop: str, customer_id: str) -> dict[str, bool | None]:
    """The customer's stored consent per channel (None: never asked)."""
    row = (
        await conn.execute(
            select(consents.c.sms, consents.c.email).where(
                consents.c.shop_id == shop, consents.c.customer_id == customer_id
            )
        )
    ).first()
    return {"sms": None, "email": None} if row is None else {"sms": row.sms, "email": row.email}


async def write(
    conn: AsyncConnection,
    shop: str,
    customer_id: str,
    given: Mapping[str, bool | None],
    now: datetime,
) -> dict[str, bool | None]:
    """Set the channels in `given`, keep the others; returns the consent now stored."""
    values = await read(conn, shop, customer_id)
    values.update(given)
    await conn.execute(
        upsert(conn, consents, ["shop_id", "customer_id"], ["sms", "email", "updated_at"]),
        {"shop_id": shop, "customer_id": customer_id, **values, "updated_at": now},
    )
    return values

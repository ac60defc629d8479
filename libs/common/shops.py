"""Each service's local projection of the shops registry and its API keys.

Ingest owns shops and keys and announces them on the `shops` topic; every service applies
those events to its own `shops` and `api_keys` tables with `apply_shop_events`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import insert_ignore, upsert
from libs.common.db.tables import api_keys, shops
from libs.common.events import Envelope, ShopData, ShopKeyData


async def apply_shop_events(conn: AsyncConnection, events: Sequence[Envelope]) -> None:
    """Upsert shops and keys; a revocation wins over an issue whatever the order."""
    for event in events:
        data = event.typed_data()
        if isinstance(data, ShopData):
            await conn.execute(
                upsert(conn, shops, ["shop_id"], ["name", "timezone", "currency"]),
                {
                    **data.model_dump(include={"shop_id", "name", "timezone", "currency"}),
                    "created_at": event.time,
                },
            )
        elif isinstance(data, ShopKeyData):
            row = {
                "key_hash": data.key_hash,
                "key_id": data.key_id,
                "shop_id": data.shop_id,
                "revoked": event.type == "shop.key_revoked",
                "created_at": event.time,
            }
            await conn.execute(insert_ignore(conn, api_keys), row)
            if event.type == "shop.key_revoked":
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.key_hash == data.key_hash)
                    .values(revoked=True)
                )

"""Per-shop stage policies: stored as JSON, defaults when a shop has none."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import upsert
from services.lifecycle.models import shop_policies
from services.lifecycle.stages import DEFAULT_POLICY, StagePolicy


async def load_policies(conn: AsyncConnection, shop_ids: Iterable[str]) -> dict[str, StagePolicy]:
    """The policy of each shop (the default for shops that never set one)."""
    wanted = set(shop_ids)
    found = {
        row.shop_id: StagePolicy.model_validate_json(row.policy)
        for row in await conn.execute(
            select(shop_policies.c.shop_id, shop_policies.c.policy).where(
                shop_policies.c.shop_id.in_(wanted)
            )
        )
    }
    return {shop: found.get(shop, DEFAULT_POLICY) for shop in wanted}


async def save_policy(conn: AsyncConnection, shop_id: str, policy: StagePolicy) -> None:
    await conn.execute(
        upsert(conn, shop_policies, ["shop_id"], ["policy", "updated_at"]),
        {"shop_id": shop_id, "policy": policy.model_dump_json(), "updated_at": datetime.now(UTC)},
    )

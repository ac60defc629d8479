"""A segment of 100,000 customers exports as a stream, not as one list in memory."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from libs.common.db import Database
from services.lifecycle.models import customers
from tests.platform import Platform

CUSTOMERS = 100_000


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("no VmRSS")


async def test_export_of_100k_customers_streams(platform: Platform) -> None:
    shop = f"shop-{uuid.uuid4().hex[:8]}"
    key = await platform.create_shop(shop)
    db = Database(platform.settings.database_url_for("lifecycle"), "lifecycle")
    now = datetime.now(UTC)
    try:
        for start in range(0, CUSTOMERS, 10_000):
            async with db.begin() as conn:
                await conn.execute(
                    customers.insert(),
                    [
                        {
                            "shop_id": shop,
                            "customer_id": f"c{i:06d}",
                            "name": f"客户{i}",
                            "phone": f"+86138{i:08d}",
                            "first_seen_at": now,
                            "stage": "prospect",
                            "city": "杭州市",
                        }
                        for i in range(start, start + 10_000)
                    ],
                )
    finally:
        await db.dispose()
    r = await platform.request(
        "POST",
        "/v1/segments",
        key=key,
        json={
            "name": "everyone in Hangzhou",
            "filter": {"field": "city", "op": "eq", "value": "杭州市"},
        },
    )
    segment_id = r.json()["segment_id"]
    server = platform.processes["platform" if platform.embedded else "lifecycle"].pid
    before = resident_kib(server)
    peak = before
    lines = chunks = 0
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream(
            "GET",
            platform.url(f"/v1/segments/{segment_id}/export.csv"),
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        async for chunk in response.aiter_bytes():
            chunks += 1
            lines += chunk.count(b"\n")
            if chunks % 20 == 0:
                peak = max(peak, resident_kib(server))
    assert lines == CUSTOMERS + 1
    assert chunks > 20, "the body arrives in pieces as it is produced"
    assert peak - before < 60 * 1024, (
        f"the server grew by {(peak - before) // 1024} MiB: it held the export in memory"
    )

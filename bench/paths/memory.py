"""Memory: resident memory of each service process as customers pile up in the database.

`memory_events` canonical `order.paid` events, each for a new customer, go in through
`POST /v1/events` in batches of 500 (4 requests in flight). At each of
`memory_checkpoints` evenly spaced points the feed waits until lifecycle has applied
everything sent, then reads every service process's RSS. Memory that tracked the number
of customers would grow in proportion between checkpoints; the growth from the first
checkpoint to the last is reported next to the growth in customers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson

from bench import infra
from bench.core import Measurement, Run, Stack, mb
from bench.scenarios import canonical_event
from bench.stats import Stat

SHOP = "bench-mem"
BATCH = 500
IN_FLIGHT = 4


async def _feed(client: httpx.AsyncClient, url: str, key: str, start: int, count: int) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for offset in range(start, start + count, BATCH):
        queue.put_nowait(offset)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def sender() -> None:
        while not queue.empty():
            offset = queue.get_nowait()
            size = min(BATCH, start + count - offset)
            body = orjson.dumps([canonical_event(SHOP, f"m{offset + i}") for i in range(size)])
            for _ in range(20):
                r = await client.post(f"{url}/v1/events", content=body, headers=headers)
                if r.status_code == 202:
                    break
                await asyncio.sleep(0.5)
            else:
                raise RuntimeError(f"ingest refused a batch: {r.status_code} {r.text[:200]}")

    await asyncio.gather(*(sender() for _ in range(IN_FLIGHT)))


async def _applied(client: httpx.AsyncClient, lifecycle_url: str, total: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        consumed = await infra.metric_sum(
            client, lifecycle_url, "huitou_consumer_messages_total", group="lifecycle"
        )
        if consumed >= total:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("lifecycle did not catch up within 10 minutes")


async def measure(run: Run, stack: Stack) -> None:
    size = run.size
    data = stack.dir("memory")
    database = await stack.database()
    env = stack.env(data, database, stack.namespace())
    names = ["platform"] if stack.embedded else ["ingest", "lifecycle", "campaigns", "notifier"]
    processes = [infra.Huitou(n, env, data) for n in names]
    for p in processes:
        p.spawn()
    checkpoints: list[dict[str, Any]] = []
    try:
        for p in processes:
            await p.wait_ready()
        ingest_url = processes[0].url
        lifecycle_url = processes[min(1, len(processes) - 1)].url
        async with httpx.AsyncClient(timeout=60) as client:
            key = await infra.create_shop(client, ingest_url, SHOP, {})
            await infra.wait_key_known(client, lifecycle_url, key)
            checkpoints.append(
                {"events": 0, "customers": 0, "rss_mb": {p.name: mb(p.rss()) for p in processes}}
            )
            step = size.memory_events // size.memory_checkpoints
            sent = 0
            started = time.perf_counter()
            for _ in range(size.memory_checkpoints):
                await _feed(client, ingest_url, key, sent, step)
                sent += step
                await _applied(client, lifecycle_url, sent)
                checkpoints.append(
                    {
                        "events": sent,
                        "customers": sent,
                        "seconds": round(time.perf_counter() - started, 1),
                        "rss_mb": {p.name: round(mb(p.rss()), 1) for p in processes},
                    }
                )
                run.log(f"  {sent:,} events applied: {checkpoints[-1]['rss_mb']}")
            elapsed = time.perf_counter() - started
    finally:
        for p in processes:
            p.stop()
    run.details.setdefault("memory", {})[stack.mode] = checkpoints
    first, last = checkpoints[1], checkpoints[-1]
    for name in names:
        grew = last["rss_mb"][name] - first["rss_mb"][name]
        run.add(
            Measurement(
                path=f"memory.{name}",
                mode=stack.mode,
                unit="MB",
                ours=Stat([last["rss_mb"][name]]),
                rss_mb=last["rss_mb"][name],
                note=(
                    f"RSS {first['rss_mb'][name]:.0f} → {last['rss_mb'][name]:.0f} MB "
                    f"({grew:+.1f} MB) while customers went {first['customers']:,} → "
                    f"{last['customers']:,}; events fed and applied at {sent / elapsed:,.0f}/s"
                ),
                extra={
                    "checkpoints": [c["rss_mb"][name] for c in checkpoints],
                    "events_per_s": sent / elapsed,
                },
                higher_is_better=False,
            )
        )


def growth(run: Run) -> str:
    """The memory checkpoints as a small table (empty when not measured)."""
    memory = run.details.get("memory")
    if not memory:
        return ""
    lines = ["memory (RSS in MB at each checkpoint; customers = events applied):"]
    for mode, checkpoints in memory.items():
        names = list(checkpoints[0]["rss_mb"])
        lines.append(
            f"  {mode}: customers " + " → ".join(f"{c['customers']:,}" for c in checkpoints)
        )
        first, last = checkpoints[1], checkpoints[-1]
        added = (last["customers"] - first["customers"]) / 10_000
        for name in names:
            values = " → ".join(f"{c['rss_mb'][name]:.0f}" for c in checkpoints)
            slope = (last["rss_mb"][name] - first["rss_mb"][name]) / added if added else 0.0
            lines.append(f"    {name:<10} {values}   ({slope:+.1f} MB per 10,000 more customers)")
    return "\n".join(lines)

"""End-to-end load: signed Shopify `orders/create` webhooks at a steady rate (open loop),
each for a new customer placing an open order now; a sample of them is followed through
`GET /v1/customers/{id}` until the customer shows the stage the order gives (`interested`).

Latency is from the webhook's acknowledgement to the first poll that sees the stage. A
probe polls every 10 ms at first, then 25 % less often each time, up to every 100 ms: the
error is under 10 ms below 100 ms of latency and under 25 % above, while a slow platform
is not drowned in polls.

`python -m bench.e2e_load --ingest URL --lifecycle URL --shop S --key K --rate R
--duration D` prints `BENCH_JSON {...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from typing import Any

import orjson
import uvloop

from bench.http1 import Pool
from bench.loadgen import TAG
from bench.scenarios import request_number, run_salt, shopify
from bench.stats import percentile


async def load(args: argparse.Namespace) -> dict[str, Any]:
    scenario = shopify(args.shop, fresh=True)
    ingest = Pool.for_url(args.ingest, args.connections)
    api = Pool.for_url(args.lifecycle, args.probe_connections)
    probe_every = max(1, round(args.rate / args.probes_per_s))
    first_poll, poll_growth, last_poll = args.poll_ms / 1000, 1.25, 0.1
    salt = run_salt()
    acks: list[float] = []
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    timeouts = 0
    probes: set[asyncio.Task[None]] = set()
    senders: set[asyncio.Task[None]] = set()
    auth = {"Authorization": f"Bearer {args.key}"}

    async def probe(customer: str, acked: float) -> None:
        nonlocal timeouts
        request = api.build("GET", f"/v1/customers/{customer}", auth)
        poll = first_poll
        while time.perf_counter() - acked < args.probe_timeout:
            status, body = await api.request(request)
            if status == 200 and orjson.loads(body).get("stage") == args.expect:
                latencies.append(time.perf_counter() - acked)
                return
            await asyncio.sleep(poll)
            poll = min(last_poll, poll * poll_growth)
        timeouts += 1

    slots = asyncio.Semaphore(args.connections)

    async def send(i: int) -> None:
        n = request_number(salt, 0, i)
        body = scenario.body(n)
        request = ingest.build("POST", scenario.path, scenario.request_headers(body, n), body)
        async with slots:
            started = time.perf_counter()
            if started > give_up:
                # Open loop: a request the server had no room for in time is not sent late.
                errors["not_sent_in_time"] += 1
                return
            try:
                status, _ = await ingest.request(request)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors["transport"] += 1
                return
        acked = time.perf_counter()
        if status != 200:
            errors[str(status)] += 1
            return
        acks.append(acked - started)
        if i % probe_every == 0:
            task = asyncio.create_task(probe(str(n), acked))
            probes.add(task)
            task.add_done_callback(probes.discard)

    started = time.perf_counter()
    give_up = started + args.duration + 1.0
    sent = 0
    while (elapsed := time.perf_counter() - started) < args.duration:
        due = int(elapsed * args.rate)
        while sent < due:
            sent += 1
            task = asyncio.create_task(send(sent))
            senders.add(task)
            task.add_done_callback(senders.discard)
        await asyncio.sleep(0.002)
    if senders:
        await asyncio.wait(senders)
    sending = min(time.perf_counter() - started, args.duration + 1.0)
    if probes:
        await asyncio.wait(probes)
    await ingest.close()
    await api.close()

    def ms(value: float | None) -> float | None:
        return value * 1000 if value is not None else None

    return {
        "target_rate": args.rate,
        "sent": sent,
        "acknowledged": len(acks),
        "achieved_rate": len(acks) / sending if sending else 0,
        "errors": dict(errors),
        "ack_p50_ms": ms(percentile(acks, 50)),
        "ack_p99_ms": ms(percentile(acks, 99)),
        "probes": len(latencies) + timeouts,
        "probe_timeouts": timeouts,
        "e2e_p50_ms": ms(percentile(latencies, 50)),
        "e2e_p99_ms": ms(percentile(latencies, 99)),
        "e2e_max_ms": ms(max(latencies, default=None)),
        "poll_ms": args.poll_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ingest", required=True)
    parser.add_argument("--lifecycle", required=True)
    parser.add_argument("--shop", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--probe-connections", type=int, default=4)
    parser.add_argument("--probes-per-s", type=float, default=5)
    parser.add_argument("--poll-ms", type=float, default=10)
    parser.add_argument("--probe-timeout", type=float, default=60)
    parser.add_argument("--expect", default="interested")
    args = parser.parse_args()
    result = uvloop.run(load(args))
    sys.stdout.write(TAG + orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()

"""The raw producer rate: the bus client alone, publishing what ingest publishes per
request, from `concurrency` concurrent callers (as concurrent requests would), no HTTP.

`python -m bench.producer --scenario F --duration S --concurrency C` with the bus chosen
by the usual `HUITOU_*` variables; prints `BENCH_JSON {...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import orjson
import uvloop

from bench.loadgen import TAG
from bench.scenarios import Scenario, bus_topic
from bench.stats import percentile
from libs.common.bus import Message, create_bus
from libs.common.events import topic_name
from libs.common.settings import Settings


async def produce(scenario: Scenario, duration: float, concurrency: int) -> dict[str, object]:
    settings = Settings()
    namespace = settings.topic_namespace
    bus = create_bus(settings)
    await bus.start()
    await bus.ensure_topics([topic_name(t, namespace) for t in ("orders", "logistics")])
    templates = [
        (bus_topic(m, namespace), m.key, m.value.encode(), {"ce_id": m.id, "ce_type": m.type})
        for m in scenario.messages
    ]
    latencies: list[float] = []
    counter = 0

    async def caller(deadline: float) -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            counter += 1
            n = counter
            batch = [Message(t, f"{k}:{n}", v, h) for t, k, v, h in templates]
            started = time.perf_counter()
            await bus.publish(batch)
            latencies.append(time.perf_counter() - started)

    # A short warm-up (connections, metadata, SQLite pages), then the measured window.
    await asyncio.gather(*(caller(time.perf_counter() + 0.5) for _ in range(concurrency)))
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(caller(started + duration) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await bus.stop()
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "p50_us": int((percentile(latencies, 50) or 0) * 1e6),
        "p99_us": int((percentile(latencies, 99) or 0) * 1e6),
        "errors": {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", type=Path, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    result = uvloop.run(produce(Scenario.load(args.scenario), args.duration, args.concurrency))
    sys.stdout.write(TAG + orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()

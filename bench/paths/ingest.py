"""Ingest: HTTP requests per second up to the durable bus acknowledgement.

For each scenario (one canonical event, a batch, a signed Shopify `orders/create`), a
separate load process (wrk, else httpx) holds `connections` keep-alive connections for a
fixed time against:
- Huitou: `huitou up` (embedded; its consumers run in the same process, as they do for a
  user) or `huitou serve ingest` (distributed, nothing else in the process);
- the bare endpoint (`bench/bare.py`): the same server stack and bus client publishing
  the same bytes, no parsing, no auth, no ledger;
and, with no HTTP at all, the bus client alone (`bench/producer.py`) publishing those
bytes from as many concurrent callers.

Embedded runs start Huitou afresh for every round of the three scenarios (the batch one
last) and stop it before the bare endpoint's turn, so a backlog left to the consumers
never slows the bare endpoint or the next round.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx

from bench import infra, loadgen, scenarios
from bench.core import Measurement, Run, Stack, mb
from bench.scenarios import Scenario
from bench.stats import Stat, median_or_none

SECRETS = {"shopify": scenarios.SHOPIFY_SECRET}


class Target:
    """A Huitou process (or set of them) to load, with a shop and scenarios of its own."""

    def __init__(self, run: Run, stack: Stack) -> None:
        self.run = run
        self.stack = stack
        self.process: infra.Huitou | None = None
        self.scenarios: dict[str, Scenario] = {}

    async def start(self) -> None:
        data = self.stack.dir("ingest")
        database = await self.stack.database()
        name = "platform" if self.stack.embedded else "ingest"
        env = self.stack.env(data, database, self.stack.namespace())
        self.process = infra.Huitou(name, env, data)
        await self.process.start()
        shop = "bench-shop"
        async with httpx.AsyncClient(timeout=30) as client:
            key = await infra.create_shop(client, self.process.url, shop, SECRETS)
        self.scenarios = {n: scenarios.build(n, shop, key) for n in scenarios.NAMES}

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def _load(
    run: Run, url: str, scenario: Scenario, seconds: float, path: str | None = None
) -> loadgen.LoadResult:
    """One load run, then a pause for the requests wrk abandoned at its deadline to finish,
    so they never eat into the next measurement."""
    result = loadgen.run(
        run.wrk,
        url,
        scenario,
        run.workdir,
        salt=scenarios.run_salt(),
        duration=seconds,
        connections=run.size.connections,
        path=path,
    )
    time.sleep(min(5.0, 0.2 + 1.5 * (result.p99_ms or 0) / 1000))
    return result


async def _producer(run: Run, stack: Stack, scenario: Scenario) -> loadgen.LoadResult:
    data = stack.dir("producer")
    env = stack.env(data, None, stack.namespace())
    file = scenario.save(run.workdir / f"producer-{scenario.name}.json")
    args = [
        sys.executable,
        "-m",
        "bench.producer",
        "--scenario",
        str(file),
        "--duration",
        str(min(run.size.ingest_seconds, 3)),
        "--concurrency",
        str(run.size.connections),
    ]
    done = await asyncio.to_thread(
        subprocess.run,
        args,
        env=env,
        cwd=infra.ROOT,
        capture_output=True,
        text=True,
        timeout=run.size.ingest_seconds + 120,
    )
    return loadgen._parse(done.stdout + done.stderr, "producer")


async def _start_bare(
    run: Run, stack: Stack, target: Target
) -> tuple[subprocess.Popen[bytes], str]:
    data = stack.dir("bare")
    env = stack.env(data, None, stack.namespace())
    files = [s.save(run.workdir / f"bare-{s.name}.json") for s in target.scenarios.values()]
    port = infra.free_port()
    args = [sys.executable, "-m", "bench.bare", "--port", str(port)]
    for f in files:
        args += ["--scenario", str(f)]
    process = infra.spawn(args, data / "bare.log", env=env, cwd=infra.ROOT)
    await asyncio.to_thread(infra.wait_for_port, port, 60)
    return process, f"http://127.0.0.1:{port}"


def _check(run: Run, what: str, result: loadgen.LoadResult) -> None:
    if result.failed or result.requests == 0:
        run.note(f"{what}: {result.requests} requests, errors {result.errors}")


async def _ours(
    run: Run, target: Target, name: str, *, profile: bool = False
) -> tuple[loadgen.LoadResult, float]:
    """One load run against Huitou, after a warm-up; returns it and the process's RSS."""
    assert target.process is not None
    scenario = target.scenarios[name]
    url = target.process.url
    if run.size.warmup_s:
        await asyncio.to_thread(_load, run, url, scenario, run.size.warmup_s)
    if profile:
        async with run.profile(f"ingest-{name}-{target.stack.mode}", target.process.pid):
            result = await asyncio.to_thread(_load, run, url, scenario, run.size.ingest_seconds)
    else:
        result = await asyncio.to_thread(_load, run, url, scenario, run.size.ingest_seconds)
    return result, mb(target.process.rss())


async def _round(
    run: Run, stack: Stack, shared: Target | None, *, profile: bool = False
) -> dict[str, tuple[loadgen.LoadResult, float]]:
    """Every scenario once against Huitou (a freshly started one in embedded mode)."""
    target = shared or Target(run, stack)
    if shared is None:
        await target.start()
    try:
        return {n: await _ours(run, target, n, profile=profile) for n in scenarios.NAMES}
    finally:
        if shared is None:
            target.stop()


async def measure(run: Run, stack: Stack) -> None:
    size = run.size
    mode = stack.mode
    ours = {n: Stat() for n in scenarios.NAMES}
    bare = {n: Stat() for n in scenarios.NAMES}
    producer = {n: Stat() for n in scenarios.NAMES}
    lat: dict[str, dict[str, list[float | None]]] = {
        n: {"p50": [], "p99": [], "bp50": [], "bp99": []} for n in scenarios.NAMES
    }
    rss: list[float] = []
    bare_rss: list[float] = []

    # Distributed: one `huitou serve ingest` throughout (it runs no consumer).
    shared = Target(run, stack) if not stack.embedded else None
    template = shared or Target(run, stack)
    await template.start()
    try:
        bare_process, bare_url = await _start_bare(run, stack, template)
        if shared is None:
            template.stop()
        try:
            for name in scenarios.NAMES if size.warmup_s else ():
                scenario = template.scenarios[name]
                await asyncio.to_thread(
                    _load, run, bare_url, scenario, size.warmup_s, f"/bare/{name}"
                )
            if run.profiler is not None:
                await _round(run, stack, shared, profile=True)
            for _ in range(size.repeats):
                for name, (result, resident) in (await _round(run, stack, shared)).items():
                    _check(run, f"ingest {name} {mode}", result)
                    ours[name].add(result.rate * template.scenarios[name].events)
                    lat[name]["p50"].append(result.p50_ms)
                    lat[name]["p99"].append(result.p99_ms)
                    rss.append(resident)
                for name in scenarios.NAMES:
                    scenario = template.scenarios[name]
                    result = await asyncio.to_thread(
                        _load, run, bare_url, scenario, size.ingest_seconds, f"/bare/{name}"
                    )
                    _check(run, f"bare {name} {mode}", result)
                    bare[name].add(result.rate * scenario.events)
                    lat[name]["bp50"].append(result.p50_ms)
                    lat[name]["bp99"].append(result.p99_ms)
                    bare_rss.append(mb(infra.rss_bytes(bare_process.pid)))
        finally:
            infra.stop_process(bare_process)
        for _ in range(size.repeats):
            for name in scenarios.NAMES:
                result = await _producer(run, stack, template.scenarios[name])
                producer[name].add(result.rate * template.scenarios[name].events)
    finally:
        template.stop()

    tool = "wrk" if run.wrk else "httpx"
    for name in scenarios.NAMES:
        events = template.scenarios[name].events
        unit = "req/s" if events == 1 else "ev/s"
        label = f"{name} ({events} events/request)" if events > 1 else name
        run.add(
            Measurement(
                path=f"ingest.{name}",
                mode=mode,
                unit=unit,
                ours=ours[name],
                raw=bare[name],
                raw_label="bare endpoint (same stack, same bus, same bytes)",
                p50_ms=median_or_none(lat[name]["p50"]),
                p99_ms=median_or_none(lat[name]["p99"]),
                rss_mb=max(rss) if rss else None,
                note=f"{label}; {size.connections} connections from {tool}",
                extra={"events_per_request": events},
            )
        )
        run.add(
            Measurement(
                path=f"ingest.{name}.bare",
                mode=mode,
                unit=unit,
                ours=bare[name],
                raw=producer[name],
                raw_label=f"bus client alone, {size.connections} concurrent publishers",
                p50_ms=median_or_none(lat[name]["bp50"]),
                p99_ms=median_or_none(lat[name]["bp99"]),
                rss_mb=max(bare_rss) if bare_rss else None,
                note="bare endpoint vs raw producer",
                extra={"events_per_request": events},
            )
        )

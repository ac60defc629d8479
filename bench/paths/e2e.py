"""End to end: from a webhook's acknowledgement to the customer's stage visible through
the API, at a steady rate (`bench/e2e_load.py`, a separate process).

Distributed: `huitou serve ingest` and `huitou serve lifecycle` as two processes on
PostgreSQL and the broker, at `e2e_rate` per second. Embedded: `huitou up`, at each rate
of the ladder in turn until one is not held (achieved < 95 % of the target, any error or
lost probe, or p99 over 1 s); the highest rate held is then measured `repeats` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from typing import Any

import httpx
import orjson

from bench import infra, loadgen, scenarios
from bench.core import Measurement, Run, Stack, mb
from bench.stats import Stat, median_or_none

SHOP = "bench-e2e"
HELD_P99_MS = 1000.0


class Deployment:
    """The processes a steady webhook stream runs through: `huitou up`, or the distributed
    services named (ingest first, lifecycle last by default)."""

    def __init__(
        self, run: Run, stack: Stack, services: tuple[str, ...] = ("ingest", "lifecycle")
    ) -> None:
        self.run = run
        self.stack = stack
        self.services = services
        self.processes: list[infra.Huitou] = []
        self.ingest_url = ""
        self.lifecycle_url = ""
        self.key = ""

    async def start(self) -> None:
        data = self.stack.dir("e2e")
        database = await self.stack.database()
        env = self.stack.env(data, database, self.stack.namespace())
        names = ["platform"] if self.stack.embedded else list(self.services)
        self.processes = [infra.Huitou(n, env, data) for n in names]
        for p in self.processes:  # where each service finds the others it calls
            for other in self.processes:
                if other.name in ("lifecycle", "notifier", "campaigns"):
                    p.env[f"HUITOU_{other.name.upper()}_URL"] = other.url
        for p in self.processes:
            p.spawn()
        try:
            for p in self.processes:
                await p.wait_ready()
        except BaseException:
            self.stop()  # none is left running when the deployment never came up
            raise
        self.ingest_url = self.processes[0].url
        self.lifecycle_url = self.url_of("lifecycle")
        async with httpx.AsyncClient(timeout=30) as client:
            self.key = await infra.create_shop(
                client, self.ingest_url, SHOP, {"shopify": scenarios.SHOPIFY_SECRET}
            )
            await infra.wait_key_known(client, self.lifecycle_url, self.key)

    def url_of(self, service: str) -> str:
        """Where `service` answers: the platform process embedded, its own distributed."""
        for p in self.processes:
            if p.name in (service, "platform"):
                return p.url
        raise KeyError(service)

    def stop(self) -> None:
        for p in self.processes:
            p.stop()

    def rss_mb(self) -> dict[str, float]:
        return {p.name: mb(p.rss()) for p in self.processes}

    async def load(self, rate: float, seconds: float, *, profile: bool = False) -> dict[str, Any]:
        args = [
            sys.executable,
            "-m",
            "bench.e2e_load",
            "--ingest",
            self.ingest_url,
            "--lifecycle",
            self.lifecycle_url,
            "--shop",
            SHOP,
            "--key",
            self.key,
            "--rate",
            str(rate),
            "--duration",
            str(seconds),
        ]
        async with contextlib.AsyncExitStack() as profiles:
            if profile:
                for p in self.processes:
                    await profiles.enter_async_context(
                        self.run.profile(f"e2e-{p.name}-{self.stack.mode}", p.pid)
                    )
            done = await asyncio.to_thread(
                subprocess.run,
                args,
                cwd=infra.ROOT,
                capture_output=True,
                text=True,
                timeout=seconds + 180,
            )
        for line in (done.stdout + done.stderr).splitlines():
            if line.startswith(loadgen.TAG):
                result: dict[str, Any] = orjson.loads(line[len(loadgen.TAG) :])
                return result
        raise RuntimeError(f"e2e load printed no result:\n{done.stderr[-2000:]}")


def held(result: dict[str, Any]) -> bool:
    return (
        result["achieved_rate"] >= 0.95 * result["target_rate"]
        and not result["errors"]
        and not result["probe_timeouts"]
        and result["e2e_p99_ms"] is not None
        and result["e2e_p99_ms"] <= HELD_P99_MS
    )


async def _ladder(run: Run, deployment: Deployment) -> tuple[list[dict[str, Any]], Any]:
    """Each rate of the ladder in turn until one is not held; returns every step and the
    last one held (None if even the first was not)."""
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for step in run.size.e2e_ladder:
        result = await deployment.load(step, run.size.e2e_step_seconds)
        steps.append(result)
        p99 = result["e2e_p99_ms"]
        run.log(
            f"  ladder {step}/s: achieved {result['achieved_rate']:.0f}/s, "
            f"p99 {p99 if p99 is None else round(p99)} ms, held={held(result)}"
        )
        if not held(result):
            break
        best = result
    return steps, best


def _summary(runs: list[dict[str, Any]]) -> str:
    ack = median_or_none([r["ack_p99_ms"] for r in runs]) or 0
    return f"ack p99 {ack:.0f} ms; {sum(r['probes'] for r in runs)} probes"


async def measure(run: Run, stack: Stack) -> None:
    size = run.size
    deployment = Deployment(run, stack)
    await deployment.start()
    runs: list[dict[str, Any]] = []
    try:
        if size.warmup_s:
            await deployment.load(min(100, size.e2e_ladder[0]), 2 * size.warmup_s)
        ladder, best = await _ladder(run, deployment)
        highest = float(best["target_rate"] if best else size.e2e_ladder[0])
        if best is None:
            run.note(f"e2e {stack.mode}: even {highest:.0f}/s was not held")
        rate = highest if stack.embedded else float(size.e2e_rate)
        if run.profiler is not None:
            await deployment.load(rate, min(size.e2e_seconds, 10), profile=True)
        for _ in range(size.repeats):
            runs.append(await deployment.load(rate, size.e2e_seconds))
        memory = deployment.rss_mb()
    finally:
        deployment.stop()

    run.details.setdefault("e2e", {})[stack.mode] = {"ladder": ladder, "runs": runs}
    failed = [r for r in runs if not held(r)]
    if failed:
        run.note(
            f"e2e {stack.mode} at {rate:.0f}/s: {len(failed)} of {len(runs)} runs not held "
            f"(achieved {[round(r['achieved_rate']) for r in failed]}/s, "
            f"p99 {[r['e2e_p99_ms'] and round(r['e2e_p99_ms']) for r in failed]} ms, "
            f"errors {[r['errors'] for r in failed]}, "
            f"lost probes {[r['probe_timeouts'] for r in failed]})"
        )
    what = "highest steady rate held" if stack.embedded else "target"
    run.add(
        Measurement(
            path="e2e.webhook_to_stage",
            mode=stack.mode,
            unit="ev/s",
            ours=Stat([r["achieved_rate"] for r in runs]),
            p50_ms=median_or_none([r["e2e_p50_ms"] for r in runs]),
            p99_ms=median_or_none([r["e2e_p99_ms"] for r in runs]),
            rss_mb=max(memory.values()) if memory else None,
            note=f"{what} {rate:.0f}/s for {size.e2e_seconds:.0f} s; {_summary(runs)}",
            extra={"target_rate": rate, "rss_mb": memory},
        )
    )
    if not stack.embedded and best is not None:
        run.add(
            Measurement(
                path="e2e.highest_held",
                mode=stack.mode,
                unit="ev/s",
                ours=Stat([best["achieved_rate"]]),
                p50_ms=best["e2e_p50_ms"],
                p99_ms=best["e2e_p99_ms"],
                note=(
                    f"highest ladder step held: {highest:.0f}/s for "
                    f"{size.e2e_step_seconds:.0f} s; {_summary([best])}"
                ),
                extra={"target_rate": highest},
            )
        )

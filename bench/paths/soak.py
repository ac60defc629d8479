"""Soak: resident memory of every service process under a steady stream, for minutes.

The whole chain runs: `huitou up` (embedded) or the four `huitou serve` processes
(distributed). The shop has the `unpaid_reminder` journey active with a delay of a fifth of
the run, and Shopify `orders/create` webhooks for new customers' open orders arrive at
`soak_rate` per second for `soak_seconds` (`bench/e2e_load.py`, open loop, its probes
following customers to their stage). So ingest takes the webhooks, lifecycle applies them,
campaigns enrolls every order and fires its reminder, and the notifier sends each through
the default `outbox` provider. The load generator builds its bodies once, so every order
says it was placed when the load began: the reminders wait until a fifth of the run has
passed (`soak_rate` × delay of them by then), fire together, and from then on each new
order's reminder is due on arrival — a steady stream of sends for the rest of the run.

Every `soak_sample_s` the bench reads each process's RSS. Reported per process: the peak,
and the slope in MB per minute fitted by least squares over the second half of the run
(start-up, connections, caches and the first wave of sends belong to the warm-up; a leak
shows as a slope that stays positive however long the run). `python -m bench full --paths
soak` runs the ten-minute soak alone (`make bench-soak`).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from bench import infra
from bench.core import Measurement, Run, Stack
from bench.paths.e2e import Deployment
from bench.stats import Stat

SERVICES = ("ingest", "lifecycle", "campaigns", "notifier")


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute (0 for fewer than 2)."""
    if len(samples) < 2:
        return 0.0
    return 60 * statistics.linear_regression([t for t, _ in samples], [v for _, v in samples]).slope


async def _activate_reminder(deployment: Deployment, delay_s: int) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(
            f"{deployment.url_of('campaigns')}/v1/playbooks/unpaid_reminder",
            json={"params": {"delay": f"PT{delay_s}S"}, "activate": True},
            headers={"Authorization": f"Bearer {deployment.key}"},
        )
        if r.status_code != 201:
            raise RuntimeError(f"the unpaid reminder was refused: {r.status_code} {r.text}")


async def _sample(
    deployment: Deployment, every: float, into: list[tuple[float, dict[str, float]]]
) -> None:
    started = time.monotonic()
    while True:
        into.append((time.monotonic() - started, deployment.rss_mb()))
        await asyncio.sleep(every)


async def _counts(deployment: Deployment) -> tuple[float, dict[str, float]]:
    """Timers campaigns fired, and the notifier's message status changes by status."""
    async with httpx.AsyncClient(timeout=30) as client:
        fired = await infra.metric_sum(
            client, deployment.url_of("campaigns"), "huitou_timers_fired_total"
        )
        statuses = await infra.metric_by(
            client, deployment.url_of("notifier"), "huitou_notifier_messages_total", "status"
        )
    return fired, statuses


async def measure(run: Run, stack: Stack) -> None:
    size = run.size
    seconds = size.soak_seconds
    rate = size.soak_rate[0 if stack.embedded else 1]
    delay = max(1, round(seconds / 5))
    deployment = Deployment(run, stack, SERVICES)
    await deployment.start()
    samples: list[tuple[float, dict[str, float]]] = []
    try:
        await _activate_reminder(deployment, delay)
        sampler = asyncio.create_task(_sample(deployment, size.soak_sample_s, samples))
        try:
            result = await deployment.load(rate, seconds)
        finally:
            sampler.cancel()
        fired, statuses = await _counts(deployment)
    finally:
        deployment.stop()

    run.details.setdefault("soak", {})[stack.mode] = {
        "rate": rate,
        "seconds": seconds,
        "every": size.soak_sample_s,
        "samples": samples,
        "load": result,
    }
    run.add(
        Measurement(
            path="soak.load",
            mode=stack.mode,
            unit="ev/s",
            ours=Stat([result["achieved_rate"]]),
            p50_ms=result["e2e_p50_ms"],
            p99_ms=result["e2e_p99_ms"],
            note=(
                f"{rate}/s of Shopify webhooks for {seconds:.0f} s with the unpaid reminder "
                f"due after {delay} s; {fired:,.0f} timers fired; messages by status "
                f"{ {k: round(v) for k, v in sorted(statuses.items())} }; "
                f"errors {result['errors'] or 'none'}, "
                f"lost probes {result['probe_timeouts']}"
            ),
            extra={"target_rate": rate, "fired": fired, "notifier_statuses": statuses},
        )
    )
    warm = seconds / 2
    for name in samples[0][1] if samples else []:
        series = [(t, rss[name]) for t, rss in samples if name in rss]
        steady = [(t, v) for t, v in series if t >= warm] or series
        peak = max(v for _, v in series)
        slope = slope_per_minute(steady)
        run.add(
            Measurement(
                path=f"soak.{name}",
                mode=stack.mode,
                unit="MB",
                ours=Stat([peak]),
                rss_mb=peak,
                note=(
                    f"peak {peak:.0f} MB; {slope:+.2f} MB/min after the first {warm:.0f} s "
                    f"({steady[0][1]:.0f} → {steady[-1][1]:.0f} MB, {len(series)} samples)"
                ),
                extra={"slope_mb_per_min": slope, "series": [round(v, 1) for _, v in series]},
                higher_is_better=False,
            )
        )


def table(run: Run) -> str:
    """RSS at each sample, per mode and process, for the printed report (empty if not run)."""
    soak: dict[str, Any] = run.details.get("soak") or {}
    lines = []
    for mode, detail in soak.items():
        lines.append(
            f"soak {mode}: {detail['rate']}/s for {detail['seconds']:.0f} s, RSS in MB every "
            f"{detail['every']:.0f} s"
        )
        for name in detail["samples"][0][1] if detail["samples"] else []:
            values = " ".join(f"{rss[name]:.0f}" for _, rss in detail["samples"])
            lines.append(f"  {name:<10} {values}")
    return "\n".join(lines)

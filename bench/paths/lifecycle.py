"""Lifecycle: order events applied per second from a pre-filled topic.

Lifecycle is started (`huitou up` embedded, `huitou serve lifecycle` distributed, on a
fresh database), then the orders topic is filled with `events` order events for
`customers` customers (each order created, then paid or cancelled, spread over the last
year so customers land in every stage) an order of magnitude faster than lifecycle
consumes, so it works through a pre-filled topic. The rate is read from its
committed-message counter between 10 % and 100 % of the topic, leaving start-up out.

The raw limit (`lifecycle_raw.py`) is the same database writing the same rows in batches
of the same size with no logic at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text

from bench import infra
from bench.core import Measurement, Run, Stack, mb
from bench.paths import lifecycle_raw
from bench.stats import Stat, median_or_none
from libs.common.bus import Message, create_bus
from libs.common.db import Database
from libs.common.events import parse_event, topic_for, topic_name
from libs.common.settings import Settings

SHOP = "bench-lc"
GROUP = "lifecycle"
CONSUMED = "huitou_consumer_messages_total"
BATCH_SECONDS = "huitou_consumer_batch_seconds_bucket"
OUTBOX = "huitou_outbox_relayed_total"
START_FRACTION = 0.1
HISTORY_DEPTHS = (1, 10, 100)
SCALE_MEMBERS = (1, 2, 4)


@dataclass
class Stream:
    """Pre-generated events: bus messages plus what the raw writer needs to know."""

    messages: list[Message]
    events: list[dict[str, Any]]


def order_events(n_events: int, n_customers: int, seed: int = 11) -> Stream:
    """Two events per order (created, then paid 80 % / cancelled 20 %), each customer's
    in time order, customers interleaved as many buyers' are on one topic."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    per_customer: list[list[dict[str, Any]]] = []
    orders_each = max(1, n_events // (2 * n_customers))
    for c in range(n_customers):
        customer = {
            "id": f"lc-c{c}",
            "name": "王芳",
            "phone": f"+86138{c:08d}",
        }
        days = sorted(rng.uniform(0, 400) for _ in range(orders_each))
        events: list[dict[str, Any]] = []
        for k, age in enumerate(reversed(days)):
            placed = now - timedelta(days=age)
            order_id = f"lc-o{c}-{k}"
            total = {"amount_minor": rng.choice((9900, 25900, 59900, 129900)), "currency": "CNY"}
            base = {
                "order_id": order_id,
                "customer": customer,
                "total": total,
                "items": [{"sku": "LJ-250", "title": "龙井", "quantity": 1, "price": total}],
                "shipping": {"country": "CN", "province": "浙江省", "city": "杭州市"},
                "created_at": placed.isoformat(),
            }
            events.append(_event("order.created", order_id, customer["id"], placed, base))
            if rng.random() < 0.8:
                paid = placed + timedelta(minutes=rng.uniform(1, 60))
                data = {**base, "status": "paid", "paid_at": paid.isoformat()}
                events.append(_event("order.paid", order_id, customer["id"], paid, data))
            else:
                gone = placed + timedelta(hours=rng.uniform(1, 48))
                data = {**base, "status": "cancelled", "cancelled_at": gone.isoformat()}
                events.append(_event("order.cancelled", order_id, customer["id"], gone, data))
        per_customer.append(events)
    ordered: list[dict[str, Any]] = []
    rounds = max(len(e) for e in per_customer)
    for r in range(rounds):
        batch = [events[r] for events in per_customer if r < len(events)]
        rng.shuffle(batch)
        ordered.extend(batch)
    ordered = ordered[:n_events]
    messages = []
    for raw in ordered:
        event = parse_event(raw)
        messages.append(
            Message(
                topic_for(event.type),
                event.key,
                event.to_bytes(),
                {"ce_id": event.id, "ce_type": event.type},
            )
        )
    return Stream(messages, ordered)


def _event(
    type_: str, order_id: str, customer_id: str, at: datetime, data: dict[str, Any]
) -> dict[str, Any]:
    if type_ == "order.created":
        data = {**data, "status": "created"}
    return {
        "specversion": "1.0",
        "id": f"{type_}:{order_id}",
        "source": f"bench/{SHOP}",
        "type": type_,
        "time": at.isoformat(),
        "shop_id": SHOP,
        "subject": customer_id,
        "schema_version": 1,
        "data": data,
    }


async def prefill(settings: Settings, messages: list[Message], chunk: int = 5000) -> float:
    """Publish the stream to the orders topic of `settings`' bus; returns messages/s."""
    bus = create_bus(settings)
    await bus.start()
    namespace = settings.topic_namespace
    await bus.ensure_topics([topic_name(t, namespace) for t in ("orders", "behavior", "logistics")])
    started = time.perf_counter()
    try:
        for i in range(0, len(messages), chunk):
            await bus.publish(
                [
                    Message(namespace + m.topic, m.key, m.value, m.headers)
                    for m in messages[i : i + chunk]
                ]
            )
    finally:
        await bus.stop()
    return len(messages) / (time.perf_counter() - started)


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile from cumulative (upper bound, count) buckets."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            span = count - below
            return lower + (bound - lower) * ((rank - below) / span if span else 1)
        lower, below = bound, count
    return None


async def batch_quantiles(client: httpx.AsyncClient, url: str) -> tuple[float | None, ...]:
    r = await client.get(f"{url}/metrics")
    buckets = [
        (float(labels["le"]), value)
        for name, labels, value in infra.parse_metrics(r.text)
        if name == BATCH_SECONDS and labels.get("group") == GROUP
    ]
    return tuple(
        (q * 1000 if q is not None else None)
        for q in (histogram_quantile(buckets, 0.5), histogram_quantile(buckets, 0.99))
    )


async def _drain(run: Run, processes: list[infra.Huitou], total: int) -> dict[str, Any]:
    """Watch the committed counters (summed over the group's members) until the whole
    topic is applied; the rate between START_FRACTION and 100 %."""
    process = processes[0]
    mark: tuple[float, float] | None = None
    last_change = time.monotonic()
    seen = -1.0
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            counts = [
                await infra.metric_sum(client, p.url, CONSUMED, group=GROUP) for p in processes
            ]
            consumed = sum(counts)
            now = time.perf_counter()
            if mark is None and consumed >= START_FRACTION * total:
                mark = (now, consumed)
            if consumed >= total:
                break
            if consumed != seen:
                seen, last_change = consumed, time.monotonic()
            elif time.monotonic() - last_change > 120:
                raise TimeoutError(f"lifecycle stuck at {consumed:.0f}/{total} events")
            await asyncio.sleep(0.1)
        p50, p99 = await batch_quantiles(client, process.url)
        relayed = sum(
            [await infra.metric_sum(client, p.url, OUTBOX, service=GROUP) for p in processes]
        )
    assert mark is not None
    elapsed = now - mark[0]
    rate = (consumed - mark[1]) / elapsed if elapsed > 0 else float("nan")
    return {
        "rate": rate,
        "batch_p50_ms": p50,
        "batch_p99_ms": p99,
        "rss_mb": max(mb(p.rss()) for p in processes),
        "outbox_relayed": relayed,
        "per_member": counts,
    }


async def _table_counts(url: str, tables: list[str]) -> dict[str, int]:
    db = Database(url, "lifecycle")
    counts = {}
    try:
        async with db.connect() as conn:
            for table in tables:
                try:
                    counts[table] = int(
                        (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
                    )
                except Exception:
                    continue
    finally:
        await db.dispose()
    return counts


async def _ours_once(
    run: Run, stack: Stack, stream: Stream, *, profile: bool, members: int = 1
) -> dict[str, Any]:
    """Start lifecycle (`members` processes of its consumer group) on an empty topic, then
    fill the topic far faster than it is consumed (so the consumer always has a backlog, as
    from a pre-filled topic) and time the consumption between START_FRACTION and the end."""
    data = stack.dir("lifecycle")
    namespace = stack.namespace() if not stack.embedded else ""
    database = await stack.database()
    env = stack.env(data, database, namespace)
    settings = stack.bus_settings(data, namespace)
    name = "platform" if stack.embedded else "lifecycle"
    processes = [infra.Huitou(name, env, data) for _ in range(members)]
    for process in processes:
        process.spawn()
    try:
        for process in processes:
            await process.wait_ready()
        if members > 1:
            await _assigned(processes, topic_name("orders", namespace))
        async with contextlib.AsyncExitStack() as profiling:
            if profile:
                await profiling.enter_async_context(
                    run.profile(f"lifecycle-{stack.mode}", processes[0].pid)
                )
            fill = await prefill(settings, stream.messages)
            result = await _drain(run, processes, len(stream.messages))
        result["fill_rate"] = fill
    finally:
        for process in processes:
            process.stop()
    url = database or Settings(data_dir=data).database_url_for("lifecycle")
    result["rows"] = await _table_counts(url, lifecycle_raw.COUNTED_TABLES)
    result["rows"]["outbox"] = int(result["outbox_relayed"]) + result["rows"].get("outbox", 0)
    return result


async def _assigned(processes: list[infra.Huitou], topic: str, within: float = 120) -> None:
    """Until the group's rebalances are over: every member holds partitions of `topic`
    and together they hold each of them once (from their lag series, which a member
    reports for exactly the partitions it has). Measured before that, the joins of the
    later members stopped the consumption for seconds at a time."""
    partitions = Settings().topic_partitions
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            held = []
            for process in processes:
                r = await client.get(f"{process.url}/metrics")
                held.append(
                    {
                        labels.get("partition")
                        for name, labels, _ in infra.parse_metrics(r.text)
                        if name == "huitou_consumer_lag"
                        and labels.get("group") == GROUP
                        and labels.get("topic") == topic
                    }
                )
            union = set().union(*held)
            if all(held) and len(union) == partitions == sum(len(h) for h in held):
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the {len(processes)} members never settled on {topic}")


def _add_run(
    run: Run, stack: Stack, path: str, result: dict[str, Any], note: str, **extra: Any
) -> None:
    """The row of one measured run of `_ours_once` (no raw limit beside it)."""
    if math.isnan(result["rate"]):
        run.note(f"{path} [{stack.mode}]: the topic drained between two polls; no rate")
        return
    run.add(
        Measurement(
            path=path,
            mode=stack.mode,
            unit="ev/s",
            ours=Stat([result["rate"]]),
            p50_ms=result["batch_p50_ms"],
            p99_ms=result["batch_p99_ms"],
            rss_mb=result["rss_mb"],
            note=note,
            extra=extra,
        )
    )


async def _history(run: Run, stack: Stack) -> None:
    """Events/s as order history grows: the same number of events over customers with 1,
    10 and 100 orders each (one run each; the rate should not fall with history)."""
    events = min(run.size.lifecycle_events, run.size.lifecycle_history_events)
    for orders in HISTORY_DEPTHS:
        customers = max(1, events // (2 * orders))
        stream = await asyncio.to_thread(order_events, events, customers)
        result = await _ours_once(run, stack, stream, profile=False)
        _add_run(
            run,
            stack,
            f"lifecycle.history_{orders}",
            result,
            f"{events:,} events over {customers:,} customers, {orders} "
            f"order{'s' if orders > 1 else ''} each (created + paid/cancelled); "
            "p50/p99 per consumed batch",
        )


async def _members(run: Run, stack: Stack, stream: Stream) -> None:
    """Distributed: 1, 2 and 4 lifecycle processes in one consumer group on the same
    topic of `topic_partitions` partitions (one run each)."""
    partitions = Settings().topic_partitions
    for members in SCALE_MEMBERS:
        result = await _ours_once(run, stack, stream, profile=False, members=members)
        _add_run(
            run,
            stack,
            f"lifecycle.members_{members}",
            result,
            f"{members} process{'es' if members > 1 else ''} of the group on "
            f"{partitions} partitions; events per member "
            f"{[round(c) for c in result['per_member']]}",
            per_member=result["per_member"],
            partitions=partitions,
        )


async def measure(run: Run, stack: Stack) -> None:
    size = run.size
    run.log(f"generating {size.lifecycle_events:,} order events")
    stream = await asyncio.to_thread(order_events, size.lifecycle_events, size.lifecycle_customers)
    ours = Stat()
    raw = Stat()
    p50: list[float | None] = []
    p99: list[float | None] = []
    rss: list[float] = []
    methods: dict[str, list[float]] = {}
    rows: dict[str, int] = {}
    if run.profiler is not None:
        await _ours_once(run, stack, stream, profile=True)
    for _ in range(size.repeats):
        result = await _ours_once(run, stack, stream, profile=False)
        if math.isnan(result["rate"]):
            run.note(f"lifecycle {stack.mode}: the topic drained between two polls; no rate")
            continue
        ours.add(result["rate"])
        p50.append(result["batch_p50_ms"])
        p99.append(result["batch_p99_ms"])
        rss.append(result["rss_mb"])
        rows = result["rows"]
        best = await lifecycle_raw.measure(stack, stream.events, rows)
        for method, value in best.items():
            methods.setdefault(method, []).append(value)
        raw.add(max(best.values()))
    run.details.setdefault("lifecycle", {})[stack.mode] = {
        "raw_methods_events_per_s": methods,
        "rows_written_by_lifecycle": rows,
    }
    best_method = max(methods, key=lambda m: sorted(methods[m])[len(methods[m]) // 2])
    run.add(
        Measurement(
            path="lifecycle.apply",
            mode=stack.mode,
            unit="ev/s",
            ours=ours,
            raw=raw,
            raw_label=f"same rows in batches, no logic (best: {best_method})",
            p50_ms=median_or_none(p50),
            p99_ms=median_or_none(p99),
            rss_mb=max(rss) if rss else None,
            note=(
                f"{size.lifecycle_events:,} events / {size.lifecycle_customers:,} customers; "
                "p50/p99 per consumed batch"
            ),
        )
    )
    await _history(run, stack)
    if not stack.embedded:
        await _members(run, stack, stream)

"""The notifier (`services/notifier`): sends per second through the outbox provider and
through a Twilio stand-in, and its memory with marketing messages deferred by quiet hours.

The notifier runs as a user runs it (`huitou up` embedded, `huitou serve notifier`
distributed, on a fresh database); templates, channels and policies are set through its
API with the admin key. One shop per repeat, so every figure counts its own messages.

1. `notifier.outbox`: `messages` transactional `notification.requested` events are taken
   in by the notifier's own intake (`intake.accept`, called here in batches of 500 on the
   notifier's database, as its consumer calls it) with their `notify.send` timers parked
   a month out; then the timers are made due at once. The rate runs from the first batch
   claimed (its `sending` history row, written by the notifier) to when the bench sees
   the last message `sent` (polled every 50 ms). The raw limit, with the notifier
   stopped, is the same database's bare loop claiming 500 due timers and setting their
   messages `sent` per transaction (no history, no outbox, no per-message transaction).
2. `notifier.provider`: the same with the shop's SMS channel on `twilio`, pointing at
   `bench.provider_server` (answers `201` like Twilio's Messages API), the policy's
   Twilio bucket at its maximum (10,000/s, burst 100,000) so the rate limit stays out of
   the way. Checked: the server answered exactly one POST per message. p50/p99: the
   notifier's provider-call histogram. The raw limit is an httpx `AsyncClient` with the
   adapter's own settings, 64 POSTs in flight (the sender's concurrency), the same form
   body, against the same server in the same run.
3. `notifier.deferred_rss`: on the freshly started process, `deferred` marketing requests
   (customers with consent, quiet hours covering now) published onto the bus in
   `memory_checkpoints` chunks; after each chunk is taken in (every message `deferred`,
   its timer waiting for the end of the quiet hours) the process's RSS is read, and it is
   sampled every 0.2 s meanwhile for the peak. The deferred messages stay there while
   rows 1 and 2 run.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bench import infra
from bench.core import Measurement, Run, Stack, mb
from bench.http1 import Pool
from bench.paths.lifecycle import histogram_quantile
from bench.stats import Stat, percentile
from libs.common.bus import Message, create_bus
from libs.common.db import Database
from libs.common.db.tables import timers
from libs.common.events import Envelope, NotificationRequestedData, new_event, topic_for
from libs.common.events import topic_name as full_topic
from libs.common.settings import Settings
from services.notifier.intake import SEND_TIMER, accept
from services.notifier.models import consents, history, messages

BATCH = 500
CONCURRENCY = 64
"""The sender's calls in flight (`Sending(concurrency=64)`)."""
TEMPLATE = "bench_notice"
PROMOTION = "bench_promo"
PHONE = "+8613800138000"
TWILIO = {
    "account_sid": "AC" + "0123456789abcdef" * 2,
    "auth_token": "bench" + "0" * 27,
    "from": "+15005550006",
}
TWILIO_TIMEOUT_S = 10.0
"""`services.notifier.providers.twilio.TIMEOUT_S`: the raw client is built like the adapter's."""
CALL_SECONDS = "huitou_notifier_provider_call_seconds_bucket"
STALL_S = 120.0
"""A phase whose count has not moved for this long has failed."""


@dataclass(frozen=True)
class Sizes:
    messages: int
    """Messages per repeat through the outbox provider (ours and raw)."""
    provider: int
    """Messages per repeat through the Twilio stand-in (ours and raw)."""
    deferred: int
    """Marketing messages deferred by quiet hours, for the memory row."""


SIZES = {
    "smoke": Sizes(messages=150, provider=50, deferred=400),
    "quick": Sizes(messages=2_000, provider=1_000, deferred=10_000),
    "full": Sizes(messages=20_000, provider=5_000, deferred=100_000),
}


@dataclass
class Notifier:
    """The running notifier and what the bench needs to reach it."""

    process: infra.Huitou
    db: Database
    namespace: str
    settings: Settings
    """The bus settings of the process (to publish onto its topics)."""


async def measure(run: Run, stack: Stack) -> None:
    sizes = SIZES[run.size.name]
    run.details.setdefault("notifier_sizes", sizes.__dict__)
    data = stack.dir("notifier")
    namespace = stack.namespace() if not stack.embedded else ""
    database = await stack.database()
    env = stack.env(data, database, namespace)
    settings = stack.bus_settings(data, namespace)
    process = infra.Huitou("platform" if stack.embedded else "notifier", env, data)
    server_port = infra.free_port()
    server = infra.spawn(
        [sys.executable, "-m", "bench.provider_server", "--port", str(server_port)],
        log=data / "provider_server.log",
        cwd=infra.ROOT,
    )
    server_url = f"http://127.0.0.1:{server_port}"
    url = database or settings.database_url_for("notifier")
    db = Database(url, "notifier")
    try:
        infra.wait_for_port(server_port)
        process.spawn()
        await process.wait_ready()
        notifier = Notifier(process, db, namespace, settings)
        async with httpx.AsyncClient(
            base_url=process.url,
            timeout=60,
            headers={"Authorization": f"Bearer {infra.ADMIN_KEY}"},
        ) as api:
            for repeat in range(run.size.repeats):
                await _configure(api, f"bench-ntf-raw{repeat}")  # for after the stop
            deferred = await _deferred(run, stack.mode, notifier, api, sizes.deferred)
            async with run.profile(f"notifier-{stack.mode}", process.pid):
                ours_outbox = await _outbox(run, notifier, api, sizes.messages)
            provider = await _provider(run, stack.mode, notifier, api, server_url, sizes.provider)
        process.stop()
        raw_outbox = await _raw_outbox(run, notifier, sizes.messages)
        outbox = Measurement(
            path="notifier.outbox",
            mode=stack.mode,
            unit="msg/s",
            ours=ours_outbox["rate"],
            raw=raw_outbox,
            raw_label="claim-and-update loop, 500 per transaction, same database",
            rss_mb=ours_outbox["rss_mb"],
            note=(
                f"{sizes.messages:,} queued messages with due notify.send timers → all "
                f"sent (outbox provider), first claim to last sent; "
                f"{sizes.deferred:,} deferred ones waiting meanwhile; "
                f"release to all sent: {ours_outbox['wall']} msg/s"
            ),
            extra={"release_to_all_sent_per_s": ours_outbox["wall"]},
        )
        for row in (outbox, provider, deferred):
            run.add(row)
    finally:
        process.stop()
        infra.stop_process(server)
        await db.dispose()


# --- Setting the shops up through the API ---------------------------------------------------


def _quiet_hours_now() -> dict[str, Any]:
    """Quiet hours for marketing from an hour ago to four hours ahead (UTC: the bench's
    shops have no timezone of their own in the notifier, which then uses UTC)."""
    now = datetime.now(UTC)
    start = (now - timedelta(hours=1)).strftime("%H:%M")
    end = (now + timedelta(hours=4)).strftime("%H:%M")
    return {"start": start, "end": end, "categories": ["marketing"]}


async def _configure(
    api: httpx.AsyncClient, shop: str, *, twilio: dict[str, str] | None = None
) -> None:
    params = {"shop_id": shop}
    for name, text in (
        (TEMPLATE, "{{ shop.name }}：您的订单{{ order.id }}已发货，请留意查收。"),
        (PROMOTION, "{{ shop.name }}：{{ promotion.name }}今晚开场，老客专享券已到账。"),
    ):
        body = {"name": name, "channel": "sms", "locales": {"zh-CN": {"text": text}}}
        _check(await api.post("/v1/templates", params=params, json=body))
    policy = {
        "quiet_hours": _quiet_hours_now(),
        "rate_limits": {"twilio": {"per_second": 10_000, "burst": 100_000}},
    }
    _check(await api.put("/v1/notifier/policy", params=params, json=policy))
    if twilio is not None:
        channel = {"provider": "twilio", "settings": twilio}
        _check(await api.put("/v1/channels/sms", params=params, json=channel))


def _check(response: httpx.Response) -> None:
    if response.status_code >= 300:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:500]}"
        )


# --- Requests, messages, counts -------------------------------------------------------------


def _request(shop: str, n: int, prefix: str, *, marketing: bool = False) -> Envelope:
    fields: dict[str, Any] = {
        "idempotency_key": f"{prefix}-{n}",
        "channel": "sms",
        "customer_id": f"c-{prefix}-{n}",
        "template": PROMOTION if marketing else TEMPLATE,
        "to": PHONE,
        "variables": {
            "shop": {"name": "回头小店"},
            "order": {"id": f"E2026{n:08d}"},
            "promotion": {"name": "双11大促"},
        },
    }
    if marketing:
        fields["category"] = "marketing"
    return new_event(
        type="notification.requested",
        shop_id=shop,
        source="bench",
        data=NotificationRequestedData.model_validate(fields),
        subject=fields["customer_id"],
        id=f"req-{prefix}-{n}",
    )


async def _count(db: Database, shop: str, status: str) -> int:
    m = messages.c
    async with db.connect() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count())
                    .select_from(messages)
                    .where(m.shop_id == shop, m.status == status)
                )
            ).scalar_one()
        )


async def _until(
    db: Database, shop: str, status: str, total: int, what: str, every: float = 0.1
) -> None:
    """Until `total` messages of the shop have `status` (no progress for STALL_S: fail)."""
    seen, moved = -1, time.monotonic()
    while True:
        done = await _count(db, shop, status)
        if done >= total:
            return
        if done != seen:
            seen, moved = done, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            raise TimeoutError(f"{what}: stuck at {done:,} of {total:,} {status}")
        await asyncio.sleep(every)


async def _queue(notifier: Notifier, shop: str, prefix: str, count: int) -> datetime:
    """`count` transactional messages `queued` through the notifier's intake, their send
    timers parked a month out (returned: when to); `_release` makes them due."""
    parked = datetime.now(UTC) + timedelta(days=30)
    t = timers.c
    for i in range(0, count, BATCH):
        events = [_request(shop, n, prefix) for n in range(i, min(count, i + BATCH))]
        now = datetime.now(UTC)
        async with notifier.db.begin() as conn:
            await accept(
                conn, events, namespace=notifier.namespace, now=now, public_base="http://bench"
            )
            await conn.execute(
                update(timers)
                .where(t.shop_id == shop, t.kind == SEND_TIMER, t.due_at <= parked - timedelta(1))
                .values(due_at=parked)
            )
    queued = await _count(notifier.db, shop, "queued")
    if queued != count:
        raise RuntimeError(f"intake queued {queued:,} of {count:,} messages (shop {shop})")
    return parked


async def _release(conn: AsyncConnection, shop: str, parked: datetime) -> None:
    t = timers.c
    await conn.execute(
        update(timers)
        .where(t.shop_id == shop, t.kind == SEND_TIMER, t.due_at >= parked)
        .values(due_at=datetime.now(UTC) - timedelta(seconds=1))
    )


async def _drain(notifier: Notifier, shop: str, count: int, parked: datetime) -> dict[str, Any]:
    """Make the shop's parked sends due; wait until every message is sent. The rate runs
    from the first batch claimed (its `sending` history row, written by the notifier) to
    when the bench sees the last message `sent` (polled every 50 ms; a row's `updated_at`
    would not do: `finish` stamps it before its transaction waits for the database)."""
    async with notifier.db.begin() as conn:
        await _release(conn, shop, parked)
    released = time.perf_counter()
    async with _peak_rss(notifier.process) as peak:
        await _until(notifier.db, shop, "sent", count, f"sending {shop}", every=0.05)
    done_at = datetime.now(UTC)
    wall = count / (time.perf_counter() - released)
    h, m = history.c, messages.c
    async with notifier.db.connect() as conn:
        first = (
            await conn.execute(
                select(func.min(h.at)).where(h.shop_id == shop, h.status == "sending")
            )
        ).scalar_one()
        attempts = (
            await conn.execute(select(func.sum(m.attempts)).where(m.shop_id == shop))
        ).scalar_one()
    span = (done_at - first).total_seconds()
    return {
        "rate": count / span if span > 0 else float("nan"),
        "wall": round(wall, 1),
        "attempts": int(attempts),
        "rss_mb": peak[0],
    }


# --- 1. Through the outbox provider ---------------------------------------------------------


async def _outbox(
    run: Run, notifier: Notifier, api: httpx.AsyncClient, count: int
) -> dict[str, Any]:
    rate, walls, rss = Stat(), list[float](), list[float]()
    for repeat in range(run.size.repeats):
        shop = f"bench-ntf-o{repeat}"
        await _configure(api, shop)
        parked = await _queue(notifier, shop, f"o{repeat}", count)
        run.log(f"  outbox repeat {repeat}: {count:,} queued")
        result = await _drain(notifier, shop, count, parked)
        if result["attempts"] != count:
            run.note(f"notifier.outbox: {result['attempts']:,} attempts for {count:,} messages")
        rate.add(result["rate"])
        walls.append(result["wall"])
        rss.append(result["rss_mb"])
        run.log(f"  outbox repeat {repeat}: {result['rate']:,.0f} msg/s")
    return {"rate": rate, "wall": walls, "rss_mb": max(rss)}


async def _raw_outbox(run: Run, notifier: Notifier, count: int) -> Stat:
    """The bare claim-and-update loop on the notifier's database (the notifier stopped)."""
    raw = Stat()
    postgres = notifier.db.is_postgres
    claim = (
        "DELETE FROM timers WHERE key IN (SELECT key FROM timers WHERE due_at <= {now} "
        "ORDER BY due_at LIMIT 500{lock}) RETURNING shop_id, payload"
    ).format(now="$1" if postgres else "?", lock=" FOR UPDATE SKIP LOCKED" if postgres else "")
    mark = (
        "UPDATE notifier_messages SET status = 'sent', attempts = attempts + 1, "
        "updated_at = {now} WHERE shop_id = {shop} AND message_id {ids}"
    ).format(
        now="$1" if postgres else "?",
        shop="$2" if postgres else "?",
        ids="= ANY($3::varchar[])" if postgres else "IN (SELECT value FROM json_each(?))",
    )
    for repeat in range(run.size.repeats):
        shop = f"bench-ntf-raw{repeat}"
        parked = await _queue(notifier, shop, f"raw{repeat}", count)
        async with notifier.db.begin() as conn:
            await _release(conn, shop, parked)
        done = 0
        started = time.perf_counter()
        while done < count:
            async with notifier.db.begin() as conn:
                now: Any = datetime.now(UTC)
                if not postgres:
                    now = now.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
                rows: list[Any] = list(await conn.exec_driver_sql(claim, (now,)))
                if not rows:
                    break
                ids = [orjson.loads(row[1])["m"] for row in rows]
                await conn.exec_driver_sql(
                    mark, (now, rows[0][0], ids if postgres else orjson.dumps(ids).decode())
                )
            done += len(rows)
        raw.add(done / (time.perf_counter() - started))
        sent = await _count(notifier.db, shop, "sent")
        if sent != count:
            raise RuntimeError(f"raw loop: {sent:,} of {count:,} set sent")
    return raw


# --- 2. Through a Twilio stand-in -----------------------------------------------------------


async def _posts(server_url: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{server_url}/stats")
        r.raise_for_status()
        return int(r.json()["posts"])


async def _call_buckets(process: infra.Huitou) -> dict[float, float]:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{process.url}/metrics")
        r.raise_for_status()
    return {
        float(labels["le"]): value
        for name, labels, value in infra.parse_metrics(r.text)
        if name == CALL_SECONDS and labels.get("provider") == "twilio"
    }


async def _provider(
    run: Run,
    mode: str,
    notifier: Notifier,
    api: httpx.AsyncClient,
    server_url: str,
    count: int,
) -> Measurement:
    twilio = {**TWILIO, "endpoint": server_url}
    ours, raw = Stat(), Stat()
    rss: list[float] = []
    raw_latency: list[float] = []
    posts_per_repeat: list[int] = []
    before = await _call_buckets(notifier.process)
    body = ""
    for repeat in range(run.size.repeats):
        shop = f"bench-ntf-t{repeat}"
        await _configure(api, shop, twilio=twilio)
        parked = await _queue(notifier, shop, f"t{repeat}", count)
        posted = await _posts(server_url)
        result = await _drain(notifier, shop, count, parked)
        posts_per_repeat.append(await _posts(server_url) - posted)
        ours.add(result["rate"])
        rss.append(result["rss_mb"])
        run.log(f"  provider repeat {repeat}: {result['rate']:,.0f} msg/s")
        if not body:
            body = await _a_body(notifier.db, shop)
        callback = f"{notifier.process.url}/v1/callbacks/twilio/{shop}"
        rate, latencies = await _raw_posts(twilio, count, body, callback)
        raw.add(rate)
        raw_latency.extend(latencies)
    after = await _call_buckets(notifier.process)
    buckets = [(le, after[le] - before.get(le, 0.0)) for le in after]
    p50, p99 = (histogram_quantile(buckets, q) for q in (0.5, 0.99))
    ceiling = await _server_ceiling(server_url, body, 0.5 if run.size.name == "smoke" else 2.0)
    if any(p != count for p in posts_per_repeat):
        run.note(f"notifier.provider [{mode}]: POSTs per run {posts_per_repeat}, not {count}")
    return Measurement(
        path="notifier.provider",
        mode=mode,
        unit="msg/s",
        ours=ours,
        raw=raw,
        raw_label=f"httpx AsyncClient (the adapter's settings), {CONCURRENCY} in flight",
        p50_ms=p50 * 1000 if p50 is not None else None,
        p99_ms=p99 * 1000 if p99 is not None else None,
        rss_mb=max(rss),
        note=(
            f"{count:,} queued → sent through twilio at a local stand-in, first claim to "
            f"last sent; POSTs answered per run {posts_per_repeat} (one per message); "
            f"p50/p99: provider call; raw httpx p50/p99 "
            f"{_ms(percentile(raw_latency, 50))}/{_ms(percentile(raw_latency, 99))} ms; "
            f"the stand-in answers {ceiling:,.0f} POSTs/s to a minimal client"
        ),
        extra={
            "posts_per_repeat": posts_per_repeat,
            "raw_p50_ms": percentile(raw_latency, 50),
            "raw_p99_ms": percentile(raw_latency, 99),
            "server_ceiling_per_s": ceiling,
        },
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f}"


async def _a_body(db: Database, shop: str) -> str:
    async with db.connect() as conn:
        text = (
            await conn.execute(select(messages.c.body).where(messages.c.shop_id == shop).limit(1))
        ).scalar_one()
    return str(text)


async def _raw_posts(
    twilio: dict[str, str], count: int, body: str, callback: str
) -> tuple[float, list[float]]:
    """`count` sends' POSTs with the adapter's form and client settings, 64 in flight."""
    url = f"{twilio['endpoint']}/2010-04-01/Accounts/{twilio['account_sid']}/Messages.json"
    auth = httpx.BasicAuth(twilio["account_sid"], twilio["auth_token"])
    form = {"To": PHONE, "From": twilio["from"], "Body": body, "StatusCallback": callback}
    left = iter(range(count))
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=TWILIO_TIMEOUT_S) as client:

        async def sender() -> None:
            for _ in left:
                started = time.perf_counter()
                r = await client.post(
                    url, data=form, auth=auth, headers={"Accept": "application/json"}
                )
                if r.status_code != 201 or not r.json().get("sid"):
                    raise RuntimeError(f"the stand-in answered {r.status_code}: {r.text[:200]}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    return count / elapsed, latencies


async def _server_ceiling(server_url: str, body: str, seconds: float) -> float:
    """POSTs per second the stand-in answers to `bench.http1`'s minimal client."""
    host, port = server_url.split("://", 1)[1].rsplit(":", 1)
    pool = Pool(host, int(port), CONCURRENCY)
    path = f"/2010-04-01/Accounts/{TWILIO['account_sid']}/Messages.json"
    form = httpx.QueryParams({"To": PHONE, "From": TWILIO["from"], "Body": body})
    raw = pool.build(
        "POST", path, {"Content-Type": "application/x-www-form-urlencoded"}, str(form).encode()
    )
    done = 0
    deadline = time.perf_counter() + seconds

    async def sender() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            status, _ = await pool.request(raw)
            if status != 201:
                raise RuntimeError(f"the stand-in answered {status}")
            done += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
    finally:
        await pool.close()
    return done / (time.perf_counter() - started)


# --- 3. Memory with deferred messages -------------------------------------------------------


@contextlib.asynccontextmanager
async def _peak_rss(process: infra.Huitou) -> AsyncIterator[list[float]]:
    """The process's RSS sampled every 0.2 s while the block runs ([peak] in MB)."""
    peak = [mb(process.rss())]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], mb(process.rss()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    task = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        stop.set()
        await task
        peak[0] = max(peak[0], mb(process.rss()))


async def _consent(db: Database, shop: str, prefix: str, count: int) -> None:
    now = datetime.now(UTC)
    for i in range(0, count, 5_000):
        async with db.begin() as conn:
            await conn.execute(
                insert(consents),
                [
                    {
                        "shop_id": shop,
                        "customer_id": f"c-{prefix}-{n}",
                        "sms": True,
                        "email": None,
                        "updated_at": now,
                    }
                    for n in range(i, min(count, i + 5_000))
                ],
            )


async def _publish(settings: Settings, items: list[Message]) -> None:
    bus = create_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics([full_topic("notifications.requested", settings.topic_namespace)])
        for i in range(0, len(items), 5_000):
            await bus.publish(items[i : i + 5_000])
    finally:
        await bus.stop()


async def _deferred(
    run: Run, mode: str, notifier: Notifier, api: httpx.AsyncClient, count: int
) -> Measurement:
    shop, prefix = "bench-ntf-quiet", "q"
    await _configure(api, shop)
    await _consent(notifier.db, shop, prefix, count)
    topic = topic_for("notification.requested", notifier.namespace)
    chunks = max(1, run.size.memory_checkpoints)
    step = -(-count // chunks)
    process = notifier.process
    checkpoints: list[dict[str, float]] = [
        {"deferred": 0, "rss_mb": round(mb(process.rss()), 1), "seconds": 0.0}
    ]
    fed = 0
    started = time.perf_counter()
    async with _peak_rss(process) as peak:
        while fed < count:
            size = min(step, count - fed)
            items = []
            for n in range(fed, fed + size):
                event = _request(shop, n, prefix, marketing=True)
                items.append(
                    Message(
                        topic,
                        event.key,
                        event.to_bytes(),
                        {"ce_id": event.id, "ce_type": event.type},
                    )
                )
            await _publish(notifier.settings, items)
            fed += size
            await _until(notifier.db, shop, "deferred", fed, "deferring marketing requests")
            checkpoints.append(
                {
                    "deferred": fed,
                    "rss_mb": round(mb(process.rss()), 1),
                    "seconds": round(time.perf_counter() - started, 2),
                }
            )
            run.log(f"  {fed:,} deferred: RSS {checkpoints[-1]['rss_mb']} MB")
    others = await _count(notifier.db, shop, "queued") + await _count(notifier.db, shop, "sent")
    if others:
        run.note(f"notifier.deferred_rss [{mode}]: {others} marketing messages not deferred")
    first, last = checkpoints[0], checkpoints[-1]
    grew = last["rss_mb"] - first["rss_mb"]
    # The slope leaves the first chunk out, as the memory rows do: it warms the process up
    # (templates compiled, connections opened, the consumer's buffers), whatever its size.
    base = checkpoints[1] if len(checkpoints) > 2 else first
    added = (last["deferred"] - base["deferred"]) / 10_000
    slope = (last["rss_mb"] - base["rss_mb"]) / added if added else 0.0
    # The intake rate likewise (the first chunk also waits for the consumer's first fetch).
    took = last["seconds"] - base["seconds"]
    intake = (last["deferred"] - base["deferred"]) / took if took > 0 else float("nan")
    run.details.setdefault("notifier", {})[mode] = {"deferred_checkpoints": checkpoints}
    path = " → ".join(f"{c['rss_mb']:.0f}" for c in checkpoints)
    run.log(f"  deferred: peak RSS {peak[0]:.1f} MB")
    return Measurement(
        path="notifier.deferred_rss",
        mode=mode,
        unit="MB",
        ours=Stat([peak[0]]),
        rss_mb=peak[0],
        note=(
            f"peak RSS with 0 → {count:,} marketing messages deferred by quiet hours: "
            f"{path} MB at the checkpoints ({grew:+.1f} MB; {slope:+.2f} MB per 10,000 more "
            f"deferred after the first chunk); published and taken in at {intake:,.0f}/s "
            f"after the first chunk"
        ),
        extra={
            "checkpoints": checkpoints,
            "mb_per_10k_deferred": slope,
            "intake_per_s": intake,
        },
        higher_is_better=False,
    )

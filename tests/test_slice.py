"""The foundation's slice, end to end through real processes, in both modes:
POST /v1/events on ingest → bus → lifecycle → GET /v1/customers/{id}."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from sqlalchemy import func, select, text

from libs.common.bus import create_bus
from libs.common.db import Database
from libs.common.db.tables import processed_events
from libs.common.events import Envelope, decode_event, parse_event
from services.ingest.handlers import to_message
from tests.platform import Platform, processed, until

GROUP = "lifecycle"
"""Lifecycle's consumer group, and the consumer its inbox records events under."""
LIFECYCLE_IN = ("orders", "behavior", "logistics")

CANONICAL: dict[str, Any] = {
    "specversion": "1.0",
    "id": "shopify-evt-7f3c",
    "source": "shopify/acme-tea",
    "type": "order.created",
    "time": "2026-11-11T00:00:05Z",
    "shop_id": "acme-tea",
    "subject": "cust-42",
    "schema_version": 1,
    "data": {
        "order_id": "1001",
        "customer": {
            "id": "cust-42",
            "name": "王芳",
            "phone": "+8613800138000",
            "email": "fang@example.com",
        },
        "status": "created",
        "total": {"amount_minor": 25900, "currency": "CNY"},
        "items": [
            {
                "sku": "LJ-250",
                "title": "龙井 250g",
                "quantity": 1,
                "price": {"amount_minor": 25900, "currency": "CNY"},
            }
        ],
        "shipping": {"country": "CN", "province": "浙江省", "city": "杭州市", "district": "西湖区"},
        "created_at": "2026-11-11T00:00:05Z",
    },
}


def order_event(
    shop: str,
    customer: str,
    order: str,
    type_: str = "order.created",
    amount: int = 25900,
    event_id: str | None = None,
) -> dict[str, Any]:
    event = copy.deepcopy(CANONICAL)
    status = type_.split(".", 1)[1]
    event.update(
        id=event_id or f"{order}-{type_}",
        shop_id=shop,
        subject=customer,
        type=type_,
        source=f"test/{shop}",
    )
    event["data"].update(
        order_id=order, status=status, total={"amount_minor": amount, "currency": "CNY"}
    )
    event["data"]["customer"]["id"] = customer
    if status == "paid":
        event["data"]["paid_at"] = "2026-11-11T00:03:10Z"
    return event


def shop_name() -> str:
    return f"shop-{uuid.uuid4().hex[:8]}"


async def customer(platform: Platform, key: str, customer_id: str) -> dict[str, Any] | None:
    r = await platform.request("GET", f"/v1/customers/{customer_id}", key=key)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def refund_event(
    shop: str, customer: str, order: str, total: int, refund: int, n: int
) -> dict[str, Any]:
    """The `n`th partial refund of `refund` on an order of `total`."""
    event = order_event(shop, customer, order, "order.refunded", amount=total)
    event["id"] = f"{order}-refund-{n}"
    event["data"]["refund"] = {"amount_minor": refund, "currency": "CNY"}
    event["data"]["refunded_at"] = "2026-11-12T00:00:00Z"
    return event


async def marked_customer(
    platform: Platform, key: str, shop: str, customer_id: str, marker_id: str = "marker"
) -> dict[str, Any]:
    """The customer once everything published for them so far is applied: a marker order
    `marker_id` (paid, 1 fen) on the same key, hence the same partition, comes after it."""
    marker = order_event(shop, customer_id, marker_id, "order.paid", amount=1)
    assert (await platform.request("POST", "/v1/events", key=key, json=marker)).status_code == 202
    found: dict[str, Any] = {}

    async def marker_applied() -> bool:
        c = await customer(platform, key, customer_id)
        if c is None or not any(o["order_id"] == marker_id for o in c["orders"]):
            return False
        found.update(c)
        return True

    await until(marker_applied)
    return found


async def test_canonical_order_becomes_a_customer_with_its_order(platform: Platform) -> None:
    key = await platform.create_shop("acme-tea")
    r = await platform.request("POST", "/v1/events", key=key, json=CANONICAL)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1, "duplicates": 0, "ids": ["shopify-evt-7f3c"]}

    async def visible() -> bool:
        return await customer(platform, key, "cust-42") is not None

    await until(visible)
    body = await customer(platform, key, "cust-42")
    assert body is not None
    assert body["shop_id"] == "acme-tea"
    assert body["customer_id"] == "cust-42"
    assert body["name"] == "王芳"
    assert body["tags"] == []
    assert body["member_level"] is None
    assert body["returning"] is False
    assert body["rfm"]["frequency"] == 0, "an unpaid order is no purchase"
    assert body["stage"] == "prospect" or body["stage"] == "interested"
    [order] = body["orders"]
    assert order["order_id"] == "1001"
    assert order["status"] == "created"
    assert order["total"] == {"amount_minor": 25900, "currency": "CNY"}
    assert order["created_at"] == "2026-11-11T00:00:05Z"

    paid = order_event("acme-tea", "cust-42", "1001", "order.paid")
    assert (await platform.request("POST", "/v1/events", key=key, json=paid)).status_code == 202

    async def purchased() -> bool:
        c = await customer(platform, key, "cust-42")
        return c is not None and c["rfm"]["frequency"] == 1

    await until(purchased)
    body = await customer(platform, key, "cust-42")
    assert body is not None
    assert body["rfm"]["monetary"] == {"amount_minor": 25900, "currency": "CNY"}
    assert body["rfm"]["first_order_at"] == "2026-11-11T00:00:05Z"
    assert body["orders"][0]["status"] == "paid"
    assert body["orders"][0]["paid_at"] == "2026-11-11T00:03:10Z"

    admin_view = await platform.request(
        "GET", "/v1/customers/cust-42", key=platform.admin_key, params={"shop_id": "acme-tea"}
    )
    assert admin_view.status_code == 200
    assert admin_view.json()["rfm"]["frequency"] == 1


async def test_a_duplicate_event_changes_nothing(platform: Platform) -> None:
    """A partial refund is the effect a repeat would show: refunds add up, so each
    application lowers `monetary` again (a paid order's upsert would hide the repeat)."""
    shop = shop_name()
    key = await platform.create_shop(shop)
    paid = order_event(shop, "c1", "o1", "order.paid", amount=1000)
    refund = refund_event(shop, "c1", "o1", total=1000, refund=300, n=1)

    async def post(events: list[dict[str, Any]]) -> tuple[int, int]:
        r = await platform.request("POST", "/v1/events", key=key, json=events)
        assert r.status_code == 202, r.text
        return r.json()["accepted"], r.json()["duplicates"]

    assert await post([paid, refund]) == (2, 0)
    for _ in range(3):
        assert await post([refund]) == (1, 1)
    assert await post([refund, refund]) == (2, 2)
    assert await post([paid, refund]) == (2, 2)
    body = await marked_customer(platform, key, shop, "c1")
    assert body["rfm"]["frequency"] == 2
    assert body["rfm"]["monetary"]["amount_minor"] == 1000 - 300 + 1, "the refund counted once"


async def test_a_duplicate_that_reaches_the_bus_is_applied_once(platform: Platform) -> None:
    """Ingest's ledger is not the only guard: a duplicate it never saw (a producer that
    published twice, a bus that delivers again) is dropped by the consumer's inbox, both
    within one batch and after the first copy's batch was applied."""
    shop = shop_name()
    key = await platform.create_shop(shop)
    paid = order_event(shop, "c1", "o1", "order.paid", amount=1000)
    assert (await platform.request("POST", "/v1/events", key=key, json=paid)).status_code == 202
    refund = to_message(
        parse_event(refund_event(shop, "c1", "o1", total=1000, refund=200, n=1)),
        platform.settings.topic_namespace,
    )
    bus = create_bus(platform.settings)
    await bus.start()
    try:
        await bus.publish([refund, refund])
        body = await marked_customer(platform, key, shop, "c1", "marker-1")
        assert body["rfm"]["monetary"]["amount_minor"] == 1000 - 200 + 1, "counted once"
        await bus.publish([refund])
        body = await marked_customer(platform, key, shop, "c1", "marker-2")
        assert body["rfm"]["monetary"]["amount_minor"] == 1000 - 200 + 2, "still once"
    finally:
        await bus.stop()
    assert body["rfm"]["frequency"] == 3


async def test_a_bad_event_gets_problem_json_and_nothing_of_the_request_is_stored(
    platform: Platform,
) -> None:
    shop = shop_name()
    key = await platform.create_shop(shop)
    good = order_event(shop, "c1", "o1", "order.paid", amount=500)
    bad = order_event(shop, "c1", "o2", "order.paid")
    bad["data"]["total"]["amount_minor"] = "lots"
    r = await platform.request("POST", "/v1/events", key=key, json=[good, bad])
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == 422
    assert {
        "field": "[1].data.total.amount_minor",
        "message": "Input should be a valid integer, unable to parse string as an integer",
    } in problem["errors"]

    for raw, status in [
        (b"{not json", 400),
        (b'{"id": "x"}', 422),
        (b"[]", 422),
    ]:
        r = await platform.request("POST", "/v1/events", key=key, content=raw)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
    huge = order_event(shop, "c1", "o3")
    huge["data"]["note"] = "x" * (1024 * 1024)
    r = await platform.request("POST", "/v1/events", key=key, json=huge)
    assert r.status_code == 413
    unknown_type = order_event(shop, "c1", "o4")
    unknown_type["type"] = "customer.stage_changed"
    assert (
        await platform.request("POST", "/v1/events", key=key, json=unknown_type)
    ).status_code == 422

    marker = order_event(shop, "c1", "o5", "order.paid", amount=7)
    assert (await platform.request("POST", "/v1/events", key=key, json=marker)).status_code == 202

    async def marker_applied() -> bool:
        return await customer(platform, key, "c1") is not None

    await until(marker_applied)
    body = await customer(platform, key, "c1")
    assert body is not None
    assert [o["order_id"] for o in body["orders"]] == ["o5"]


async def test_keys_are_required_and_scoped_to_their_shop(platform: Platform) -> None:
    shop_a, shop_b = shop_name(), shop_name()
    key_a = await platform.create_shop(shop_a)
    key_b = await platform.create_shop(shop_b)
    event = order_event(shop_a, "secret-customer", "o1", "order.paid")
    assert (await platform.request("POST", "/v1/events", key=key_a, json=event)).status_code == 202

    async def visible() -> bool:
        return await customer(platform, key_a, "secret-customer") is not None

    await until(visible)
    for method, path in [
        ("GET", "/v1/customers/secret-customer"),
        ("GET", "/v1/customers"),
        ("GET", "/v1/overview"),
        ("POST", "/v1/events"),
        ("POST", "/v1/shops"),
    ]:
        r = await platform.request(method, path, json={})
        assert r.status_code == 401, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        r = await platform.request(method, path, key="hk_not-a-key", json={})
        assert r.status_code == 401, (path, r.text)

    r = await platform.request("GET", "/v1/customers/secret-customer", key=key_b)
    assert r.status_code == 404
    r = await platform.request(
        "GET", "/v1/customers/secret-customer", key=key_b, params={"shop_id": shop_a}
    )
    assert r.status_code == 403
    r = await platform.request("GET", "/v1/customers", key=key_b)
    assert r.json()["items"] == []
    r = await platform.request("POST", "/v1/events", key=key_b, json=event)
    assert r.status_code == 403
    r = await platform.request("POST", f"/v1/shops/{shop_a}/keys", key=key_a)
    assert r.status_code == 403, "a shop key cannot mint keys"
    r = await platform.request(
        "POST", "/v1/events", key=platform.admin_key, json=order_event("no-such-shop", "c", "o")
    )
    assert r.status_code == 404


REFUNDS = (7, 11)
"""Two partial refunds of every order in the kill test (minor units): either applied twice
lowers `monetary` below its expected figure."""


async def test_a_consumer_killed_mid_batch_applies_every_event_exactly_once(
    platform: Platform,
) -> None:
    """A batch lifecycle applied but the bus never took as consumed comes again, and only
    lifecycle's inbox stops its partial refunds from being applied twice.

    Embedded: SIGKILL lands after the batch's transaction committed and before the bus
    committed the group's position. Distributed: SIGKILL there is out of reach (the
    Kafka commit leaves with the next statement, and the broker applies a commit it
    received even from a dead client); a batch comes again there when its consumer stalls
    mid-batch and the group gives its partitions to another member, so the test does that.
    Either way the moment is made to happen and checked, not hoped for."""
    shop = shop_name()
    key = await platform.create_shop(shop)
    customers, orders_each = 50, 4
    events: list[dict[str, Any]] = []
    for c in range(customers):
        for o in range(orders_each):
            total = 1000 + o
            events.append(order_event(shop, f"c{c}", f"o{c}-{o}", "order.paid", amount=total))
            for n, amount in enumerate(REFUNDS):
                events.append(refund_event(shop, f"c{c}", f"o{c}-{o}", total, amount, n))
    mine = {e.dedupe_key: e for e in map(parse_event, events)}
    assert len(mine) == len(events)
    for start in range(0, len(events), 1000):
        r = await platform.request("POST", "/v1/events", key=key, json=events[start : start + 1000])
        assert r.status_code == 202
    db = platform.database("lifecycle")
    try:
        if platform.embedded:
            await kill_between_commit_and_acknowledgement(platform, db, shop, mine)
        else:
            await stall_mid_batch_while_the_group_moves_on(platform, db, mine)
    finally:
        await db.dispose()

    await platform.settle()
    r = await platform.request("GET", "/v1/customers", key=key, params={"limit": 500})
    items = r.json()["items"]
    assert len(items) == customers
    spent = sum(1000 + o - sum(REFUNDS) for o in range(orders_each))
    for item in items:
        assert (item["rfm"]["frequency"], item["rfm"]["monetary"]["amount_minor"]) == (
            orders_each,
            spent,
        ), item["customer_id"]
        assert item["returning"] is True


def applied_more(db: Database, mine: Collection[str]) -> Callable[[], Awaitable[bool]]:
    """A check: has lifecycle applied more of `mine` than it had when this was called?"""
    before: list[int] = []

    async def check() -> bool:
        count = len(await processed(db, GROUP, mine))
        before.append(count)
        return count > before[0]

    return check


async def kill_between_commit_and_acknowledgement(
    platform: Platform, db: Database, shop: str, mine: dict[str, Envelope]
) -> None:
    """Stop the platform (SIGSTOP) the moment a batch's transaction shows committed, and
    read what it left durable: the events past the group's committed position on the bus,
    and which of them the inbox recorded as applied. With a partial refund among those,
    SIGKILL it there and start it again; otherwise let it go on (SIGCONT) and try again."""
    inbox = processed_events.c
    loop = asyncio.get_running_loop()

    async def inbox_size() -> int:
        async with db.connect() as conn:
            query = select(func.count()).where(inbox.consumer == GROUP)
            return int((await conn.execute(query)).scalar_one())

    for _ in range(40):
        size, give_up = await inbox_size(), loop.time() + 60
        # Poll without sleeping: the bus commit follows the transaction within milliseconds.
        while await inbox_size() == size:
            assert loop.time() < give_up, "lifecycle applied nothing for a minute"
        platform.pause()
        try:
            pending = [decode_event(v) for v in await platform.uncommitted(GROUP, LIFECYCLE_IN)]
            applied = await processed(db, GROUP, mine)
        except BaseException:
            platform.resume()
            raise
        assert len(applied) < len(mine), "the backlog must outlast the attempts"
        again = [mine[e.dedupe_key] for e in pending if e.dedupe_key in applied]
        assert all(e.shop_id == shop for e in again)
        if any(e.type == "order.refunded" for e in again):
            platform.kill()
            await platform.start()
            return
        platform.resume()
    raise AssertionError("the kill never landed between a commit and its acknowledgement")


async def stall_mid_batch_while_the_group_moves_on(
    platform: Platform, db: Database, mine: Collection[str]
) -> None:
    """Stop lifecycle (SIGSTOP) inside a batch's transaction, after it claimed the events
    in its inbox; start a second lifecycle, which gets the partitions once the stalled
    member's session expires, and the stalled batch with them (its position never moved);
    wait until that member waits on the stalled transaction's claim; let the stalled one
    go on (SIGCONT) so that its batch commits, then SIGKILL it. The second member is then
    given the batch's events already applied, and is lifecycle from there on."""
    for _ in range(30):
        await until(applied_more(db, mine))
        platform.pause("lifecycle")
        claimers = await inbox_claimers(db)
        # Twice alike: a COMMIT sent just before the stop would end the transaction soon.
        if claimers and claimers == await inbox_claimers(db):
            break
        platform.resume("lifecycle")
    else:
        raise AssertionError("lifecycle was never caught inside a batch")
    try:
        member = await platform.start_member("lifecycle")

        async def redelivered() -> bool:
            return await blocked_by(db, claimers) > 0

        await until(redelivered, within=120)
    finally:
        platform.resume("lifecycle")

    async def stalled_batch_done() -> bool:
        return not set(claimers) & set(await inbox_claimers(db))

    await until(stalled_batch_done)
    platform.kill("lifecycle")
    platform.take_over(member)


async def inbox_claimers(db: Database) -> list[int]:
    """PostgreSQL backends whose open transaction wrote lifecycle's inbox."""
    async with db.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :schema AND c.relname = 'processed_events' "
                "AND l.mode = 'RowExclusiveLock' AND l.granted AND l.pid <> pg_backend_pid()"
            ),
            {"schema": db.schema},
        )
        return sorted(set(rows.scalars()))


async def blocked_by(db: Database, pids: list[int]) -> int:
    """How many backends wait for a lock one of `pids` holds."""
    async with db.connect() as conn:
        return int(
            (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE pg_blocking_pids(pid) && CAST(:pids AS integer[])"
                    ),
                    {"pids": pids},
                )
            ).scalar_one()
        )


async def test_every_service_exposes_health_readiness_and_metrics(platform: Platform) -> None:
    import httpx

    for name in ("ingest", "lifecycle", "campaigns", "notifier"):
        async with httpx.AsyncClient() as client:
            assert (await client.get(platform.service_url(name, "/healthz"))).status_code == 200
            ready = await client.get(platform.service_url(name, "/readyz"))
            assert ready.status_code == 200, ready.text
            assert all(v == "ok" for v in ready.json()["checks"].values())
            text = (await client.get(platform.service_url(name, "/metrics"))).text
            assert "huitou_http_requests_total" in text
    async with httpx.AsyncClient() as client:
        text = (await client.get(platform.service_url("lifecycle", "/metrics"))).text
    assert 'huitou_consumer_messages_total{group="lifecycle"' in text
    docs = await platform.request("GET", "/openapi.json") if platform.embedded else None
    if docs is not None:
        assert "/v1/events" in docs.json()["paths"]

"""Tag commands: define tags, assign and unassign manual ones, copy and move members.

A shop has at most 100 tags. Manual tags are assigned by operators; automatic tags follow
their rule, re-evaluated whenever a customer's facts change (and, for rules on recency,
when time alone crosses their thresholds). Defining or changing an automatic tag, or
changing the stage policy, starts a job that re-derives every customer of the shop.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import insert_ignore
from libs.common.events import Envelope, TagRequestedData, decode_event
from libs.common.outbox import enqueue
from libs.common.problems import Problem
from libs.common.timers import Timer, schedule, timer_key
from services.lifecycle.derivation import restage, restage_shop_timer
from services.lifecycle.emitted import tag_event
from services.lifecycle.models import customer_tags, customers, tags
from services.lifecycle.rules import Rule, dump_rule

MAX_TAGS_PER_SHOP = 100
log = logging.getLogger(__name__)


async def tag_row(conn: AsyncConnection, shop_id: str, name: str) -> Any:
    row = (
        await conn.execute(select(tags).where(tags.c.shop_id == shop_id, tags.c.name == name))
    ).first()
    if row is None:
        raise Problem(404, f"no tag {name!r}")
    return row


async def create_tag(conn: AsyncConnection, shop_id: str, name: str, rule: Rule | None) -> None:
    count = (await conn.execute(select(func.count()).where(tags.c.shop_id == shop_id))).scalar_one()
    if count >= MAX_TAGS_PER_SHOP:
        raise Problem(422, f"a shop has at most {MAX_TAGS_PER_SHOP} tags")
    exists = await conn.execute(
        select(tags.c.name).where(tags.c.shop_id == shop_id, tags.c.name == name)
    )
    if exists.first() is not None:
        raise Problem(409, f"tag {name!r} already exists")
    await conn.execute(
        tags.insert().values(
            shop_id=shop_id,
            name=name,
            kind="auto" if rule else "manual",
            rule=orjson.dumps(dump_rule(rule)).decode() if rule else None,
            created_at=datetime.now(UTC),
        )
    )
    if rule is not None:
        await schedule(conn, [restage_shop_timer(shop_id)])


async def change_rule(conn: AsyncConnection, shop_id: str, name: str, rule: Rule) -> None:
    row = await tag_row(conn, shop_id, name)
    if row.kind != "auto":
        raise Problem(409, f"tag {name!r} is manual; only automatic tags have a rule")
    await conn.execute(
        tags.update()
        .where(tags.c.shop_id == shop_id, tags.c.name == name)
        .values(rule=orjson.dumps(dump_rule(rule)).decode())
    )
    await schedule(conn, [restage_shop_timer(shop_id)])


async def delete_tag(conn: AsyncConnection, shop_id: str, name: str, namespace: str) -> None:
    await tag_row(conn, shop_id, name)
    members = await _members(conn, shop_id, name)
    await _remove(conn, shop_id, name, members, namespace)
    await conn.execute(delete(tags).where(tags.c.shop_id == shop_id, tags.c.name == name))
    await schedule(conn, [restage_shop_timer(shop_id)])


async def _members(conn: AsyncConnection, shop_id: str, name: str) -> list[str]:
    return list(
        (
            await conn.execute(
                select(customer_tags.c.customer_id).where(
                    customer_tags.c.shop_id == shop_id, customer_tags.c.tag == name
                )
            )
        ).scalars()
    )


async def _require_manual(conn: AsyncConnection, shop_id: str, name: str) -> None:
    if (await tag_row(conn, shop_id, name)).kind != "manual":
        raise Problem(409, f"tag {name!r} is automatic: its rule decides who has it")


async def _existing(conn: AsyncConnection, shop_id: str, ids: Sequence[str]) -> list[str]:
    found = set(
        (
            await conn.execute(
                select(customers.c.customer_id).where(
                    customers.c.shop_id == shop_id,
                    customers.c.customer_id.in_(set(ids)),
                    customers.c.merged_into.is_(None),
                )
            )
        ).scalars()
    )
    missing = sorted(set(ids) - found)
    if missing:
        raise Problem(
            422,
            "unknown customers",
            errors=[
                {"field": "customer_ids", "message": f"no customer {m!r}"} for m in missing[:20]
            ],
        )
    return sorted(found)


async def assign(
    conn: AsyncConnection, shop_id: str, name: str, ids: Sequence[str], namespace: str
) -> int:
    """Give a manual tag to customers; returns how many did not have it yet."""
    await _require_manual(conn, shop_id, name)
    return await _add(conn, shop_id, name, await _existing(conn, shop_id, ids), namespace)


async def _add(
    conn: AsyncConnection, shop_id: str, name: str, ids: Sequence[str], namespace: str
) -> int:
    now = datetime.now(UTC)
    if not ids:
        return 0
    added = list(
        (
            await conn.execute(
                insert_ignore(conn, customer_tags).returning(customer_tags.c.customer_id),
                [
                    {"shop_id": shop_id, "customer_id": cid, "tag": name, "assigned_at": now}
                    for cid in ids
                ],
            )
        ).scalars()
    )
    await enqueue(
        conn,
        [tag_event("customer.tag_added", (shop_id, cid), name, now, namespace) for cid in added],
    )
    await restage(conn, [(shop_id, cid) for cid in added], now=now, namespace=namespace)
    return len(added)


async def unassign(
    conn: AsyncConnection, shop_id: str, name: str, ids: Sequence[str], namespace: str
) -> int:
    await _require_manual(conn, shop_id, name)
    held = set(await _members(conn, shop_id, name)) & set(ids)
    return await _remove(conn, shop_id, name, sorted(held), namespace)


async def _remove(
    conn: AsyncConnection, shop_id: str, name: str, ids: Sequence[str], namespace: str
) -> int:
    if not ids:
        return 0
    now = datetime.now(UTC)
    ct = customer_tags.c
    await conn.execute(
        delete(customer_tags).where(
            tuple_(ct.shop_id, ct.customer_id, ct.tag).in_([(shop_id, c, name) for c in ids])
        )
    )
    await enqueue(
        conn,
        [tag_event("customer.tag_removed", (shop_id, cid), name, now, namespace) for cid in ids],
    )
    await restage(conn, [(shop_id, cid) for cid in ids], now=now, namespace=namespace)
    return len(ids)


async def copy_members(
    conn: AsyncConnection,
    shop_id: str,
    source: str,
    target: str,
    *,
    move: bool,
    namespace: str,
) -> int:
    """Give `target` (manual) to every member of `source`; `move` also takes `source`
    away (then `source` must be manual too). Returns how many gained `target`."""
    await tag_row(conn, shop_id, source)
    await _require_manual(conn, shop_id, target)
    if move:
        await _require_manual(conn, shop_id, source)
    members = await _members(conn, shop_id, source)
    added = await _add(conn, shop_id, target, members, namespace)
    if move:
        await _remove(conn, shop_id, source, members, namespace)
    return added


TAG_REQUEST_TIMER = "tag_request.retry"
TAG_REQUEST_TRIES = 30
"""A request for a customer lifecycle has not seen yet (its first event is still on its
way through another topic) is tried again every 2 s, this many times, then dropped."""


async def on_tag_request_timers(
    conn: AsyncConnection, fired: Sequence[Timer], namespace: str
) -> None:
    for timer in fired:
        event = decode_event(str(timer.payload["event"]).encode())
        await apply_requests(conn, [event], namespace, tries=int(timer.payload["tries"]))


async def apply_requests(
    conn: AsyncConnection, events: Sequence[Envelope], namespace: str, *, tries: int = 0
) -> None:
    """`customer.tag_requested` from other services (a journey's tag step), in order.

    A tag the shop does not have yet is created as a manual tag (while the shop is under
    its 100); an automatic tag is left to its rule; a request for a customer lifecycle does
    not know yet is tried again shortly (`TAG_REQUEST_TRIES`): each with a warning, never a
    failure that would hold the partition."""
    for event in events:
        data = event.typed_data()
        assert isinstance(data, TagRequestedData)
        shop, name = event.shop_id, data.tag
        row = (
            await conn.execute(select(tags).where(tags.c.shop_id == shop, tags.c.name == name))
        ).first()
        if row is None and data.action == "add":
            count = (
                await conn.execute(select(func.count()).where(tags.c.shop_id == shop))
            ).scalar_one()
            if count >= MAX_TAGS_PER_SHOP:
                log.warning("tag request dropped: the shop has 100 tags", extra={"shop": shop})
                continue
            await create_tag(conn, shop, name, None)
        elif row is None:
            continue  # nobody has a tag that does not exist
        elif row.kind != "manual":
            log.warning(
                "tag request dropped: the tag is automatic", extra={"shop": shop, "tag": name}
            )
            continue
        known = (
            await conn.execute(
                select(customers.c.customer_id).where(
                    customers.c.shop_id == shop,
                    customers.c.customer_id == data.customer_id,
                    customers.c.merged_into.is_(None),
                )
            )
        ).first()
        if known is None:
            if tries + 1 >= TAG_REQUEST_TRIES:
                log.warning("tag request dropped: unknown customer", extra={"shop": shop})
                continue
            retry = Timer(
                timer_key(shop, "tagreq", hashlib.sha256(event.dedupe_key.encode()).hexdigest()),
                TAG_REQUEST_TIMER,
                shop,
                datetime.now(UTC) + timedelta(seconds=2),
                {"event": event.to_bytes().decode(), "tries": tries + 1},
            )
            await schedule(conn, [retry])
            continue
        if data.action == "add":
            await _add(conn, shop, name, [data.customer_id], namespace)
            continue
        ct = customer_tags.c
        held = await conn.execute(
            select(ct.customer_id).where(
                ct.shop_id == shop, ct.customer_id == data.customer_id, ct.tag == name
            )
        )
        if held.first() is not None:
            await _remove(conn, shop, name, [data.customer_id], namespace)

"""Customer profiles: who an event names, their contact details, and deliberate merges.

Contact details (name, phone, email: the number the notifier will text) each come from the
newest event, by event time, that carries them, not from whichever arrived last; the first
time a customer was seen and the platform that brought them from the earliest event
(`CUSTOMER_MERGE`). Figures (RFM, stage, level) are derived from orders elsewhere.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String, and_, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import insert_ignore, upsert
from libs.common.db.keysets import columns_of, in_rows, insert_select, reused, rows_of, rows_params
from libs.common.events import Customer, Envelope
from libs.common.outbox import enqueue
from libs.common.timers import cancel
from services.lifecycle.derivation import restage_timer_key
from services.lifecycle.emitted import change_event
from services.lifecycle.identities import Identity
from services.lifecycle.merging import Earliest, Latest, Merge, Pick
from services.lifecycle.models import customer_notes, customer_tags, customers, orders

CustomerKey = tuple[str, str]
CUSTOMER_KEY_COLUMNS = [("shop_id", String()), ("customer_id", String())]

CUSTOMER_MERGE = Merge(
    (
        Pick(("name",), at="name_at", prefer="newest"),
        Pick(("phone",), at="phone_at", prefer="newest"),
        Pick(("email",), at="email_at", prefer="newest"),
        Pick(("source",), at="first_seen_at", prefer="oldest"),
        Earliest("first_seen_at"),
        Latest("last_interest_at"),
    )
)

_CUSTOMER_COLUMNS = (
    "shop_id",
    "customer_id",
    "name",
    "name_at",
    "phone",
    "phone_at",
    "email",
    "email_at",
    "first_seen_at",
    "last_interest_at",
    "stage",
    "source",
)


def identity_of(event: Envelope, customer: Customer) -> Identity:
    """The identities an event shows: the platform id (the event's subject when it is
    neither the phone nor the email), the phone and the email."""
    platform_id = customer.id
    if platform_id is None and event.subject not in (None, customer.phone, customer.email):
        platform_id = event.subject
    return Identity(event.shop_id, platform_id, customer.phone, customer.email)


def profile_row(
    event: Envelope, customer_id: str, customer: Customer | None, interest_at: datetime | None
) -> dict[str, Any]:
    """The row one event contributes to its customer's profile (`CUSTOMER_MERGE`);
    `customer` None when the event may not change the profile's contact details."""
    at = event.time
    name = customer.name if customer else None
    phone = customer.phone if customer else None
    email = customer.email if customer else None
    return {
        "shop_id": event.shop_id,
        "customer_id": customer_id,
        "name": name,
        "name_at": at if name else None,
        "phone": phone,
        "phone_at": at if phone else None,
        "email": email,
        "email_at": at if email else None,
        "first_seen_at": at,
        "last_interest_at": interest_at,
        "stage": "prospect",
        "source": event.source.split("/")[0],
    }


def fold_profile(people: dict[CustomerKey, dict[str, Any]], row: dict[str, Any]) -> None:
    """Fold one event's profile row into the batch's rows."""
    key = (row["shop_id"], row["customer_id"])
    seen = people.get(key)
    people[key] = row if seen is None else CUSTOMER_MERGE.py(seen, row)


async def upsert_customers(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Fold the batch's profile rows (one per customer) into the stored profiles."""
    stmt = reused(
        conn,
        "lifecycle.customers.upsert",
        lambda: upsert(
            conn,
            customers,
            ["shop_id", "customer_id"],
            [],
            merge=CUSTOMER_MERGE.sql(customers),
            source=insert_select(conn, customers, _CUSTOMER_COLUMNS, None),
        ),
    )
    values = [[r[n] for n in _CUSTOMER_COLUMNS] for r in rows]
    await conn.execute(
        stmt, rows_params(conn, "new", columns_of(customers, _CUSTOMER_COLUMNS), values)
    )


async def merge_profiles(
    conn: AsyncConnection, merges: list[tuple[str, str, str]], now: datetime, namespace: str
) -> None:
    """Fold each loser's orders, tags and notes into its winner, mark it merged, announce."""
    columns = [("s", String()), ("loser", String()), ("winner", String())]
    for table in (orders, customer_notes):
        moved_rows = rows_of(conn, "moves", columns, merges)
        await conn.execute(
            update(table)
            .where(table.c.shop_id == moved_rows.c.s, table.c.customer_id == moved_rows.c.loser)
            .values(customer_id=moved_rows.c.winner)
        )
    keys = [(s, loser) for s, loser, _ in merges]
    winner_of = {(s, loser): winner for s, loser, winner in merges}
    ct = customer_tags.c
    losers = rows_of(conn, "losers", CUSTOMER_KEY_COLUMNS, keys)
    moved = [
        {
            "shop_id": r.shop_id,
            "customer_id": winner_of[(r.shop_id, r.customer_id)],
            "tag": r.tag,
            "assigned_at": r.assigned_at,
        }
        for r in await conn.execute(
            select(customer_tags).join(
                losers, and_(ct.shop_id == losers.c.shop_id, ct.customer_id == losers.c.customer_id)
            )
        )
    ]
    if moved:
        await conn.execute(insert_ignore(conn, customer_tags), moved)
    await conn.execute(
        delete(customer_tags).where(
            in_rows(conn, "losers", [ct.shop_id, ct.customer_id], CUSTOMER_KEY_COLUMNS, keys)
        )
    )
    merged_rows = rows_of(conn, "moves", columns, merges)
    await conn.execute(
        update(customers)
        .where(
            customers.c.shop_id == merged_rows.c.s,
            customers.c.customer_id == merged_rows.c.loser,
        )
        .values(merged_into=merged_rows.c.winner)
    )
    await cancel(conn, [restage_timer_key(s, loser) for s, loser, _ in merges])
    by_winner: dict[CustomerKey, list[str]] = {}
    for s, loser, winner in merges:
        by_winner.setdefault((s, winner), []).append(loser)
    await enqueue(
        conn,
        [
            change_event(
                "customer.merged",
                key,
                now,
                namespace,
                {"customer_id": key[1], "merged_ids": sorted(losers)},
                discriminator=",".join(sorted(losers)),
            )
            for key, losers in by_winner.items()
        ],
    )

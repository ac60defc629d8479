"""Ingest's commands: register shops, issue keys, and put accepted events on the bus."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.auth import generate_key, hash_key
from libs.common.bus import Bus, Message
from libs.common.events import Envelope, ShopData, ShopKeyData, new_event, topic_for
from libs.common.outbox import enqueue
from libs.common.problems import Problem
from services.ingest.models import api_keys, shops, webhook_secrets
from services.ingest.schemas import ShopCreate, ShopOut

SOURCE = "huitou/ingest"


def to_message(event: Envelope, namespace: str) -> Message:
    """The bus message of a canonical event: keyed by `shop_id:customer_id`."""
    return Message(
        topic=topic_for(event.type, namespace),
        key=event.key,
        value=event.to_bytes(),
        headers={"ce_id": event.id, "ce_type": event.type},
    )


def _registry_event(type_: str, shop_id: str, data: ShopData | ShopKeyData) -> Envelope:
    return new_event(
        type=type_,
        shop_id=shop_id,
        source=SOURCE,
        data=data,
        subject=None,
        id=f"{type_}:{uuid.uuid4()}",
    )


async def create_shop(conn: AsyncConnection, body: ShopCreate, namespace: str) -> ShopOut:
    now = datetime.now(UTC)
    try:
        await conn.execute(
            shops.insert().values(
                shop_id=body.shop_id,
                name=body.name,
                timezone=body.timezone,
                currency=body.currency,
                created_at=now,
            )
        )
    except IntegrityError:
        raise Problem(409, f"shop {body.shop_id!r} already exists") from None
    if body.webhook_secrets:
        await conn.execute(
            webhook_secrets.insert(),
            [
                {
                    "shop_id": body.shop_id,
                    "platform": platform,
                    "secret": secret,
                    "secret_id": secrets.token_hex(6),
                    "created_at": now,
                    "expires_at": None,
                }
                for platform, secret in body.webhook_secrets.items()
            ],
        )
    data = ShopData(
        shop_id=body.shop_id, name=body.name, timezone=body.timezone, currency=body.currency
    )
    await enqueue(
        conn, [to_message(_registry_event("shop.registered", body.shop_id, data), namespace)]
    )
    return ShopOut(
        shop_id=body.shop_id,
        name=body.name,
        timezone=body.timezone,
        currency=body.currency,
        webhook_platforms=sorted(body.webhook_secrets),
        created_at=now,
    )


async def get_shop(conn: AsyncConnection, shop_id: str) -> ShopOut | None:
    row = (await conn.execute(select(shops).where(shops.c.shop_id == shop_id))).first()
    if row is None:
        return None
    platforms = (
        await conn.execute(
            select(webhook_secrets.c.platform)
            .where(webhook_secrets.c.shop_id == shop_id)
            .distinct()
        )
    ).scalars()
    return ShopOut(
        shop_id=row.shop_id,
        name=row.name,
        timezone=row.timezone,
        currency=row.currency,
        webhook_platforms=sorted(platforms),
        created_at=row.created_at,
    )


async def list_shop_ids(conn: AsyncConnection) -> list[str]:
    return list((await conn.execute(select(shops.c.shop_id).order_by(shops.c.shop_id))).scalars())


async def issue_key(conn: AsyncConnection, shop_id: str, namespace: str) -> tuple[str, str]:
    """A new shop key; returns (key_id, key). The key itself is never stored."""
    if await get_shop(conn, shop_id) is None:
        raise Problem(404, f"unknown shop {shop_id!r}")
    key_id, key = generate_key()
    digest = hash_key(key)
    await conn.execute(
        api_keys.insert().values(
            key_hash=digest,
            key_id=key_id,
            shop_id=shop_id,
            revoked=False,
            created_at=datetime.now(UTC),
        )
    )
    data = ShopKeyData(shop_id=shop_id, key_id=key_id, key_hash=digest)
    await enqueue(conn, [to_message(_registry_event("shop.key_issued", shop_id, data), namespace)])
    return key_id, key


async def revoke_key(conn: AsyncConnection, shop_id: str, key_id: str, namespace: str) -> None:
    row = (
        await conn.execute(
            select(api_keys.c.key_hash).where(
                api_keys.c.shop_id == shop_id, api_keys.c.key_id == key_id
            )
        )
    ).first()
    if row is None:
        raise Problem(404, f"no key {key_id!r} for shop {shop_id!r}")
    await conn.execute(
        update(api_keys).where(api_keys.c.key_hash == row.key_hash).values(revoked=True)
    )
    data = ShopKeyData(shop_id=shop_id, key_id=key_id, key_hash=row.key_hash)
    await enqueue(conn, [to_message(_registry_event("shop.key_revoked", shop_id, data), namespace)])


async def publish_events(bus: Bus, events: Sequence[Envelope], namespace: str) -> None:
    """Publish every event durably or raise BusUnavailable (then nothing is acknowledged)."""
    await bus.publish([to_message(e, namespace) for e in events])


async def update_shop(
    conn: AsyncConnection, shop_id: str, changes: dict[str, str], namespace: str
) -> ShopOut:
    """Change a shop's name, timezone or currency and announce it to every service."""
    if changes:
        await conn.execute(update(shops).where(shops.c.shop_id == shop_id).values(**changes))
    shop = await get_shop(conn, shop_id)
    if shop is None:
        raise Problem(404, f"unknown shop {shop_id!r}")
    data = ShopData(
        shop_id=shop.shop_id, name=shop.name, timezone=shop.timezone, currency=shop.currency
    )
    await enqueue(conn, [to_message(_registry_event("shop.updated", shop_id, data), namespace)])
    return shop


async def rotate_secret(
    conn: AsyncConnection, shop_id: str, platform: str, secret: str, grace: timedelta
) -> None:
    """Make `secret` the platform's secret; the previous ones keep verifying for `grace`."""
    if await get_shop(conn, shop_id) is None:
        raise Problem(404, f"unknown shop {shop_id!r}")
    now = datetime.now(UTC)
    s = webhook_secrets.c
    retire_at = now + grace
    await conn.execute(
        update(webhook_secrets)
        .where(
            s.shop_id == shop_id,
            s.platform == platform,
            or_(s.expires_at.is_(None), s.expires_at > retire_at),
        )
        .values(expires_at=retire_at)
    )
    await conn.execute(
        webhook_secrets.insert().values(
            shop_id=shop_id,
            platform=platform,
            secret_id=secrets.token_hex(6),
            secret=secret,
            created_at=now,
            expires_at=None,
        )
    )


async def active_secrets(conn: AsyncConnection, shop_id: str, platform: str) -> list[str]:
    """The platform's current secret and any still inside their grace period."""
    s = webhook_secrets.c
    rows = await conn.execute(
        select(s.secret)
        .where(
            s.shop_id == shop_id,
            s.platform == platform,
            or_(s.expires_at.is_(None), s.expires_at > datetime.now(UTC)),
        )
        .order_by(s.created_at.desc())
    )
    return list(rows.scalars())

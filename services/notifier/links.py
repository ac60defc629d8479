"""The notifier's public links: one-click unsubscribe links in marketing messages and the
callback URLs providers post receipts and replies to.

Both are signed with the shop's own secret (a row in `notifier_shop_secrets`, made on
first use, so every worker and every restart signs alike and no setting has to be shared):

- an unsubscribe token is `<shop>.<message id>.<mac>`; it names the message, whose row
  holds the channel and address, so no address travels in a URL (or an access log);
- a callback URL for a provider that does not sign its pushes (Aliyun, Tencent) carries
  `?token=<mac>`; Twilio signs every request with the account's auth token, so its URL
  needs none.

A MAC is the first 32 hex digits of HMAC-SHA256 over a purpose-tagged string, compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as random_secrets
from collections.abc import Iterable
from datetime import datetime
from typing import Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import insert_ignore
from libs.common.settings import Settings
from services.notifier.models import secrets

SIGNED_PROVIDERS: Final = frozenset({"twilio"})
"""Providers whose callbacks carry their own signature (no token in the URL)."""


def public_base(settings: Settings) -> str:
    """Where recipients and providers reach this platform (`HUITOU_PUBLIC_URL`)."""
    return (settings.public_url or f"http://127.0.0.1:{settings.port}").rstrip("/")


async def shop_secrets(
    conn: AsyncConnection, shop_ids: Iterable[str], *, now: datetime
) -> dict[str, str]:
    """Each shop's signing secret, made for the shops that have none yet."""
    wanted = sorted(set(shop_ids))
    if not wanted:
        return {}
    s = secrets.c
    query = select(s.shop_id, s.secret).where(s.shop_id.in_(wanted))
    found = {shop: secret for shop, secret in await conn.execute(query)}
    missing = [shop for shop in wanted if shop not in found]
    if missing:
        await conn.execute(
            insert_ignore(conn, secrets),
            [
                {"shop_id": shop, "secret": random_secrets.token_hex(32), "created_at": now}
                for shop in missing
            ],
        )
        # Another worker may have made one first: the stored secret is the one.
        found.update({shop: secret for shop, secret in await conn.execute(query)})
    return found


async def stored_secret(conn: AsyncConnection, shop_id: str) -> str | None:
    """The shop's secret if it has one (a link of a shop without one is not ours)."""
    query = select(secrets.c.secret).where(secrets.c.shop_id == shop_id)
    return (await conn.execute(query)).scalar_one_or_none()


def _mac(secret: str, *parts: str) -> str:
    return hmac.new(secret.encode(), "\x00".join(parts).encode(), hashlib.sha256).hexdigest()[:32]


def unsubscribe_token(secret: str, shop_id: str, message_id: str) -> str:
    return f"{shop_id}.{message_id}.{_mac(secret, 'unsubscribe', shop_id, message_id)}"


def unsubscribe_url(base: str, secret: str, shop_id: str, message_id: str) -> str:
    return f"{base}/v1/unsubscribe/{unsubscribe_token(secret, shop_id, message_id)}"


def split_unsubscribe_token(token: str) -> tuple[str, str, str] | None:
    """(shop, message id, mac) of a token's shape, or None (the shop id may hold dots)."""
    parts = token.rsplit(".", 2)
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def valid_unsubscribe(secret: str, shop_id: str, message_id: str, mac: str) -> bool:
    return hmac.compare_digest(_mac(secret, "unsubscribe", shop_id, message_id), mac)


def callback_token(secret: str, shop_id: str, provider: str) -> str:
    return _mac(secret, "callback", shop_id, provider)


def valid_callback_token(secret: str, shop_id: str, provider: str, token: str) -> bool:
    return hmac.compare_digest(callback_token(secret, shop_id, provider), token)


def callback_url(base: str, secret: str, shop_id: str, provider: str) -> str:
    """The URL to give `provider` for the shop's receipts and replies."""
    url = f"{base}/v1/callbacks/{provider}/{shop_id}"
    if provider in SIGNED_PROVIDERS:
        return url
    return f"{url}?token={callback_token(secret, shop_id, provider)}"

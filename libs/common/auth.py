"""API keys: one admin key from settings, and per-shop keys that see only their shop.

Keys are random bearer tokens shown once; services store only their SHA-256. Ingest owns
the shops registry and issues keys; it announces each key (its hash and shop) on the
`shops` topic, and every other service keeps its own `api_keys` projection from there,
so no service reads another's tables and every one can check a key locally.

Known keys are cached for 5 seconds (a revoked key is refused within that), in a bounded
LRU; unknown keys are never cached, so a flood of made-up tokens costs a lookup each but
no memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import select

from libs.common.db.engine import Database
from libs.common.db.tables import api_keys
from libs.common.problems import Problem

KEY_PREFIX = "hk_"
_CACHE_TTL_S = 5.0
_CACHE_MAX_ENTRIES = 10_000


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new (key_id, key) pair; the key is shown once, only its hash is kept."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}{secrets.token_urlsafe(32)}"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the admin, or one shop."""

    shop_id: str | None
    is_admin: bool = False

    def shop(self, requested: str | None) -> str:
        """The shop this request is about: a shop key's own, or the one an admin names.

        A shop key naming another shop is refused, so a key never sees another's rows.
        """
        if self.is_admin:
            if not requested:
                raise Problem(400, "the admin key must name the shop with ?shop_id=")
            return requested
        assert self.shop_id is not None
        if requested and requested != self.shop_id:
            raise Problem(403, "this key belongs to another shop")
        return self.shop_id

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Problem(403, "this operation needs the admin key")


class Authenticator:
    """FastAPI dependency: resolves `Authorization: Bearer <key>` to a Principal."""

    def __init__(
        self, db: Database, admin_key: str | None, *, max_cached: int = _CACHE_MAX_ENTRIES
    ) -> None:
        self.db = db
        self.admin_key = admin_key
        self.max_cached = max_cached
        self._cache: OrderedDict[str, tuple[float, str]] = OrderedDict()
        """Key hash → (expires at, shop) of known keys, least recently used first."""

    async def __call__(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Problem(
                401,
                "missing API key: send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = key.strip()
        if self.admin_key and hmac.compare_digest(key.encode(), self.admin_key.encode()):
            return Principal(shop_id=None, is_admin=True)
        shop_id = await self._lookup(hash_key(key))
        if shop_id is None:
            raise Problem(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return Principal(shop_id=shop_id)

    async def _lookup(self, key_hash: str) -> str | None:
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None:
            if cached[0] > now:
                self._cache.move_to_end(key_hash)
                return cached[1]
            del self._cache[key_hash]
        async with self.db.connect() as conn:
            row = (
                await conn.execute(
                    select(api_keys.c.shop_id).where(
                        api_keys.c.key_hash == key_hash, api_keys.c.revoked.is_(False)
                    )
                )
            ).first()
        if row is None:
            return None  # not cached: junk tokens must not grow the cache
        shop_id: str = row.shop_id
        self._cache[key_hash] = (now + _CACHE_TTL_S, shop_id)
        self._cache.move_to_end(key_hash)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return shop_id

"""The authenticator's cache: bounded whatever tokens arrive, and a revoked key refused
within the cache's 5 seconds."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import update
from starlette.requests import Request

from libs.common.auth import Authenticator, hash_key
from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.db.tables import api_keys
from libs.common.problems import Problem
from tests.common import plumbing_migrations


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}", "auth")
    await migrate(database, plumbing_migrations)
    yield database
    await database.dispose()


def bearer(key: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]})


async def add_keys(db: Database, n: int, shop: str = "acme") -> list[str]:
    keys = [f"hk_{secrets.token_urlsafe(16)}" for _ in range(n)]
    async with db.begin() as conn:
        await conn.execute(
            api_keys.insert(),
            [
                {
                    "key_hash": hash_key(k),
                    "key_id": f"id{i}",
                    "shop_id": shop,
                    "revoked": False,
                    "created_at": datetime.now(UTC),
                }
                for i, k in enumerate(keys)
            ],
        )
    return keys


async def test_junk_tokens_do_not_grow_the_cache(db: Database) -> None:
    auth = Authenticator(db, "admin-key")
    [good] = await add_keys(db, 1)
    assert (await auth(bearer(good))).shop_id == "acme"
    for _ in range(500):
        with pytest.raises(Problem) as refused:
            await auth(bearer(secrets.token_urlsafe(24)))
        assert refused.value.status == 401
    assert len(auth._cache) <= 1


async def test_known_keys_are_cached_in_a_bounded_lru(db: Database) -> None:
    auth = Authenticator(db, None, max_cached=50)
    keys = await add_keys(db, 200)
    for key in keys:
        assert (await auth(bearer(key))).shop_id == "acme"
    assert len(auth._cache) == 50
    for key in keys:  # evicted keys are simply looked up again
        assert (await auth(bearer(key))).shop_id == "acme"
    assert len(auth._cache) == 50


async def test_a_revoked_key_is_refused_once_its_cache_entry_expires(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = Authenticator(db, None)
    [key] = await add_keys(db, 1)
    clock = [1000.0]
    monkeypatch.setattr("libs.common.auth.time.monotonic", lambda: clock[0])
    assert (await auth(bearer(key))).shop_id == "acme"
    async with db.begin() as conn:
        await conn.execute(update(api_keys).values(revoked=True))
    clock[0] += 4.9
    assert (await auth(bearer(key))).shop_id == "acme"  # still cached: at most 5 s
    clock[0] += 0.2
    with pytest.raises(Problem):
        await auth(bearer(key))

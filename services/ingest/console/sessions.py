"""Console sessions: a random token in the browser's cookie, the operator's key kept here.

A row per session in ingest's `console_sessions`: the SHA-256 of the token (a stolen
table holds no usable token), the shop, whether the key is the admin's, the key encrypted
with AES-GCM under a key derived (HKDF-SHA256) from `HUITOU_ADMIN_KEY`, the CSRF token
and the expiry. Rows past their expiry are refused and deleted when met."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import delete, insert, select

from libs.common.db import Database
from services.ingest.models import console_sessions

TTL = timedelta(hours=12)


@dataclass(frozen=True)
class Session:
    shop_id: str
    is_admin: bool
    key: str
    csrf: str

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    def __init__(self, db: Database, secret: str) -> None:
        self.db = db
        self._aead = AESGCM(
            HKDF(
                algorithm=hashes.SHA256(),
                length=32,
                salt=None,
                info=b"huitou console sessions",
            ).derive(secret.encode())
        )

    def _seal(self, key: str, token_hash: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, key.encode(), token_hash.encode())
        return base64.b64encode(nonce + sealed).decode()

    def _open(self, sealed: str, token_hash: str) -> str:
        raw = base64.b64decode(sealed)
        return self._aead.decrypt(raw[:12], raw[12:], token_hash.encode()).decode()

    async def create(self, shop_id: str, is_admin: bool, key: str) -> tuple[str, Session]:
        """A new session; returns the cookie's token and the session."""
        token = secrets.token_urlsafe(32)
        token_hash = _hash(token)
        session = Session(shop_id, is_admin, key, secrets.token_urlsafe(32))
        async with self.db.begin() as conn:
            await conn.execute(
                insert(console_sessions).values(
                    token_hash=token_hash,
                    shop_id=shop_id,
                    is_admin=is_admin,
                    key_sealed=self._seal(key, token_hash),
                    csrf=session.csrf,
                    expires_at=datetime.now(UTC) + TTL,
                )
            )
        return token, session

    async def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 100:
            return None
        token_hash = _hash(token)
        s = console_sessions.c
        async with self.db.connect() as conn:
            row = (
                await conn.execute(select(console_sessions).where(s.token_hash == token_hash))
            ).first()
        if row is None:
            return None
        if row.expires_at <= datetime.now(UTC):
            await self.end(token)
            return None
        key = self._open(row.key_sealed, token_hash)
        return Session(row.shop_id, row.is_admin, key, row.csrf)

    async def end(self, token: str) -> None:
        s = console_sessions.c
        async with self.db.begin() as conn:
            await conn.execute(delete(console_sessions).where(s.token_hash == _hash(token)))
            await conn.execute(delete(console_sessions).where(s.expires_at <= datetime.now(UTC)))

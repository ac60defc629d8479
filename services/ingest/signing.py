"""`X-Huitou-Signature`: how a shop's own systems sign canonical requests without a key.

The header is `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` keyed with the
shop's `huitou` webhook secret, and `X-Huitou-Shop` names the shop. The timestamp is
signed with the body and must lie within the tolerance window (default 5 minutes) of our
clock, so a captured request cannot be replayed later; inside the window a replay carries
the same event ids and the ingest ledger drops it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Sequence

SIGNATURE_HEADER = "X-Huitou-Signature"
SHOP_HEADER = "X-Huitou-Shop"
TOLERANCE_S = 300
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
"""`t`: 1 to 12 ASCII digits. `str.isdigit` alone takes "²" (which `int` refuses) and any
number of digits (past 4,300 `int` refuses them too); either used to answer 500."""
_MAC = re.compile(r"[0-9a-f]{64}")


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The header value that signs `body` at `timestamp` (now by default)."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    header: str | None,
    body: bytes,
    secrets: Sequence[str],
    *,
    now: float | None = None,
    tolerance_s: int = TOLERANCE_S,
) -> bool:
    """True when `header` signs `body` with one of `secrets` inside the tolerance window.

    Anything malformed is simply not a signature (False, answered 401): `t` must be 1 to 12
    ASCII digits and `v1` 64 lower-case hex digits."""
    if not header:
        return False
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    t, candidates = parts.get("t", ""), [v for k, v in parts.items() if k == "v1"]
    candidates = [c for c in candidates if _MAC.fullmatch(c)]
    if not _TIMESTAMP.fullmatch(t) or not candidates:
        return False
    if abs((time.time() if now is None else now) - int(t)) > tolerance_s:
        return False
    expected = [sign(body, s, int(t)).split("v1=", 1)[1] for s in secrets if s]
    return any(hmac.compare_digest(e, c) for e in expected for c in candidates)

"""What the tests of the HMAC-signing senders share: their signing rule and a delivery harness."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from libs.common.events import Envelope
from services.ingest.platforms.base import Normalized, PlatformAdapter, ShopContext


def hmac_sha256_base64(body: bytes, secret: str) -> str:
    """Exactly as Shopify, WooCommerce and AfterShip sign: base64 of HMAC-SHA256 of the raw body.

    Written out from their documentation, not taken from the adapters under test.
    """
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class Sender:
    """Delivers bodies to an adapter with a topic's signed headers, as the platform would."""

    adapter: PlatformAdapter
    shop: ShopContext
    secret: str
    headers: Callable[[str, bytes], dict[str, str]]

    def deliver(self, topic: str, body: bytes) -> Normalized:
        """The delivery normalised, after asserting that it verifies."""
        received = self.headers(topic, body)
        assert self.adapter.verify(body, received, [self.secret])
        return self.adapter.normalize(body, received, self.shop)

    def only(self, topic: str, body: bytes) -> Envelope:
        """The one event the delivery yields."""
        events = self.deliver(topic, body).events
        assert len(events) == 1, [event.type for event in events]
        return events[0]

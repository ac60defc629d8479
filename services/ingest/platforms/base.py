"""The contract every platform or carrier adapter fulfils.

An adapter is pure: it gets the raw body and headers of one delivery exactly as received,
verifies the signature against the shop's secrets, and normalises the payload into
canonical events. It does no I/O; the ingest endpoint owns the bus and the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from libs.common.events import Envelope


@dataclass(frozen=True)
class ShopContext:
    """What an adapter may know about the receiving shop."""

    shop_id: str
    currency: str
    timezone: str


class InvalidPayload(Exception):
    """The delivery is signed correctly but cannot be read; ingest answers 400/422."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


@dataclass
class Normalized:
    """The result of normalising one delivery.

    `events` may be empty: platforms send topics Huitou does not use (or pings), and those
    are answered 2xx and counted, never treated as errors. `delivery_id` is the platform's
    own id of this delivery (for dedupe of redeliveries), `topic` the platform's topic name
    (for metrics), and `response` the body the sender expects back, when it expects one.
    """

    topic: str
    events: list[Envelope] = field(default_factory=list)
    delivery_id: str | None = None
    response: bytes | None = None
    response_media_type: str = "application/json"


class PlatformAdapter(Protocol):
    """One per platform or carrier; registered by `name` in the ingest routes."""

    name: str

    def verify(self, body: bytes, headers: Mapping[str, str], secrets: Sequence[str]) -> bool:
        """True when the delivery is signed by one of the shop's current secrets."""
        ...

    def normalize(self, body: bytes, headers: Mapping[str, str], shop: ShopContext) -> Normalized:
        """Canonical events for this delivery; raises InvalidPayload when unreadable."""
        ...

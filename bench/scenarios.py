"""The ingest requests a load generator sends, as templates every generator shares.

A request body is `n.join(parts)`: a number `n`, unique per request (a run salt, the load
thread and a counter), becomes the event ids, customer ids and order ids, so neither the
ingest dedupe ledger nor lifecycle sees a repeat. Three scenarios:

- `single`: one canonical `order.paid` event to `POST /v1/events` (shop key);
- `batch`: a JSON array of `BATCH` such events;
- `shopify`: Shopify's own `orders/create` sample payload (tests/ingest/platforms/samples),
  signed with `X-Shopify-Hmac-Sha256` as Shopify signs it. Its keys are reordered (JSON
  objects are unordered) so the customer's and the order's `id` come last, and the fixed
  part is padded with JSON whitespace to a 64-byte boundary: a load generator can then
  keep the HMAC's SHA-256 state after the fixed part and hash only the last few bytes per
  request, which is what lets `wrk`'s Lua sign thousands of webhooks a second.

Each scenario also knows the bus messages ingest publishes for one request (`messages`),
which the bare endpoint and the raw producer publish instead, byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from libs.common.events import Envelope, parse_event, topic_for

ROOT = Path(__file__).resolve().parent.parent
SHOPIFY_SAMPLE = ROOT / "tests/ingest/platforms/samples/shopify/orders_create.json"
SHOPIFY_SECRET = "shpss_bench_secret"
BATCH = 100
NAMES = ("single", "shopify", "batch")


@dataclass
class Message:
    """One bus message ingest publishes: its event type (which picks the topic), key and
    value."""

    type: str
    id: str
    key: str
    value: str


@dataclass
class Scenario:
    name: str
    path: str
    headers: dict[str, str]
    parts: list[str]
    events: int
    """Events per request."""
    secret: str | None = None
    """Shopify's HMAC secret; `parts[0]` is then the fixed, 64-byte aligned prefix."""
    messages: list[Message] = field(default_factory=list)

    def body(self, n: int) -> bytes:
        return str(n).join(self.parts).encode()

    def request_headers(self, body: bytes, n: int) -> dict[str, str]:
        if self.secret is None:
            return dict(self.headers)
        digest = hmac.new(self.secret.encode(), body, hashlib.sha256).digest()
        return {
            **self.headers,
            "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
            "X-Shopify-Webhook-Id": f"bench-{n}",
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Scenario:
        raw = dict(raw)
        raw["messages"] = [Message(**m) for m in raw.get("messages", [])]
        return cls(**raw)

    def save(self, path: Path) -> Path:
        path.write_bytes(orjson.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: Path) -> Scenario:
        return cls.from_json(orjson.loads(path.read_bytes()))


def run_salt() -> int:
    """A number that keeps this run's ids apart from every earlier run's."""
    return 1000 + secrets.randbelow(8000)


def request_number(salt: int, thread: int, counter: int) -> int:
    """Unique per request, below 2**53 so Lua's doubles print it exactly."""
    return salt * 10**12 + thread * 10**9 + counter


def canonical_event(shop_id: str, n: str, index: str = "") -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    customer = f"bench-c{n}{index}"
    return {
        "specversion": "1.0",
        "id": f"bench-evt-{n}{index}",
        "source": f"bench/{shop_id}",
        "type": "order.paid",
        "time": now,
        "shop_id": shop_id,
        "subject": customer,
        "schema_version": 1,
        "data": {
            "order_id": f"bench-o{n}{index}",
            "status": "paid",
            "customer": {"id": customer, "name": "王芳", "phone": "13800138000"},
            "total": {"amount_minor": 25900, "currency": "CNY"},
            "items": [
                {
                    "sku": "LJ-250",
                    "title": "龙井 250g",
                    "quantity": 1,
                    "price": {"amount_minor": 25900, "currency": "CNY"},
                }
            ],
            "shipping": {"country": "CN", "province": "浙江省", "city": "杭州市"},
            "created_at": now,
            "paid_at": now,
        },
    }


MARK = "@@N@@"


def _split(template: bytes) -> list[str]:
    return template.decode().split(MARK)


def _messages(events: list[Envelope]) -> list[Message]:
    return [Message(e.type, e.id, e.key, e.to_bytes().decode()) for e in events]


def single(shop_id: str, key: str) -> Scenario:
    template = orjson.dumps(canonical_event(shop_id, MARK))
    scenario = Scenario(
        "single",
        "/v1/events",
        {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        _split(template),
        events=1,
    )
    sample = orjson.loads(scenario.body(1))
    scenario.messages = _messages([parse_event(sample)])
    return scenario


def batch(shop_id: str, key: str, size: int = BATCH) -> Scenario:
    template = orjson.dumps([canonical_event(shop_id, MARK, f"-{i}") for i in range(size)])
    scenario = Scenario(
        "batch",
        "/v1/events",
        {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        _split(template),
        events=size,
    )
    scenario.messages = _messages([parse_event(e) for e in orjson.loads(scenario.body(1))])
    return scenario


def shopify_payload(*, fresh: bool = False) -> dict[str, Any]:
    """Shopify's sample `orders/create` body; `fresh` makes it an open order placed now
    (the end-to-end path expects the customer to become `interested`) by a customer with
    a mobile number (the sample has none), whom a reminder can reach."""
    payload: dict[str, Any] = orjson.loads(SHOPIFY_SAMPLE.read_bytes())
    payload["currency"] = "CNY"  # the bench's shops sell in CNY (one shop, one currency)
    if fresh:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        payload.update(
            created_at=now,
            updated_at=now,
            processed_at=now,
            cancelled_at=None,
            cancel_reason=None,
            financial_status="pending",
        )
        payload["customer"] = {**payload["customer"], "phone": "+8613800138000"}
    return payload


def shopify_parts(payload: dict[str, Any]) -> list[str]:
    """The payload as [aligned prefix, '},"id":', '}']: body = prefix n},"id":n}."""
    customer = {k: v for k, v in payload["customer"].items() if k != "id"}
    order = {k: v for k, v in payload.items() if k not in ("id", "customer")}
    head = orjson.dumps(order)[:-1] + b',"customer":' + orjson.dumps(customer)[:-1] + b","
    pad = -(len(head) + len(b'"id":')) % 64
    prefix = head + b" " * pad + b'"id":'
    assert len(prefix) % 64 == 0
    return [prefix.decode(), '},"id":', "}"]


def shopify(shop_id: str, *, fresh: bool = False) -> Scenario:
    from services.ingest.platforms.base import ShopContext
    from services.ingest.platforms.shopify import ShopifyAdapter

    scenario = Scenario(
        "shopify",
        f"/v1/webhooks/shopify/{shop_id}",
        {
            "Content-Type": "application/json",
            "X-Shopify-Topic": "orders/create",
            "X-Shopify-Shop-Domain": f"{shop_id}.myshopify.com",
        },
        shopify_parts(shopify_payload(fresh=fresh)),
        events=1,
        secret=SHOPIFY_SECRET,
    )
    body = scenario.body(request_number(1000, 0, 1))
    normalized = ShopifyAdapter().normalize(
        body,
        scenario.request_headers(body, 1),
        ShopContext(shop_id=shop_id, currency="CNY", timezone="Asia/Shanghai"),
    )
    scenario.messages = _messages(list(normalized.events))
    return scenario


def build(name: str, shop_id: str, key: str) -> Scenario:
    if name == "single":
        return single(shop_id, key)
    if name == "batch":
        return batch(shop_id, key)
    return shopify(shop_id)


def bus_topic(message: Message, namespace: str) -> str:
    return topic_for(message.type, namespace)

"""The canonical event envelope and the v1 data schemas every service speaks.

Platform payloads are normalised into these at the edge (ingest); nothing downstream knows
what a Shopify or Kuaidi100 payload looks like. Within schema version 1 changes are additive
only: every data model accepts (and keeps) fields it does not know yet.

Bounds: whatever these schemas accept, every consumer can store, so ingest refuses the rest
with a 422 naming the field instead of answering 2xx and dead-lettering it later:

- money in events (`EventMoney`): 0 ≤ `amount_minor` ≤ 10^13 (a hundred billion yuan or
  dollars; totals, prices and refunds alike, never negative); an item's `quantity` is 1 to
  100,000 and an order has at most 500 items, so every sum of one order (item counts,
  amounts) stays far inside the int32/int64 columns it lands in;
- times (`UtcDatetime`): from 1970-01-01 to before 2100-01-01 UTC, judged after conversion
  to UTC (an offset that would move the time out of Python's range is refused too);
- text: no NUL (U+0000, which PostgreSQL cannot store in text) in any text field, and each
  field at most as long as the column it is stored in. Field → column (lifecycle unless
  named otherwise; checked by `tests/ingest/test_bounds.py`):

  ====================================  ===========================================  =====
  field                                 column                                       limit
  ====================================  ===========================================  =====
  envelope `id`, `source` (NonEmpty)    processed_events.event_id, ingest_ledger       200
                                        .dedupe_key (`shop_id|source|id`, 600)
  envelope `source` (first segment)     customers.source (200 since m0003)             200
  envelope `subject`, customer.id       customers.customer_id, orders.customer_id,     200
                                        customer_identities.value (320)
  `shop_id` (ShopId)                    every shop_id column (64)                       63
  customer.name                         customers.name                                 200
  customer.phone (E.164 once            customers.phone (32), customer_identities      16
  normalised; 64 as sent)               .value; the customer id when it is the id
  customer.email                        customers.email (320), customer_identities     200
                                        .value; customers.customer_id (200) when the
                                        email is the customer's id
  order_id (orders and logistics)       orders.order_id, order_tracking.order_id       200
  shipping.province / .city             orders.shipping_province / _city,              100
                                        customers.province / .city
  tracking_number                       order_tracking.tracking_number                 100
  carrier                               order_tracking.carrier                          64
  total / refund `amount_minor`         orders.total_minor, refunded_minor (bigint)   10^13
  total / price `currency`              orders.currency, customers.currency (3)      3 A-Z
  sum of items' `quantity`              orders.item_count (int32)                   5*10^7
  ====================================  ===========================================  =====

  Fields no column stores are bounded too, generously: `country`/`district` 100, `sku`
  200, `title` 500, a checkpoint's `description` 2,000, a logistics `reason` 200.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import phonenumbers
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

SCHEMA_VERSION: Final = 1
DEFAULT_PHONE_REGION = "CN"
"""Region assumed for phone numbers given without a country code (most shops sell in China)."""

_SHOP_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


MAX_AMOUNT_MINOR: Final = 10**13
"""The largest amount of money an event may carry, in minor units."""
MAX_QUANTITY: Final = 100_000
MAX_ITEMS: Final = 500
MIN_TIME: Final = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIME: Final = datetime(2100, 1, 1, tzinfo=UTC)
"""Times are accepted from MIN_TIME (included) to MAX_TIME (excluded), in UTC."""
PLACE_MAX: Final = 100
NAME_MAX: Final = 200
TITLE_MAX: Final = 500
DESCRIPTION_MAX: Final = 2000
REASON_MAX: Final = 200
TRACKING_NUMBER_MAX: Final = 100
CARRIER_MAX: Final = 64


def to_utc(value: datetime) -> datetime:
    """Return an aware datetime converted to UTC, refusing (ValueError) one outside
    [MIN_TIME, MAX_TIME) — also one whose offset would move it out of Python's range."""
    try:
        converted = value.astimezone(UTC)
    except OverflowError:
        converted = None
    if converted is None or not MIN_TIME <= converted < MAX_TIME:
        raise ValueError(f"must lie from {MIN_TIME:%Y-%m-%d} to before {MAX_TIME:%Y-%m-%d} UTC")
    return converted


def no_nul(value: str) -> str:
    """Refuse text holding NUL: PostgreSQL cannot store it, and C code would cut it short."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    return value


@functools.lru_cache(maxsize=65_536)
def normalize_phone(value: str, region: str = DEFAULT_PHONE_REGION) -> str:
    """Normalise a phone number to E.164, raising ValueError when it is not a valid number.
    Cached (bounded): returning customers send the same numbers again and again."""
    try:
        parsed = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc}") from exc
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError("not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _email(value: str) -> str:
    value = value.strip()
    if not _EMAIL.match(value):
        raise ValueError("not an email address")
    local, domain = value.rsplit("@", 1)
    return f"{local}@{domain.lower()}"


UtcDatetime = Annotated[AwareDatetime, AfterValidator(to_utc)]
TRUSTED: Final = {"trusted": True}
"""Validation context for events read back from the bus: ingest normalised them already,
so the costly normalisations (phone parsing) are not run again on every consumer."""


def _phone_field(value: str, info: ValidationInfo) -> str:
    if info.context is not None and info.context.get("trusted"):
        return value
    return normalize_phone(value)


def _email_field(value: str, info: ValidationInfo) -> str:
    if info.context is not None and info.context.get("trusted"):
        return value
    return _email(value)


NoNul = AfterValidator(no_nul)
Phone = Annotated[str, Field(max_length=64), AfterValidator(_phone_field)]
"""At most 64 characters as sent (which also bounds the normalisation cache); E.164 after."""
Email = Annotated[str, Field(max_length=NAME_MAX), NoNul, AfterValidator(_email_field)]
"""At most 200 characters: an email is the customer's id when it is all there is."""
ShopId = Annotated[str, Field(pattern=_SHOP_ID)]
NonEmpty = Annotated[str, Field(min_length=1, max_length=200), NoNul]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
Name = Annotated[str, Field(max_length=NAME_MAX), NoNul]
PlaceName = Annotated[str, Field(max_length=PLACE_MAX), NoNul]
Sku = Annotated[str, Field(max_length=200), NoNul]
Title = Annotated[str, Field(max_length=TITLE_MAX), NoNul]
Description = Annotated[str, Field(max_length=DESCRIPTION_MAX), NoNul]
Reason = Annotated[str, Field(max_length=REASON_MAX), NoNul]
OrderId = Annotated[str, Field(max_length=200), NoNul]
TrackingNumber = Annotated[str, Field(max_length=TRACKING_NUMBER_MAX), NoNul]
Carrier = Annotated[str, Field(max_length=CARRIER_MAX), NoNul]
Quantity = Annotated[int, Field(ge=1, le=MAX_QUANTITY)]


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Money(_Data):
    """An amount in integer minor units (fen, cents) of an ISO 4217 currency.

    Unbounded: figures derived from many events (a customer's monetary value) use it too.
    Events carry `EventMoney`."""

    amount_minor: int
    currency: Currency


class EventMoney(Money):
    """Money as an event carries it: 0 ≤ `amount_minor` ≤ MAX_AMOUNT_MINOR (10^13)."""

    amount_minor: Annotated[int, Field(ge=0, le=MAX_AMOUNT_MINOR)]


class Customer(_Data):
    """Who placed an order or acted; `id` is the platform's customer id when it has one."""

    id: NonEmpty | None = None
    name: Name | None = None
    phone: Phone | None = None
    email: Email | None = None


class Address(_Data):
    country: PlaceName | None = None
    province: PlaceName | None = None
    city: PlaceName | None = None
    district: PlaceName | None = None


class OrderItem(_Data):
    sku: Sku | None = None
    title: Title | None = None
    quantity: Quantity = 1
    price: EventMoney | None = None


ORDER_STATUSES = ("created", "paid", "shipped", "completed", "cancelled", "refunded")
OrderStatus = Literal["created", "paid", "shipped", "completed", "cancelled", "refunded"]


class OrderData(_Data):
    """Data of every `order.*` event: the order as the platform knew it at event time."""

    order_id: NonEmpty
    customer: Customer
    status: OrderStatus
    total: EventMoney | None = None
    """The order's total; platforms that omit it on some messages (refund notices) leave
    it out, and consumers keep the total they already know."""
    items: Annotated[list[OrderItem], Field(max_length=MAX_ITEMS)] = Field(default_factory=list)
    shipping: Address | None = None
    created_at: UtcDatetime | None = None
    paid_at: UtcDatetime | None = None
    cancelled_at: UtcDatetime | None = None
    shipped_at: UtcDatetime | None = None
    completed_at: UtcDatetime | None = None
    refunded_at: UtcDatetime | None = None
    refund: EventMoney | None = None
    """For `order.refunded`: the amount refunded by this refund (partial refunds allowed)."""
    tracking_number: TrackingNumber | None = None
    carrier: Carrier | None = None


LOGISTICS_STATUSES = (
    "picked_up",
    "in_transit",
    "arrived_city",
    "out_for_delivery",
    "delivered",
    "exception",
    "returned",
)


class Checkpoint(_Data):
    time: UtcDatetime | None = None
    province: PlaceName | None = None
    city: PlaceName | None = None
    description: Description | None = None


class LogisticsData(_Data):
    """Data of every `logistics.*` event: one tracking update of one parcel."""

    tracking_number: Annotated[str, Field(min_length=1, max_length=TRACKING_NUMBER_MAX), NoNul]
    carrier: Annotated[str, Field(min_length=1, max_length=CARRIER_MAX), NoNul]
    status: Literal[
        "picked_up",
        "in_transit",
        "arrived_city",
        "out_for_delivery",
        "delivered",
        "exception",
        "returned",
    ]
    checkpoint: Checkpoint | None = None
    order_id: OrderId | None = None
    customer: Customer | None = None
    destination: Address | None = None
    reason: Reason | None = None
    """Why, for `logistics.exception` (required there)."""


class BehaviorData(_Data):
    """Data of `cart.added`, `item.favorited` and `shop.favorited`."""

    customer: Customer
    sku: Sku | None = None
    title: Title | None = None
    quantity: Quantity = 1
    price: EventMoney | None = None
    occurred_at: UtcDatetime | None = None


class StageChangedData(_Data):
    customer_id: NonEmpty
    previous: str | None
    current: str
    returning: bool = False


class TagChangedData(_Data):
    customer_id: NonEmpty
    tag: NonEmpty


TagName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\s/][^/]*$"), NoNul]
"""A tag's name, as lifecycle defines tags."""


class TagRequestedData(_Data):
    """`customer.tag_requested`: another service (a journey's tag step) asks lifecycle to
    give a manual tag to a customer or take it away. Lifecycle creates the manual tag when
    the shop has none of that name; it never overrides an automatic tag's rule."""

    customer_id: NonEmpty
    tag: TagName
    action: Literal["add", "remove"]
    requested_by: NonEmpty | None = None


class CustomerMergedData(_Data):
    """`customer.merged`: profiles found to be one person were folded into `customer_id`."""

    customer_id: NonEmpty
    merged_ids: list[NonEmpty]


class LevelChangedData(_Data):
    customer_id: NonEmpty
    previous: str | None
    current: str | None


class PredictionChangedData(_Data):
    """A customer's repurchase figures (lifecycle's model): on their first figures, after
    each purchase, and when P(alive) crosses one of the shop's thresholds; `reason` says
    which (`first`, `purchase`, `threshold`)."""

    customer_id: NonEmpty
    reason: Literal["first", "purchase", "threshold"] | None = None
    p_alive: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    expected_purchases_90d: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    next_purchase_at: datetime | None = None
    previous_p_alive: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None


class NotificationRequestedData(_Data):
    """A message a journey wants sent; the notifier sends it at most once per key."""

    idempotency_key: NonEmpty
    channel: Literal["sms", "email"]
    customer_id: NonEmpty
    template: NonEmpty
    to: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)


class NotificationStatusData(_Data):
    idempotency_key: NonEmpty
    status: Literal["sent", "delivered", "failed", "suppressed", "skipped"]
    channel: Literal["sms", "email"]
    reason: str | None = None
    provider: str | None = None
    provider_message_id: str | None = None


class ShopData(_Data):
    """`shop.registered` / `shop.updated`: what every service may know about a shop."""

    shop_id: ShopId
    name: NonEmpty
    timezone: NonEmpty
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]


class ShopKeyData(_Data):
    """`shop.key_issued` / `shop.key_revoked`: an API key by its SHA-256, never the key."""

    shop_id: ShopId
    key_id: NonEmpty
    key_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class LogisticsExceptionData(LogisticsData):
    reason: NonEmpty


ORDER_TYPES = tuple(f"order.{s}" for s in ORDER_STATUSES)
LOGISTICS_TYPES = tuple(f"logistics.{s}" for s in LOGISTICS_STATUSES)
BEHAVIOR_TYPES = ("cart.added", "item.favorited", "shop.favorited")
CUSTOMER_TYPES = (
    "customer.stage_changed",
    "customer.tag_added",
    "customer.tag_removed",
    "customer.level_changed",
    "customer.prediction_changed",
    "customer.merged",
    "customer.tag_requested",
)
NOTIFICATION_TYPES = ("notification.requested", "notification.status")
SHOP_TYPES = ("shop.registered", "shop.updated", "shop.key_issued", "shop.key_revoked")
INGESTIBLE_TYPES = frozenset(ORDER_TYPES + LOGISTICS_TYPES + BEHAVIOR_TYPES)
"""Types that come from outside (platforms, carriers, the canonical API)."""

DATA_SCHEMAS: dict[str, type[_Data]] = {
    **dict.fromkeys(ORDER_TYPES, OrderData),
    **dict.fromkeys(LOGISTICS_TYPES, LogisticsData),
    "logistics.exception": LogisticsExceptionData,
    **dict.fromkeys(BEHAVIOR_TYPES, BehaviorData),
    "customer.stage_changed": StageChangedData,
    "customer.tag_added": TagChangedData,
    "customer.tag_removed": TagChangedData,
    "customer.level_changed": LevelChangedData,
    "customer.prediction_changed": PredictionChangedData,
    "customer.merged": CustomerMergedData,
    "customer.tag_requested": TagRequestedData,
    "notification.requested": NotificationRequestedData,
    "notification.status": NotificationStatusData,
    "shop.registered": ShopData,
    "shop.updated": ShopData,
    "shop.key_issued": ShopKeyData,
    "shop.key_revoked": ShopKeyData,
}
"""Every event type of schema version 1 and the model of its `data`."""

TOPIC_OF_FAMILY = {
    "order": "orders",
    "logistics": "logistics",
    "cart": "behavior",
    "item": "behavior",
    "shop": "behavior",
    "customer": "customers",
    "notification": "notifications",
}


def topic_for(event_type: str, namespace: str = "") -> str:
    """The versioned topic that carries an event type, e.g. `huitou.orders.v1`."""
    family = event_type.split(".", 1)[0]
    name = TOPIC_OF_FAMILY[family]
    if event_type in SHOP_TYPES:
        name = "shops"
    elif event_type == "notification.status":
        name = "notifications.status"
    elif family == "notification":
        name = "notifications.requested"
    return topic_name(name, namespace)


def topic_name(name: str, namespace: str = "") -> str:
    """Full topic name of a logical stream (`orders`) within an optional namespace."""
    return f"{namespace}huitou.{name}.v{SCHEMA_VERSION}"


class Envelope(BaseModel):
    """CloudEvents 1.0 attributes plus Huitou's `shop_id`, `schema_version` and typed `data`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: NonEmpty
    source: NonEmpty
    type: NonEmpty
    time: UtcDatetime
    shop_id: ShopId
    subject: NonEmpty | None = None
    schema_version: Literal[1] = SCHEMA_VERSION
    data: dict[str, Any]

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in DATA_SCHEMAS:
            raise ValueError(f"unknown event type {value!r}")
        return value

    @property
    def dedupe_key(self) -> str:
        """`shop_id` + `source` + `id`: CloudEvents makes `source` + `id` unique per sender,
        and a sender posting for a shop speaks only for that shop, so one shop's events can
        never collide with (and hide) another's, whatever ids either chooses."""
        return f"{self.shop_id}|{self.source}|{self.id}"

    @property
    def key(self) -> str:
        """Partition key: the one thing each family's state is merged by, so its events
        are applied in the order they were produced (one partition, one consumer).

        Order events go by order (`shop:order:<order_id>`): a customer's identity is not
        known at the edge (an order's later events may name only its email), but the order
        is, and every fact about it lands in order; the customer's figures are re-derived
        from its orders under its row lock, whatever partitions their orders came through.
        Parcel updates go by tracking number, everything else by its subject (the customer).
        """
        data = self.data
        if self.type.startswith("order.") and data.get("order_id"):
            return f"{self.shop_id}:order:{data['order_id']}"
        if self.type.startswith("logistics.") and data.get("tracking_number"):
            return f"{self.shop_id}:parcel:{data['tracking_number']}"
        return f"{self.shop_id}:{self.subject or self.fallback_subject()}"

    def fallback_subject(self) -> str:
        for name in ("customer_id", "order_id", "tracking_number"):
            value = self.data.get(name)
            if value:
                return str(value)
        customer = self.data.get("customer") or {}
        return str(customer.get("id") or customer.get("phone") or customer.get("email") or "")

    def typed_data(self) -> _Data:
        """The data as its type's model. Events are validated in full when they enter
        (`parse_event`); here phones and emails are taken as already normalised."""
        return DATA_SCHEMAS[self.type].model_validate(self.data, context=TRUSTED)

    def to_bytes(self) -> bytes:
        """The event as JSON, serialised in one pass by pydantic-core."""
        return self.__pydantic_serializer__.to_json(self)


def parse_event(raw: Any) -> Envelope:
    """Validate a canonical event (envelope and data) and return it normalised.

    Raises pydantic's ValidationError whose locations name the failing field, with data
    fields under `data.` so an API caller sees e.g. `data.total.amount_minor`.
    """
    envelope = Envelope.model_validate(raw)
    model = DATA_SCHEMAS[envelope.type]
    try:
        data = model.model_validate(envelope.data)
    except ValidationError as exc:
        raise ValidationError.from_exception_data(
            "Envelope",
            [
                {
                    "type": err["type"],
                    "loc": ("data", *err["loc"]),
                    "input": err["input"],
                    "ctx": err.get("ctx", {}),
                }
                for err in exc.errors()
            ],
        ) from None
    subject = envelope.subject
    if subject is None and isinstance(data, OrderData | BehaviorData):
        subject = data.customer.id or data.customer.phone or data.customer.email
    # `envelope` was just validated and nobody else holds it: set the two fields in place
    # (model_copy deep-copied it and was the costliest step of ingest's profile).
    return set_validated(
        envelope, data=data.model_dump(mode="json", exclude_none=True), subject=subject
    )


def set_validated(envelope: Envelope, **fields: Any) -> Envelope:
    """Set fields of a freshly validated envelope that no one else holds yet, with values
    already validated, in place: no copy and no second validation of the whole envelope."""
    envelope.__dict__.update(fields)
    envelope.__pydantic_fields_set__.update(fields)
    return envelope


def decode_event(value: bytes) -> Envelope:
    """Decode an envelope read from the bus (validated in full when it was produced)."""
    return Envelope.model_validate_json(value, context=TRUSTED)


def new_event(
    *,
    type: str,
    shop_id: str,
    source: str,
    data: _Data,
    subject: str | None,
    id: str,
    time: datetime | None = None,
) -> Envelope:
    """Build an envelope for an event a service emits itself."""
    return Envelope(
        id=id,
        source=source,
        type=type,
        time=time or datetime.now(UTC),
        shop_id=shop_id,
        subject=subject,
        data=data.model_dump(mode="json", exclude_none=True),
    )

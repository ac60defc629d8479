"""The canonical event envelope and the v1 data schemas every service speaks.

Platform payloads are normalised into these at the edge (ingest); nothing downstream knows
what a Shopify or Kuaidi100 payload looks like. Within schema version 1 changes are additive
only: every data model accepts (and keeps) fields it does not know yet.
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


def to_utc(value: datetime) -> datetime:
    """Return an aware datetime converted to UTC."""
    return value.astimezone(UTC)


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


Phone = Annotated[str, AfterValidator(_phone_field)]
Email = Annotated[str, AfterValidator(_email_field)]
ShopId = Annotated[str, Field(pattern=_SHOP_ID)]
NonEmpty = Annotated[str, Field(min_length=1, max_length=200)]


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Money(_Data):
    """An amount in integer minor units (fen, cents) of an ISO 4217 currency."""

    amount_minor: int
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]


class Customer(_Data):
    """Who placed an order or acted; `id` is the platform's customer id when it has one."""

    id: NonEmpty | None = None
    name: str | None = None
    phone: Phone | None = None
    email: Email | None = None


class Address(_Data):
    country: str | None = None
    province: str | None = None
    city: str | None = None
    district: str | None = None


class OrderItem(_Data):
    sku: str | None = None
    title: str | None = None
    quantity: Annotated[int, Field(ge=1)] = 1
    price: Money | None = None


ORDER_STATUSES = ("created", "paid", "shipped", "completed", "cancelled", "refunded")
OrderStatus = Literal["created", "paid", "shipped", "completed", "cancelled", "refunded"]


class OrderData(_Data):
    """Data of every `order.*` event: the order as the platform knew it at event time."""

    order_id: NonEmpty
    customer: Customer
    status: OrderStatus
    total: Money | None = None
    """The order's total; platforms that omit it on some messages (refund notices) leave
    it out, and consumers keep the total they already know."""
    items: list[OrderItem] = Field(default_factory=list)
    shipping: Address | None = None
    created_at: UtcDatetime | None = None
    paid_at: UtcDatetime | None = None
    cancelled_at: UtcDatetime | None = None
    shipped_at: UtcDatetime | None = None
    completed_at: UtcDatetime | None = None
    refunded_at: UtcDatetime | None = None
    refund: Money | None = None
    """For `order.refunded`: the amount refunded by this refund (partial refunds allowed)."""
    tracking_number: str | None = None
    carrier: str | None = None


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
    province: str | None = None
    city: str | None = None
    description: str | None = None


class LogisticsData(_Data):
    """Data of every `logistics.*` event: one tracking update of one parcel."""

    tracking_number: NonEmpty
    carrier: NonEmpty
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
    order_id: str | None = None
    customer: Customer | None = None
    destination: Address | None = None
    reason: str | None = None
    """Why, for `logistics.exception` (required there)."""


class BehaviorData(_Data):
    """Data of `cart.added`, `item.favorited` and `shop.favorited`."""

    customer: Customer
    sku: str | None = None
    title: str | None = None
    quantity: Annotated[int, Field(ge=1)] = 1
    price: Money | None = None
    occurred_at: UtcDatetime | None = None


class StageChangedData(_Data):
    customer_id: NonEmpty
    previous: str | None
    current: str
    returning: bool = False


class TagChangedData(_Data):
    customer_id: NonEmpty
    tag: NonEmpty


class CustomerMergedData(_Data):
    """`customer.merged`: profiles found to be one person were folded into `customer_id`."""

    customer_id: NonEmpty
    merged_ids: list[NonEmpty]


class LevelChangedData(_Data):
    customer_id: NonEmpty
    previous: str | None
    current: str | None


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
    "customer.merged",
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
    "customer.merged": CustomerMergedData,
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
        """`source` + `id`: what CloudEvents makes unique, so two senders never collide."""
        return f"{self.source}|{self.id}"

    @property
    def key(self) -> str:
        """Partition key `shop_id:customer_id`, so one customer's events stay in order."""
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
    envelope.__dict__["data"] = data.model_dump(mode="json", exclude_none=True)
    envelope.__dict__["subject"] = subject
    envelope.__pydantic_fields_set__.update(("data", "subject"))
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

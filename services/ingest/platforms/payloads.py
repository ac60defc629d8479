"""Helpers shared by the platform and carrier adapters: reading payloads, building events.

Every adapter gets a raw body and headers and turns them into canonical envelopes. What they
have in common lives here: signature comparison over the shop's current secrets, header and
JSON reading, lenient access to loosely typed JSON (`as_object`, `as_list`, `text`), strict
access where a field is required (`required_*`, `objects`, `missing`: a 422 naming the
field's path), money in integer minor units, timestamps, customers, places and checkpoints,
and `ShopEvents`, which gives one platform's events for one shop their ids and validates
them. What is particular to one platform's payloads stays in its adapter.

Bounds (those of `libs.common.events`): an amount beyond 10^13 minor units, a time outside
1970-01-01 to 2100-01-01 UTC (also one an offset would push out of Python's range), a
quantity beyond 100,000 or more than 500 lines is refused with a 422 naming the platform's
field, before anything is computed from it; anything else the canonical schema refuses
(an identifier longer than its column, a NUL) is a 422 from `ShopEvents.build`. Descriptive
text a buyer, merchant or carrier typed (names, titles, places, checkpoint descriptions)
is cut to its field's limit instead: refusing the delivery would lose the order over a
cosmetic field, and the platform would retry it in vain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import partial
from typing import Any, Final, NoReturn, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import TypeAdapter, ValidationError

from libs.common.events import (
    DEFAULT_PHONE_REGION,
    DESCRIPTION_MAX,
    MAX_AMOUNT_MINOR,
    MAX_ITEMS,
    MAX_QUANTITY,
    MAX_TIME,
    MIN_TIME,
    NAME_MAX,
    PLACE_MAX,
    TITLE_MAX,
    Customer,
    Envelope,
    NonEmpty,
    normalize_phone,
    parse_event,
    set_validated,
)
from services.ingest.platforms.base import InvalidPayload, ShopContext

JsonObject = dict[str, Any]
T = TypeVar("T")

_SUBJECT: Final = TypeAdapter[str | None](NonEmpty | None)
"""An event subject as the envelope holds it (checked apart: see `ShopEvents.build`)."""

CHINA_TIME: Final = timezone(timedelta(hours=8), "Asia/Shanghai")
"""UTC+8 without DST (China since 1991): the zone of TOP and Kuaidi100 timestamps."""

_CURRENCY_EXPONENTS = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG"), 0),
    **dict.fromkeys(("RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    **dict.fromkeys(("CLF", "UYW"), 4),
}
"""ISO 4217 minor-unit exponents that are not 2."""


@dataclass(frozen=True)
class ShopEvents:
    """Builds one platform's canonical events for one shop: ids, source and validation."""

    platform: str
    context: ShopContext

    @property
    def tz(self) -> tzinfo:
        """The shop's timezone, assumed for timestamps given without an offset."""
        return zone(self.context.timezone)

    def build(
        self, event_type: str, key: Sequence[str], *, time: datetime, data: JsonObject
    ) -> Envelope:
        """A validated envelope with id `{platform}:{shop_id}:{key...}`; bad data is a 422.

        The subject is the customer's id, else phone, else email (`subject_of`); None when
        the data names no customer (carrier events). The data is validated first, so that an
        unusable customer id is named `data.customer.id` rather than `subject`.
        """
        shop_id = self.context.shop_id
        raw = {
            "id": ":".join((self.platform, shop_id, *key)),
            "source": f"{self.platform}/{shop_id}",
            "type": event_type,
            "time": time,
            "shop_id": shop_id,
            "data": data,
        }
        try:
            event = parse_event(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "body"
            raise InvalidPayload(field, f"{event_type}: {error['msg']}") from exc
        try:
            subject = _SUBJECT.validate_python(subject_of(as_object(data.get("customer"))))
        except ValidationError as exc:
            raise InvalidPayload("subject", f"{event_type}: {exc.errors()[0]['msg']}") from exc
        # Validating the whole envelope again for one field was a fifth of a Shopify
        # webhook's cost in ingest's profile.
        return set_validated(event, subject=subject)


def zone(name: str) -> tzinfo:
    """The IANA timezone `name`; UTC when it is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's stripped value, matching its name case-insensitively; None when empty."""
    value = headers.get(name)
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    if value is None:
        return None
    return value.strip() or None


def secret_signs(received: str, secrets: Sequence[str], expected: Callable[[str], str]) -> bool:
    """True when `received` is `expected(secret)` for one of the shop's non-empty secrets.

    Compared in constant time against every secret (rotation); an empty secret never
    matches, as it would make anyone's signature valid.
    """
    got = received.encode("utf-8", "surrogatepass")
    matched = False
    for secret in secrets:
        if secret:
            matched |= hmac.compare_digest(expected(secret).encode(), got)
    return matched


def hmac_sha256_base64(body: bytes, secret: str) -> str:
    """Standard base64 of HMAC-SHA256(key = secret as UTF-8, message = raw body)."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def signature_matches(body: bytes, signature: str, secrets: Sequence[str]) -> bool:
    """True when `signature` is base64(HMAC-SHA256(secret, body)) for one of the secrets."""
    return secret_signs(signature.strip(), secrets, partial(hmac_sha256_base64, body))


def load_json_object(
    raw: bytes | str, field: str = "body", *, non_object_status: int = 422
) -> JsonObject:
    """`raw` as a JSON object: malformed JSON is a 400, another JSON value `non_object_status`."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(field, f"malformed JSON: {exc}", status=400) from exc
    if not isinstance(payload, dict):
        raise InvalidPayload(field, "expected a JSON object", status=non_object_status)
    return payload


def as_object(value: Any) -> JsonObject:
    """`value` when it is a JSON object, else an empty one (for optional parts)."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """`value` when it is a JSON array, else an empty one (for optional parts)."""
    return value if isinstance(value, list) else []


def required_object(document: JsonObject, key: str, field: str) -> JsonObject:
    """`document[key]`, which must be a JSON object; else a 422 naming `field`."""
    value = document.get(key)
    if not isinstance(value, dict):
        raise InvalidPayload(field, "missing or not an object")
    return value


def objects(value: Any, field: str) -> list[JsonObject]:
    """A JSON array of objects (None: empty); anything else is a 422 naming `field[i]`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidPayload(field, "not a list")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidPayload(f"{field}[{index}]", "not an object")
    return value


def text(value: Any) -> str | None:
    """A string or number as stripped text; None for anything else or blank."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value).strip() or None


def required_text(document: JsonObject, key: str, field: str) -> str:
    """`document[key]` as text (see `text`); a 422 naming `field` when absent or blank."""
    return text(document.get(key)) or missing(field)


def required_string(document: JsonObject, key: str, field: str) -> str:
    """`document[key]` exactly as given, which must be a non-empty string; else a 422."""
    value = document.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidPayload(field, "missing or not a string")
    return value


def missing(field: str) -> NoReturn:
    """Reject the delivery for want of a required field."""
    raise InvalidPayload(field, "required")


def currency_code(value: Any, fallback: str) -> str:
    """An upper-case currency code: `value` when given as text, else `fallback`."""
    return (text(value) or fallback).upper()


def minor_units(value: Any, currency: str, field: str, *, rounded: bool = False) -> int:
    """A decimal amount in integer minor units of `currency` (JPY 0 decimals, most 2).

    More decimals than the currency has is an error unless `rounded` (half up) is asked for,
    for prices a platform derives by division.
    """
    if value is None:
        missing(field)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidPayload(field, "expected a decimal amount")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidPayload(field, f"not a decimal amount: {value!r}") from None
    if not amount.is_finite():
        raise InvalidPayload(field, f"not a decimal amount: {value!r}")
    # Bounded before scaling and int(): `1e999999999` overflows the decimal context.
    beyond = InvalidPayload(field, f"more than {MAX_AMOUNT_MINOR} minor units of {currency}")
    if amount.copy_abs() > MAX_AMOUNT_MINOR:
        raise beyond
    scaled = amount.scaleb(_CURRENCY_EXPONENTS.get(currency, 2))
    if abs(scaled) > MAX_AMOUNT_MINOR:
        raise beyond
    whole = scaled.to_integral_value(rounding=ROUND_HALF_UP)
    underflowed = scaled == 0 and amount != 0  # `1e-999999999` scales to an exact 0
    if (whole != scaled or underflowed) and not rounded:
        raise InvalidPayload(field, f"{value} has more decimals than {currency} allows")
    return int(whole)


def money(value: Any, currency: str, field: str, *, rounded: bool = False) -> JsonObject:
    """Canonical money of a decimal amount (see `minor_units`)."""
    return money_minor(minor_units(value, currency, field, rounded=rounded), currency)


def money_minor(amount_minor: int, currency: str) -> JsonObject:
    """Canonical money of an amount already in minor units."""
    return {"amount_minor": amount_minor, "currency": currency}


def optional_time(document: JsonObject, key: str, field: str, tz: tzinfo) -> datetime | None:
    """An ISO 8601 timestamp in UTC (in `tz` when it has no offset), or None when absent."""
    value = document.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidPayload(field, "expected an ISO 8601 date-time")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidPayload(field, f"not an ISO 8601 date-time: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return bounded_utc(parsed, field)


def bounded_utc(moment: datetime, field: str) -> datetime:
    """An aware time in UTC; a 422 naming `field` when it lies outside 1970-01-01 to
    2100-01-01 UTC, or when its offset would move it out of Python's range."""
    try:
        converted = moment.astimezone(UTC)
    except OverflowError:
        converted = None
    if converted is None or not MIN_TIME <= converted < MAX_TIME:
        raise InvalidPayload(
            field, f"{moment.isoformat()} is outside {MIN_TIME:%Y-%m-%d} to {MAX_TIME:%Y-%m-%d} UTC"
        )
    return converted


def clip(value: str | None, limit: int) -> str | None:
    """Descriptive text cut to `limit` characters (see the module's note on bounds)."""
    return value[:limit].rstrip() if value is not None and len(value) > limit else value


def stamp(moment: datetime) -> str:
    """A compact UTC timestamp for platform event ids, e.g. `20220101T000000Z`."""
    moment = moment.astimezone(UTC)
    fraction = f".{moment.microsecond:06d}" if moment.microsecond else ""
    return f"{moment:%Y%m%dT%H%M%S}{fraction}Z"


def iso_second(moment: datetime) -> str:
    """An ISO 8601 UTC time to the second for carrier event ids, e.g. `2021-12-15T12:15:14Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def contact(
    *,
    customer_id: Any = None,
    name: str | None = None,
    phones: Sequence[Any] = (),
    emails: Sequence[Any] = (),
    region: str | None = None,
) -> JsonObject:
    """Customer data with the first phone and email that validate; bad ones are dropped."""
    customer: JsonObject = {}
    if text(customer_id):
        customer["id"] = text(customer_id)
    if name:
        customer["name"] = clip(name, NAME_MAX)
    for phone in filter(None, map(text, phones)):
        with suppress(ValueError):
            customer["phone"] = normalize_phone(phone, region or DEFAULT_PHONE_REGION)
            break
    for email in filter(None, map(text, emails)):
        with suppress(ValidationError):
            customer["email"] = Customer(email=email).email
            break
    return customer


def subject_of(customer: JsonObject) -> str | None:
    """The event subject: the platform's customer id, else the phone, else the email."""
    return customer.get("id") or customer.get("phone") or customer.get("email")


def address(*, country: Any = None, province: Any, city: Any) -> JsonObject | None:
    """A canonical address of the parts given as text; None when none is."""
    fields = {"country": country, "province": province, "city": city}
    place = {name: clip(text(value), PLACE_MAX) for name, value in fields.items() if text(value)}
    return place or None


def checkpoint(
    *, time: datetime | str, province: Any = None, city: Any = None, description: Any = None
) -> JsonObject:
    """A canonical checkpoint: its time and those other parts that are given as text."""
    parts = {"province": province, "city": city, "description": description}
    limits = {"province": PLACE_MAX, "city": PLACE_MAX, "description": DESCRIPTION_MAX}
    return {
        "time": time,
        **{name: clip(text(value), limits[name]) for name, value in parts.items() if text(value)},
    }


def arrival(newest_first: Sequence[T], in_city: Callable[[T], bool]) -> T | None:
    """The oldest checkpoint of the newest unbroken run of checkpoints in the destination city.

    Later updates from inside the city then keep describing the same arrival (same event id).
    """
    found: T | None = None
    for item in newest_first:
        if not in_city(item):
            break
        found = item
    return found


def items(
    lines: Any,
    currency: str,
    path: str,
    *,
    title: Callable[[JsonObject], str | None],
    rounded: bool = False,
) -> list[JsonObject]:
    """Canonical order items of line items with a whole quantity of at least 1 (others skipped).

    `title` reads a line's title; prices are decimal amounts (see `minor_units`). More than
    MAX_ITEMS lines, or a quantity beyond MAX_QUANTITY, is a 422.
    """
    result: list[JsonObject] = []
    for index, line in enumerate(map(as_object, as_list(lines))):
        quantity = line.get("quantity")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            continue
        if quantity > MAX_QUANTITY:
            raise InvalidPayload(f"{path}[{index}].quantity", f"more than {MAX_QUANTITY}")
        if len(result) == MAX_ITEMS:
            raise InvalidPayload(path, f"more than {MAX_ITEMS} line items")
        item: JsonObject = {"quantity": quantity}
        sku = text(line.get("sku"))
        if sku:
            item["sku"] = sku
        name = title(line)
        if name:
            item["title"] = clip(name, TITLE_MAX)
        if line.get("price") is not None:
            price = line.get("price")
            item["price"] = money(price, currency, f"{path}[{index}].price", rounded=rounded)
        result.append(item)
    return result

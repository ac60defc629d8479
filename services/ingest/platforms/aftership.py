"""AfterShip Tracking webhooks (`tracking_update`) for carriers outside Kuaidi100's reach.

What arrives
    AfterShip POSTs `application/json` to the webhook URL of the shop's AfterShip account
    (`/v1/logistics/aftership/{shop_id}`)::

        {"event": "tracking_update", "event_id": "<uuid v4>", "is_tracking_first_tag": true,
         "msg": {<the Tracking object>}, "ts": <unix seconds>}

    `event` is one of `tracking_update`, `edd_revise` and `tracking_pending_time`; only
    `tracking_update` changes a shipment's status, the others yield no event. `msg` is the
    full Tracking object of the account's webhook version: `tracking_number`, `slug` (the
    carrier), `tag`/`subtag`/`subtag_message` (current status), `order_id`, `checkpoints[]`
    (oldest first: `checkpoint_time`, `city`, `state`, `country_region` or `country_iso3`,
    `message`, `tag`, `subtag`), and since the 2024 versions `destination_city`,
    `destination_state`, `destination_country_region` (`destination_country_iso3` before).
    Field names are those of AfterShip's Tracking/Checkpoint models (AfterShip/
    tracking-sdk-nodejs `src/model/Tracking.ts`, `Checkpoint.ts`). `event_id` is the delivery
    id. Any 2xx answers AfterShip; no body is expected.

Signature
    Docs, "Webhook Signature" (aftership.com/docs/tracking/webhook/webhook-signature): "Each
    webhook request includes a aftership-hmac-sha256 header. The signature is a base64-encoded
    HMAC generated using sha256 algorithm with webhook request body and webhook secret", i.e.
    `aftership-hmac-sha256: BASE64(HMAC-SHA256(key=secret as UTF-8, msg=raw body))` (standard
    base64, 44 characters; header names are case-insensitive). Any of the shop's current
    secrets may match; an empty secret never does.

Statuses (`msg.tag`, refined by `msg.subtag`)
    ==================  =========================  ==========================================
    tag                 canonical                  note
    ==================  =========================  ==========================================
    Pending             (no event)                 nothing known from the carrier yet
    InfoReceived        (no event)                 label created, not picked up yet
    InTransit           in_transit                 arrived_city when in the destination city
      InTransit_002     picked_up                  acceptance scan: the carrier has it now
    OutForDelivery      out_for_delivery
    AvailableForPickup  out_for_delivery           waiting at a pickup point for the buyer
    AttemptFail         exception                  reason = subtag_message ("Failed Attempt")
    Delivered           delivered                  all Delivered_* subtags
    Exception           exception                  reason = subtag_message ("Exception")
      Exception_010     returned                   returning to sender
      Exception_011     returned                   returned to sender
    Expired             exception                  reason = subtag_message ("Expired")
    ==================  =========================  ==========================================

    Tags and subtags as in AfterShip's "Delivery Statuses" and "Delivery Sub-statuses" enums.
    An unknown tag is refused with 422. `is_tracking_first_tag` is no pickup signal: it marks
    the first update *sent* under a tag, which for a tracking added late is long after pickup.

Places and the arrived_city rule
    The checkpoint is the newest one (by time); its `city` and `state` become the canonical
    checkpoint's city and province. The destination is `destination_city`/`destination_state`.
    A status that would be in_transit becomes arrived_city when the newest checkpoint's city is
    the destination city (case and spacing ignored; states and countries must agree when both
    sides name them). The event then describes the arrival, the oldest checkpoint of the
    newest unbroken run of checkpoints in that city, so later updates from inside the city
    repeat the same event (same id). Webhook versions without destination fields never yield
    arrived_city.

Ids and times
    `aftership:{shop_id}:{slug}:{tracking_number}:{status}:{checkpoint time, UTC ISO}`
    (`ts` when there is no checkpoint) — a redelivery gives the same id. A `checkpoint_time`
    with an offset is converted to UTC; one without ("YYYY-MM-DDTHH:mm:ss", the checkpoint's
    local time per AfterShip) is taken in the shop's timezone, as the checkpoint's own zone is
    not given. `order_id` is carried when present; the buyer is not (subject None).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, Final

from libs.common.events import REASON_MAX, Envelope
from services.ingest.platforms.base import InvalidPayload, Normalized, ShopContext
from services.ingest.platforms.payloads import (
    JsonObject,
    ShopEvents,
    address,
    arrival,
    bounded_utc,
    checkpoint,
    clip,
    header,
    iso_second,
    load_json_object,
    missing,
    objects,
    optional_time,
    required_object,
    required_string,
    required_text,
    signature_matches,
    text,
)

SIGNATURE_HEADER: Final = "aftership-hmac-sha256"
TRACKING_UPDATE: Final = "tracking_update"

IN_TRANSIT: Final = "in_transit"
ARRIVED_CITY: Final = "arrived_city"
EXCEPTION: Final = "exception"

TAGS: Final[Mapping[str, str | None]] = {
    "Pending": None,
    "InfoReceived": None,
    "InTransit": IN_TRANSIT,
    "OutForDelivery": "out_for_delivery",
    "AvailableForPickup": "out_for_delivery",
    "AttemptFail": EXCEPTION,
    "Delivered": "delivered",
    "Exception": EXCEPTION,
    "Expired": EXCEPTION,
}
"""Every delivery status (tag) and its canonical status (None: no event)."""

SUBTAGS: Final[Mapping[str, str]] = {
    "InTransit_002": "picked_up",
    "Exception_010": "returned",
    "Exception_011": "returned",
}
"""Subtags whose canonical status differs from their tag's."""

DEFAULT_REASONS: Final[Mapping[str, str]] = {
    "AttemptFail": "Failed Attempt",
    "Exception": "Exception",
    "Expired": "Expired",
}


@dataclass(frozen=True)
class _Checkpoint:
    time: datetime
    city: str | None
    state: str | None
    country: str | None
    message: str | None


class AfterShipAdapter:
    """Verifies and normalises AfterShip Tracking webhooks."""

    name = "aftership"

    def verify(self, body: bytes, headers: Mapping[str, str], secrets: Sequence[str]) -> bool:
        signature = header(headers, SIGNATURE_HEADER)
        return signature is not None and signature_matches(body, signature, secrets)

    def normalize(self, body: bytes, headers: Mapping[str, str], shop: ShopContext) -> Normalized:
        # JSON that is not an object is a 400 here, as for Kuaidi100 (422 for the platforms).
        payload = load_json_object(body, non_object_status=400)
        event = required_string(payload, "event", "event")
        delivery_id = text(payload.get("event_id"))
        if event != TRACKING_UPDATE:
            return Normalized(topic=event, delivery_id=delivery_id)
        envelope = _event(payload, ShopEvents("aftership", shop))
        return Normalized(
            topic=event,
            events=[envelope] if envelope is not None else [],
            delivery_id=delivery_id,
        )


def _event(payload: JsonObject, shop: ShopEvents) -> Envelope | None:
    msg = required_object(payload, "msg", "msg")
    number = required_text(msg, "tracking_number", "msg.tracking_number")
    carrier = required_text(msg, "slug", "msg.slug")
    tag = required_text(msg, "tag", "msg.tag")
    if tag not in TAGS:
        raise InvalidPayload("msg.tag", f"unknown tag {tag!r}")
    status = TAGS[tag]
    if status is None:
        return None
    status = SUBTAGS.get(text(msg.get("subtag")) or "", status)

    checkpoints = _checkpoints(msg.get("checkpoints"), shop.tz)
    destination = (
        text(msg.get("destination_city")),
        text(msg.get("destination_state")),
        text(msg.get("destination_country_region")) or text(msg.get("destination_country_iso3")),
    )
    current = checkpoints[0] if checkpoints else None
    if status == IN_TRANSIT and destination[0] is not None:
        arrived = arrival(checkpoints, lambda item: _in_city(item, destination))
        if arrived is not None:
            status, current = ARRIVED_CITY, arrived

    when = (current.time if current is not None else _ts(payload.get("ts"))).replace(microsecond=0)
    data: JsonObject = {"tracking_number": number, "carrier": carrier, "status": status}
    if current is not None:
        data["checkpoint"] = checkpoint(
            time=iso_second(when),
            province=current.state,
            city=current.city,
            description=current.message,
        )
    order_id = text(msg.get("order_id"))
    if order_id is not None:
        data["order_id"] = order_id
    shipping = address(province=destination[1], city=destination[0])
    if shipping is not None:
        data["destination"] = shipping
    if status == EXCEPTION:
        reason = text(msg.get("subtag_message")) or DEFAULT_REASONS.get(tag, tag)
        data["reason"] = clip(reason, REASON_MAX)
    key = (carrier, number, status, iso_second(when))
    return shop.build(f"logistics.{status}", key, time=when, data=data)


def _checkpoints(value: Any, zone: tzinfo) -> list[_Checkpoint]:
    """The checkpoints, newest first (AfterShip lists them oldest first)."""
    found: list[tuple[int, _Checkpoint]] = []
    for index, item in enumerate(objects(value, "msg.checkpoints")):
        field = f"msg.checkpoints[{index}].checkpoint_time"
        parsed = _Checkpoint(
            time=optional_time(item, "checkpoint_time", field, zone) or missing(field),
            city=text(item.get("city")),
            state=text(item.get("state")),
            country=text(item.get("country_region")) or text(item.get("country_iso3")),
            message=text(item.get("message")),
        )
        found.append((index, parsed))
    found.sort(key=lambda pair: (-pair[1].time.timestamp(), -pair[0]))
    return [item for _, item in found]


def _in_city(point: _Checkpoint, destination: tuple[str | None, str | None, str | None]) -> bool:
    city, state, country = destination
    if city is None or point.city is None or _key(point.city) != _key(city):
        return False
    if state is not None and point.state is not None and _key(state) != _key(point.state):
        return False
    return not (
        country is not None and point.country is not None and _key(country) != _key(point.country)
    )


def _ts(value: Any) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            moment = datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            pass
        else:
            return bounded_utc(moment, "ts")
    raise InvalidPayload("ts", "missing or not a unix time (and no checkpoint to date the event)")


def _key(value: str) -> str:
    """Case and runs of spaces ignored: no 市 to drop (unlike Shopify's and Kuaidi100's)."""
    return " ".join(value.split()).casefold()

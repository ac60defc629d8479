"""AfterShip Tracking webhooks: aftership-hmac-sha256 signature and tag/subtag normalisation."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from libs.common.events import Envelope
from services.ingest.platforms.aftership import TAGS, AfterShipAdapter
from services.ingest.platforms.base import InvalidPayload, PlatformAdapter, ShopContext
from tests.ingest.platforms.senders import hmac_sha256_base64

SAMPLES = Path(__file__).parent / "samples" / "aftership"
SHOP = ShopContext(shop_id="acme-tea", currency="CNY", timezone="Asia/Shanghai")
US_SHOP = ShopContext(shop_id="acme-us", currency="USD", timezone="America/New_York")
SECRET = "as-webhook-secret-acme"
OLD_SECRET = "as-webhook-secret-rotated-out"

IN_TRANSIT = "tracking_update_intransit_trimmed.json"
DELIVERED = "tracking_update_delivered.json"
ARRIVAL = "tracking_update_usps_arrival_adapted.json"
NO_NUMBER = "tracking_update_no_tracking_number.json"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def headers(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "aftership-hmac-sha256": hmac_sha256_base64(body, secret),
    }


def variant(name: str = IN_TRANSIT, top: dict[str, Any] | None = None, **msg: Any) -> bytes:
    """A sample with msg fields replaced (None deletes) and top-level fields from `top`."""
    payload = json.loads(sample(name))
    for key, value in msg.items():
        if value is None:
            payload["msg"].pop(key, None)
        else:
            payload["msg"][key] = value
    payload.update(top or {})
    return json.dumps(payload).encode()


@pytest.fixture
def adapter() -> AfterShipAdapter:
    return AfterShipAdapter()


def one(adapter: AfterShipAdapter, body: bytes, shop: ShopContext = SHOP) -> Envelope:
    result = adapter.normalize(body, headers(body), shop)
    assert result.topic == "tracking_update"
    assert len(result.events) == 1
    return result.events[0]


def test_is_a_platform_adapter(adapter: AfterShipAdapter) -> None:
    checked: PlatformAdapter = adapter
    assert checked.name == "aftership"


# --- signature -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [IN_TRANSIT, DELIVERED, ARRIVAL, NO_NUMBER])
def test_samples_signed_as_aftership_signs_verify(adapter: AfterShipAdapter, name: str) -> None:
    body = sample(name)
    assert len(hmac_sha256_base64(body, SECRET)) == 44  # standard base64 of 32 bytes
    assert adapter.verify(body, headers(body), [SECRET])


def test_any_current_secret_verifies(adapter: AfterShipAdapter) -> None:
    body = sample(IN_TRANSIT)
    signed = headers(body, OLD_SECRET)
    assert adapter.verify(body, signed, [SECRET, OLD_SECRET])
    assert adapter.verify(body, signed, [OLD_SECRET, SECRET])
    assert not adapter.verify(body, signed, [SECRET])


def test_header_name_is_case_insensitive(adapter: AfterShipAdapter) -> None:
    body = sample(DELIVERED)
    assert adapter.verify(
        body, {"Aftership-Hmac-Sha256": hmac_sha256_base64(body, SECRET)}, [SECRET]
    )


def test_bad_or_missing_signature_fails(adapter: AfterShipAdapter) -> None:
    body = sample(IN_TRANSIT)
    assert not adapter.verify(body, headers(body, "wrong-secret"), [SECRET])
    assert not adapter.verify(body, {"Content-Type": "application/json"}, [SECRET])
    assert not adapter.verify(body, {"aftership-hmac-sha256": ""}, [SECRET])
    assert not adapter.verify(body, {"aftership-hmac-sha256": "short"}, [SECRET])
    hexdigest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert not adapter.verify(body, {"aftership-hmac-sha256": hexdigest}, [SECRET])
    assert not adapter.verify(body, headers(body), [])


def test_tampered_body_fails(adapter: AfterShipAdapter) -> None:
    body = sample(IN_TRANSIT)
    tampered = body.replace(b'"tag": "InTransit"', b'"tag": "Delivered"')
    assert tampered != body
    assert not adapter.verify(tampered, headers(body), [SECRET])


def test_empty_secret_never_verifies(adapter: AfterShipAdapter) -> None:
    body = sample(IN_TRANSIT)
    assert not adapter.verify(body, headers(body, ""), [""])


# --- normalisation of the samples ----------------------------------------------------------


def test_in_transit_sample(adapter: AfterShipAdapter) -> None:
    body = sample(IN_TRANSIT)
    result = adapter.normalize(body, headers(body), SHOP)
    assert result.delivery_id == "94dadd60-ed26-46d0-aa52-3ced925a50ff"
    assert result.response is None
    [event] = result.events
    assert event.type == "logistics.in_transit"
    assert event.source == "aftership/acme-tea"
    # "2021-01-14T00:52:00" carries no offset: taken in the shop's zone (UTC+8).
    assert event.time.isoformat() == "2021-01-13T16:52:00+00:00"
    assert event.id == "aftership:acme-tea:usps:0000000000000000:in_transit:2021-01-13T16:52:00Z"
    assert event.subject is None
    assert event.key == "acme-tea:parcel:0000000000000000"
    assert event.data == {
        "tracking_number": "0000000000000000",
        "carrier": "usps",
        "status": "in_transit",
        "checkpoint": {
            "time": "2021-01-13T16:52:00Z",
            "description": "Departed Shipping Partner Facility, USPS Awaiting Item",
        },
    }


def test_delivered_sample_without_checkpoints_is_dated_by_ts(adapter: AfterShipAdapter) -> None:
    event = one(adapter, sample(DELIVERED))
    assert event.type == "logistics.delivered"
    assert event.time.isoformat() == "2024-04-10T09:34:56+00:00"  # ts 1712741696
    assert "checkpoint" not in event.data
    assert "order_id" not in event.data  # order_number is the shop's display number, not its id


def test_arrival_sample_is_arrived_city(adapter: AfterShipAdapter) -> None:
    event = one(adapter, sample(ARRIVAL), US_SHOP)
    assert event.type == "logistics.arrived_city"
    assert event.data["tracking_number"] == "9405516902697649303570"
    assert event.data["carrier"] == "usps"
    assert event.data["checkpoint"] == {
        "time": "2021-05-17T07:45:00Z",  # 03:45 in New York (EDT)
        "province": "NC",
        "city": "HOLLY RIDGE",
        "description": "Arrived at Post Office",
    }
    assert event.data["destination"] == {"province": "NC", "city": "HOLLY RIDGE"}
    assert event.id == (
        "aftership:acme-us:usps:9405516902697649303570:arrived_city:2021-05-17T07:45:00Z"
    )


def test_no_arrived_city_outside_the_destination_city(adapter: AfterShipAdapter) -> None:
    assert one(adapter, variant(ARRIVAL, destination_city="Raleigh")).type == (
        "logistics.in_transit"
    )
    assert one(adapter, variant(ARRIVAL, destination_state="SC")).type == "logistics.in_transit"
    no_destination = variant(ARRIVAL, destination_city=None, destination_state=None)
    assert one(adapter, no_destination).type == "logistics.in_transit"


def test_destination_city_match_ignores_case_and_spacing(adapter: AfterShipAdapter) -> None:
    body = variant(ARRIVAL, destination_city=" Holly  Ridge ", destination_state="nc")
    assert one(adapter, body).type == "logistics.arrived_city"


def test_later_checkpoints_in_the_city_repeat_the_same_arrival(adapter: AfterShipAdapter) -> None:
    first = one(adapter, sample(ARRIVAL), US_SHOP)
    payload = json.loads(sample(ARRIVAL))
    later = dict(payload["msg"]["checkpoints"][-1])
    later.update(checkpoint_time="2021-05-17T06:10:00", message="Sorting Complete")
    payload["msg"]["checkpoints"].append(later)
    again = one(adapter, json.dumps(payload).encode(), US_SHOP)
    assert again.id == first.id
    assert again.data == first.data


def test_redelivery_gives_the_same_id(adapter: AfterShipAdapter) -> None:
    assert one(adapter, sample(ARRIVAL)).id == one(adapter, sample(ARRIVAL)).id


def test_checkpoint_time_with_offset(adapter: AfterShipAdapter) -> None:
    payload = json.loads(sample(IN_TRANSIT))
    payload["msg"]["checkpoints"][0]["checkpoint_time"] = "2021-01-14T00:52:00-05:00"
    event = one(adapter, json.dumps(payload).encode())
    assert event.time.isoformat() == "2021-01-14T05:52:00+00:00"


def test_order_id_is_carried_when_present(adapter: AfterShipAdapter) -> None:
    event = one(adapter, variant(order_id="5678901234"))
    assert event.data["order_id"] == "5678901234"


# --- tags and subtags ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "subtag", "subtag_message", "status", "reason"),
    [
        ("InTransit", "InTransit_001", "In Transit", "in_transit", None),
        ("InTransit", "InTransit_002", "Acceptance scan", "picked_up", None),
        ("InTransit", "InTransit_007", "Departure Scan", "in_transit", None),
        ("OutForDelivery", "OutForDelivery_001", "Out for Delivery", "out_for_delivery", None),
        (
            "AvailableForPickup",
            "AvailableForPickup_001",
            "Available for pickup",
            "out_for_delivery",
            None,
        ),
        (
            "AttemptFail",
            "AttemptFail_001",
            "Addressee not available",
            "exception",
            "Addressee not available",
        ),
        ("Delivered", "Delivered_001", "Delivered", "delivered", None),
        ("Delivered", "Delivered_002", "Picked up by the customer", "delivered", None),
        (
            "Exception",
            "Exception_003",
            "Customer refused delivery",
            "exception",
            "Customer refused delivery",
        ),
        ("Exception", "Exception_010", "Returning to sender", "returned", None),
        ("Exception", "Exception_011", "Returned to sender", "returned", None),
        ("Exception", "Exception_013", "Shipment lost", "exception", "Shipment lost"),
        ("Expired", "Expired_001", "Expired", "exception", "Expired"),
    ],
)
def test_tag(
    adapter: AfterShipAdapter,
    tag: str,
    subtag: str,
    subtag_message: str,
    status: str,
    reason: str | None,
) -> None:
    event = one(adapter, variant(tag=tag, subtag=subtag, subtag_message=subtag_message))
    assert event.type == f"logistics.{status}"
    assert event.data.get("reason") == reason


def test_exception_without_subtag_message_has_a_default_reason(adapter: AfterShipAdapter) -> None:
    body = variant(tag="AttemptFail", subtag=None, subtag_message=None)
    assert one(adapter, body).data["reason"] == "Failed Attempt"


@pytest.mark.parametrize("tag", ["Pending", "InfoReceived"])
def test_tags_before_pickup_yield_no_event(adapter: AfterShipAdapter, tag: str) -> None:
    body = variant(tag=tag, subtag=f"{tag}_001")
    result = adapter.normalize(body, headers(body), SHOP)
    assert result.events == []
    assert result.topic == "tracking_update"


def test_every_tag_is_mapped() -> None:
    assert set(TAGS) == {
        "Pending",
        "InfoReceived",
        "InTransit",
        "OutForDelivery",
        "AttemptFail",
        "Delivered",
        "AvailableForPickup",
        "Exception",
        "Expired",
    }


@pytest.mark.parametrize("event_name", ["edd_revise", "tracking_pending_time"])
def test_other_events_yield_no_event(adapter: AfterShipAdapter, event_name: str) -> None:
    body = variant(top={"event": event_name, "event_id": "b1e1f9a2"})
    result = adapter.normalize(body, headers(body), SHOP)
    assert result.topic == event_name
    assert result.events == []
    assert result.delivery_id == "b1e1f9a2"


# --- malformed and incomplete bodies -------------------------------------------------------


@pytest.mark.parametrize("body", [b"not json at all", b"\xff\xfe{", b"[1, 2]", b'"tracking"'])
def test_malformed_body_is_400(adapter: AfterShipAdapter, body: bytes) -> None:
    with pytest.raises(InvalidPayload) as caught:
        adapter.normalize(body, headers(body), SHOP)
    assert caught.value.status == 400


def test_sample_without_tracking_number_is_refused(adapter: AfterShipAdapter) -> None:
    body = sample(NO_NUMBER)
    with pytest.raises(InvalidPayload) as caught:
        adapter.normalize(body, headers(body), SHOP)
    assert caught.value.field == "msg.tracking_number"
    assert caught.value.status == 422


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (variant(top={"event": None}), "event"),
        (variant(top={"msg": None}), "msg"),
        (variant(slug=None), "msg.slug"),
        (variant(tag=None), "msg.tag"),
        (variant(tag="Teleported"), "msg.tag"),
        (variant(checkpoints="none"), "msg.checkpoints"),
        (variant(checkpoints=[{"message": "no time"}]), "msg.checkpoints[0].checkpoint_time"),
        (
            variant(checkpoints=[{"checkpoint_time": "14/01/2021"}]),
            "msg.checkpoints[0].checkpoint_time",
        ),
        (variant(DELIVERED, top={"ts": None}), "ts"),
    ],
)
def test_missing_fields_are_named(adapter: AfterShipAdapter, body: bytes, field: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        adapter.normalize(body, headers(body), SHOP)
    assert caught.value.field == field
    assert caught.value.status == 422

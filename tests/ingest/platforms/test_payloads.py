"""The helpers the adapters share: event building, signatures, strict and lenient reading."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.ingest.platforms.base import InvalidPayload, ShopContext
from services.ingest.platforms.payloads import (
    ShopEvents,
    address,
    arrival,
    checkpoint,
    load_json_object,
    objects,
    secret_signs,
    signature_matches,
)
from tests.ingest.platforms.senders import hmac_sha256_base64

SHOP = ShopEvents("shopify", ShopContext(shop_id="acme-tea", currency="CNY", timezone="Nowhere/X"))
WHEN = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def order(customer: dict[str, Any]) -> dict[str, Any]:
    return {"order_id": "1", "customer": customer, "status": "created"}


def test_build_gives_id_source_and_the_customer_as_subject() -> None:
    event = SHOP.build("order.created", ("1", "order.created"), time=WHEN, data=order({"id": "c"}))
    assert (event.id, event.source, event.subject) == (
        "shopify:acme-tea:1:order.created",
        "shopify/acme-tea",
        "c",
    )


def test_build_makes_a_carrier_events_customer_its_subject() -> None:
    data = {
        "tracking_number": "T1",
        "carrier": "ups",
        "status": "in_transit",
        "customer": {"email": "jo@example.com"},
    }
    assert SHOP.build("logistics.in_transit", ("T1",), time=WHEN, data=data).subject == (
        "jo@example.com"
    )
    del data["customer"]
    assert SHOP.build("logistics.in_transit", ("T1",), time=WHEN, data=data).subject is None


def test_build_names_the_data_field_that_would_make_a_bad_subject() -> None:
    with pytest.raises(InvalidPayload) as caught:
        SHOP.build("order.created", ("1",), time=WHEN, data=order({"id": "A" * 201}))
    assert (caught.value.field, caught.value.status) == ("data.customer.id", 422)
    # An email is the subject (and customer id) when it is all there is: held to 200 too.
    long_email = "a" * 200 + "@example.com"
    with pytest.raises(InvalidPayload) as caught:
        SHOP.build("order.created", ("1",), time=WHEN, data=order({"email": long_email}))
    assert caught.value.field == "data.customer.email"


def test_an_unknown_shop_timezone_is_utc() -> None:
    assert SHOP.tz is UTC


def test_any_non_empty_secret_may_sign() -> None:
    body = b'{"id": 1}'
    signature = hmac_sha256_base64(body, "new")
    assert signature_matches(body, f" {signature} ", ["old", "new"])
    assert not signature_matches(body, signature, ["old"])
    assert not secret_signs("", ["", ""], lambda secret: secret)
    assert not secret_signs("\udcff", ["x"], lambda secret: "x")


@pytest.mark.parametrize(("raw", "status"), [(b"{", 400), (b"[]", 422), (b"", 400), ('"x"', 422)])
def test_load_json_object(raw: bytes | str, status: int) -> None:
    with pytest.raises(InvalidPayload) as caught:
        load_json_object(raw)
    assert (caught.value.field, caught.value.status) == ("body", status)
    assert load_json_object(b' {"a": 1} ') == {"a": 1}


def test_load_json_object_may_answer_400_for_another_value() -> None:
    with pytest.raises(InvalidPayload) as caught:
        load_json_object("[1]", "param", non_object_status=400)
    assert (caught.value.field, caught.value.status) == ("param", 400)


def test_objects_names_what_is_not_an_object() -> None:
    assert objects(None, "data") == []
    with pytest.raises(InvalidPayload) as caught:
        objects([{}, 3], "data")
    assert caught.value.field == "data[1]"
    with pytest.raises(InvalidPayload) as caught:
        objects("nope", "data")
    assert caught.value.field == "data"


def test_places_and_checkpoints_keep_only_parts_given_as_text() -> None:
    assert address(country=" ", province=None, city=" 杭州市 ") == {"city": "杭州市"}
    assert address(province="", city=None) is None
    assert checkpoint(time="t", province=None, city="X", description="  ") == {
        "time": "t",
        "city": "X",
    }


def test_arrival_is_the_oldest_of_the_newest_run_in_the_city() -> None:
    newest_first = ["in", "in", "out", "in"]
    assert arrival(range(len(newest_first)), lambda i: newest_first[i] == "in") == 1
    assert arrival(["out", "in"], lambda item: item == "in") is None

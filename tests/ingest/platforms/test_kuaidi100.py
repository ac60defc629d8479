"""Kuaidi100 subscription push: md5(param + salt) signature and normalisation of every state."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from libs.common.events import Envelope
from services.ingest.platforms.base import InvalidPayload, PlatformAdapter, ShopContext
from services.ingest.platforms.kuaidi100 import STATES, Kuaidi100Adapter, Place, parse_place

SAMPLES = Path(__file__).parent / "samples" / "kuaidi100"
SHOP = ShopContext(shop_id="acme-tea", currency="CNY", timezone="Asia/Shanghai")
SALT = "kd100-salt-acme"
OLD_SALT = "kd100-salt-rotated-out"
ACK = '{"result":true,"returnCode":"200","message":"成功"}'.encode()

IN_TRANSIT = (
    "push_param_yt6186594166532.json"  # state 0, newest checkpoint 苏州 2021-12-15 20:15:14
)
PICKED_UP = "push_param_yt6074326614455.json"  # state 1, resultv2 fields null, "【长沙市】"

SUZHOU = {"number": "CN320500000000", "name": "江苏,苏州市"}
WUXI = {"number": "CN320200000000", "name": "江苏,无锡市"}


def param_text(name: str) -> str:
    return (SAMPLES / name).read_text(encoding="utf-8")


def md5_upper(text: str) -> str:
    """Kuaidi100's rule, written out: upper-case hex MD5 of param + salt."""
    return hashlib.md5(text.encode("utf-8")).hexdigest().upper()


def push(param: str, salt: str | None = SALT) -> bytes:
    """The form body Kuaidi100 POSTs: param, and sign when the subscription had a salt."""
    fields = {"param": param}
    if salt is not None:
        fields["sign"] = md5_upper(param + salt)
    return urlencode(fields).encode("ascii")


def variant(name: str = IN_TRANSIT, **changes: Any) -> str:
    """A sample's param with lastResult fields replaced (None deletes)."""
    param = json.loads(param_text(name))
    for key, value in changes.items():
        if value is None:
            param["lastResult"].pop(key, None)
        else:
            param["lastResult"][key] = value
    return json.dumps(param, ensure_ascii=False)


def with_route_to(to: dict[str, Any] | None, name: str = IN_TRANSIT) -> str:
    param = json.loads(param_text(name))
    param["lastResult"]["routeInfo"] = {"from": None, "cur": None, "to": to}
    return json.dumps(param, ensure_ascii=False)


def with_state(code: int) -> str:
    """The in-transit sample at state `code`, checkpoint status codes removed."""
    param = json.loads(param_text(IN_TRANSIT))
    param["lastResult"]["state"] = str(code)
    for item in param["lastResult"]["data"]:
        item.pop("statusCode", None)
    return json.dumps(param, ensure_ascii=False)


@pytest.fixture
def adapter() -> Kuaidi100Adapter:
    return Kuaidi100Adapter()


def one(adapter: Kuaidi100Adapter, param: str) -> Envelope:
    result = adapter.normalize(push(param), {}, SHOP)
    assert result.response == ACK
    assert len(result.events) == 1
    return result.events[0]


def test_is_a_platform_adapter(adapter: Kuaidi100Adapter) -> None:
    checked: PlatformAdapter = adapter
    assert checked.name == "kuaidi100"


# --- signature -----------------------------------------------------------------------------


def test_sample_signed_as_kuaidi100_signs_verifies(adapter: Kuaidi100Adapter) -> None:
    assert adapter.verify(push(param_text(IN_TRANSIT)), {}, [SALT])
    assert adapter.verify(push(param_text(PICKED_UP)), {}, [SALT])


def test_any_current_secret_verifies(adapter: Kuaidi100Adapter) -> None:
    body = push(param_text(IN_TRANSIT), salt=OLD_SALT)
    assert adapter.verify(body, {}, [SALT, OLD_SALT])
    assert adapter.verify(body, {}, [OLD_SALT, SALT])
    assert not adapter.verify(body, {}, [SALT])


def test_wrong_or_missing_signature_fails(adapter: Kuaidi100Adapter) -> None:
    param = param_text(IN_TRANSIT)
    assert not adapter.verify(push(param, salt="not-the-salt"), {}, [SALT])
    assert not adapter.verify(push(param, salt=None), {}, [SALT])
    assert not adapter.verify(urlencode({"param": param, "sign": ""}).encode(), {}, [SALT])
    assert not adapter.verify(push(param), {}, [])


def test_tampered_param_fails(adapter: Kuaidi100Adapter) -> None:
    signature = md5_upper(param_text(IN_TRANSIT) + SALT)
    forged = param_text(IN_TRANSIT).replace('"state":"0"', '"state":"3"')
    assert forged != param_text(IN_TRANSIT)
    body = urlencode({"param": forged, "sign": signature}).encode()
    assert not adapter.verify(body, {}, [SALT])


def test_empty_secret_never_verifies(adapter: Kuaidi100Adapter) -> None:
    assert not adapter.verify(push(param_text(IN_TRANSIT), salt=""), {}, [""])


def test_lower_case_hex_signature_is_accepted(adapter: Kuaidi100Adapter) -> None:
    param = param_text(IN_TRANSIT)
    body = urlencode({"param": param, "sign": md5_upper(param + SALT).lower()}).encode()
    assert adapter.verify(body, {}, [SALT])


def test_unreadable_body_does_not_verify(adapter: Kuaidi100Adapter) -> None:
    assert not adapter.verify(b"param=%FF%FE&sign=00", {}, [SALT])
    assert not adapter.verify(b"\xff\xfe", {}, [SALT])


# --- normalisation of the samples ----------------------------------------------------------


def test_in_transit_sample(adapter: Kuaidi100Adapter) -> None:
    result = adapter.normalize(push(param_text(IN_TRANSIT)), {}, SHOP)
    assert result.topic == "polling"
    assert result.response == ACK
    assert result.response_media_type == "application/json"
    [event] = result.events
    assert event.type == "logistics.in_transit"
    assert event.id == "kuaidi100:acme-tea:yuantong:YT6186594166532:in_transit:2021-12-15T12:15:14Z"
    assert event.source == "kuaidi100/acme-tea"
    assert event.time.isoformat() == "2021-12-15T12:15:14+00:00"  # 20:15:14 in Shanghai
    assert event.subject is None
    assert event.key == "acme-tea:parcel:YT6186594166532"
    assert event.data == {
        "tracking_number": "YT6186594166532",
        "carrier": "yuantong",
        "status": "in_transit",
        "checkpoint": {
            "time": "2021-12-15T12:15:14Z",
            "province": "江苏省",
            "city": "苏州市",
            "description": "【苏州转运中心】 已发出 下一站 【无锡转运中心公司】",
        },
    }


def test_picked_up_sample_with_null_area_fields(adapter: Kuaidi100Adapter) -> None:
    event = one(adapter, param_text(PICKED_UP))
    assert event.type == "logistics.picked_up"
    assert event.data["tracking_number"] == "YT6074326614455"
    assert event.data["carrier"] == "yuantong"
    assert event.data["checkpoint"]["city"] == "长沙市"  # from "【长沙市】" in the context
    assert "province" not in event.data["checkpoint"]
    assert event.time.isoformat() == "2023-02-02T01:57:03+00:00"
    assert "order_id" not in event.data


def test_redelivery_and_full_repush_give_the_same_id(adapter: Kuaidi100Adapter) -> None:
    first = one(adapter, param_text(IN_TRANSIT))
    again = one(adapter, param_text(IN_TRANSIT))
    param = json.loads(param_text(IN_TRANSIT))
    param["status"] = "updateall"
    repush = one(adapter, json.dumps(param, ensure_ascii=False))
    assert first.id == again.id == repush.id


# --- arrived_city --------------------------------------------------------------------------


def test_arrived_city_when_newest_checkpoint_is_in_the_destination_city(
    adapter: Kuaidi100Adapter,
) -> None:
    event = one(adapter, with_route_to(SUZHOU))
    assert event.type == "logistics.arrived_city"
    # The arrival: oldest of the newest run of checkpoints in 苏州 (20:11:25, not 20:15:14).
    assert event.data["checkpoint"]["time"] == "2021-12-15T12:11:25Z"
    assert event.data["checkpoint"]["city"] == "苏州市"
    assert event.data["checkpoint"]["description"] == "【苏州转运中心公司】 已收入"
    assert event.data["destination"] == {"country": "CN", "province": "江苏省", "city": "苏州市"}
    assert event.id.endswith(":arrived_city:2021-12-15T12:11:25Z")


def test_arrived_city_by_name_when_no_area_codes(adapter: Kuaidi100Adapter) -> None:
    param = json.loads(with_route_to({"number": None, "name": "江苏省苏州市"}))
    for item in param["lastResult"]["data"]:
        item["areaCode"] = None
    event = one(adapter, json.dumps(param, ensure_ascii=False))
    assert event.type == "logistics.arrived_city"


def test_no_arrived_city_outside_the_destination_city(adapter: Kuaidi100Adapter) -> None:
    assert one(adapter, with_route_to(WUXI)).type == "logistics.in_transit"
    assert one(adapter, with_route_to(None)).type == "logistics.in_transit"


def test_later_checkpoints_in_the_city_repeat_the_same_arrival(adapter: Kuaidi100Adapter) -> None:
    first = one(adapter, with_route_to(SUZHOU))
    param = json.loads(with_route_to(SUZHOU))
    newer = dict(param["lastResult"]["data"][0])
    newer.update(time="2021-12-16 08:00:00", ftime="2021-12-16 08:00:00", context="苏州 分拣")
    param["lastResult"]["data"].insert(0, newer)
    later = one(adapter, json.dumps(param, ensure_ascii=False))
    assert later.id == first.id
    assert later.data == first.data


def test_carrier_sub_state_1001_is_arrived_city(adapter: Kuaidi100Adapter) -> None:
    param = json.loads(param_text(IN_TRANSIT))
    param["lastResult"]["data"][0]["statusCode"] = "1001"
    event = one(adapter, json.dumps(param, ensure_ascii=False))
    assert event.type == "logistics.arrived_city"
    assert event.data["checkpoint"]["time"] == "2021-12-15T12:15:14Z"


def test_sub_state_of_another_main_state_does_not_override(adapter: Kuaidi100Adapter) -> None:
    param = json.loads(param_text(IN_TRANSIT))
    param["lastResult"]["data"][0]["statusCode"] = "301"  # not a sub-state of 0
    assert one(adapter, json.dumps(param, ensure_ascii=False)).type == "logistics.in_transit"


# --- the state table -----------------------------------------------------------------------

EXPECTED = {
    0: "in_transit",
    1001: "arrived_city",
    1002: "in_transit",
    1003: "in_transit",
    1: "picked_up",
    101: None,
    102: None,
    103: "picked_up",
    5: "out_for_delivery",
    501: "out_for_delivery",
    3: "delivered",
    301: "delivered",
    302: "delivered",
    303: "delivered",
    304: "delivered",
    2: "exception",
    201: "exception",
    202: "exception",
    203: "exception",
    204: "exception",
    205: "exception",
    206: "exception",
    207: "exception",
    208: "exception",
    209: "exception",
    210: "exception",
    4: "returned",
    401: "exception",
    14: "exception",
    6: "returned",
    7: "in_transit",
    8: "in_transit",
    10: "in_transit",
    11: "in_transit",
    12: "in_transit",
    13: "exception",
}


def test_every_documented_state_is_mapped() -> None:
    assert set(STATES) == set(EXPECTED)


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_state(adapter: Kuaidi100Adapter, code: int) -> None:
    result = adapter.normalize(push(with_state(code)), {}, SHOP)
    assert result.response == ACK
    expected = EXPECTED[code]
    if expected is None:
        assert result.events == []
        return
    [event] = result.events
    assert event.type == f"logistics.{expected}"
    assert event.data["status"] == expected
    if expected == "exception":
        assert event.data["reason"] == STATES[code].name
    else:
        assert "reason" not in event.data


def test_state_given_as_a_number(adapter: Kuaidi100Adapter) -> None:
    param = json.loads(with_state(3))
    param["lastResult"]["state"] = 3
    assert one(adapter, json.dumps(param)).type == "logistics.delivered"


def test_undocumented_sub_state_falls_back_to_its_main_state(adapter: Kuaidi100Adapter) -> None:
    event = one(adapter, with_state(299))
    assert event.type == "logistics.exception"
    assert event.data["reason"] == "疑难(299)"
    assert one(adapter, with_state(1009)).type == "logistics.in_transit"


def test_unknown_state_is_refused(adapter: Kuaidi100Adapter) -> None:
    with pytest.raises(InvalidPayload) as caught:
        adapter.normalize(push(with_state(99)), {}, SHOP)
    assert caught.value.field == "param.lastResult.state"
    assert caught.value.status == 422


def test_push_without_checkpoints_yields_no_event(adapter: Kuaidi100Adapter) -> None:
    param = json.loads(param_text(IN_TRANSIT))
    param.update(status="abort", message="3天查询无记录")
    param["lastResult"]["data"] = []
    result = adapter.normalize(push(json.dumps(param, ensure_ascii=False)), {}, SHOP)
    assert result.topic == "abort"
    assert result.events == []
    assert result.response == ACK


# --- places --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "province", "city"),
    [
        ("浙江,杭州市", "浙江省", "杭州市"),
        ("江苏,苏州市,相城区,北桥", "江苏省", "苏州市"),
        ("浙江省杭州市西湖区", "浙江省", "杭州市"),
        ("上海市", "上海市", "上海市"),
        ("上海,上海市,浦东新区", "上海市", "上海市"),
        ("北京市朝阳区", "北京市", "北京市"),
        ("新疆维吾尔自治区乌鲁木齐市天山区", "新疆维吾尔自治区", "乌鲁木齐市"),
        ("湖北省恩施土家族苗族自治州恩施市", "湖北省", "恩施土家族苗族自治州"),
        ("吉林省吉林市", "吉林省", "吉林市"),
        ("吉林市船营区", None, "吉林市"),
        ("长沙市", None, "长沙市"),
        ("苏州转运中心", None, None),
    ],
)
def test_parse_place(text: str, province: str | None, city: str | None) -> None:
    place = parse_place(text)
    assert (place.province, place.city) == (province, city)


def test_parse_place_keeps_the_area_code() -> None:
    assert parse_place("江苏,苏州市", "CN320500000000") == Place("江苏省", "苏州市", "320500000000")


# --- malformed and incomplete pushes -------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\x00",  # not UTF-8
        b"param=%E6%B1%9F%FF&sign=00",  # percent-escapes that are not UTF-8
        push("{not json"),
        push('"a string"'),
        push("[1, 2]"),
    ],
)
def test_malformed_push_is_400(adapter: Kuaidi100Adapter, body: bytes) -> None:
    with pytest.raises(InvalidPayload) as caught:
        adapter.normalize(body, {}, SHOP)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"sign=ABC", "param"),
        (push(json.dumps({"status": "polling"})), "param.lastResult"),
        (push(variant(nu=None)), "param.lastResult.nu"),
        (push(variant(com=None)), "param.lastResult.com"),
        (push(variant(state=None)), "param.lastResult.state"),
        (push(variant(state="在途")), "param.lastResult.state"),
        (push(variant(data="nope")), "param.lastResult.data"),
    ],
)
def test_missing_fields_are_named(adapter: Kuaidi100Adapter, body: bytes, field: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        adapter.normalize(body, {}, SHOP)
    assert caught.value.field == field
    assert caught.value.status == 422


def test_unreadable_checkpoint_time_is_named(adapter: Kuaidi100Adapter) -> None:
    param = json.loads(param_text(IN_TRANSIT))
    param["lastResult"]["data"][1]["ftime"] = "15/12/2021"
    with pytest.raises(InvalidPayload) as caught:
        adapter.normalize(push(json.dumps(param, ensure_ascii=False)), {}, SHOP)
    assert caught.value.field == "param.lastResult.data[1].ftime"

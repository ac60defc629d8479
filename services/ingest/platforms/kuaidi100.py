"""Kuaidi100 (快递100) subscription pushes: 实时快递查询 → 快递信息推送服务 (订阅推送).

What arrives
    After a shop subscribes a waybill (`https://poll.kuaidi100.com/poll`, with
    `parameters.callbackurl` = `/v1/logistics/kuaidi100/{shop_id}` and `parameters.salt` = the
    shop's kuaidi100 secret), Kuaidi100 POSTs every change of that waybill as
    `application/x-www-form-urlencoded` with two fields::

        param={"status":"polling","billstatus":"got","message":"","lastResult":{...}}
        sign=<32 upper-case hex>

    `status` is the monitoring state (polling, shutdown once signed for, abort after "3天查询无
    记录"/"60天无变化", updateall on a full re-push). `lastResult` is the full current result:
    `nu` (waybill number), `com` (carrier code), `state` (table below), `ischeck`, and `data`,
    every checkpoint newest first (`time`/`ftime` "yyyy-MM-dd HH:mm:ss" in Asia/Shanghai,
    `context`, and with `resultv2` also `areaCode`, `areaName`, `status` (state name),
    `statusCode`), plus with resultv2=4 `routeInfo` {from, cur, to: {number, name}}. Fields are
    those of the official SDK's `SubscribePushParamResp` / `SubscribePushResult` /
    `SubscribePushData` / `QueryTrackRouteInfo` (kuaidi100-api/java-demo). Kuaidi100 expects
    `{"result":true,"returnCode":"200","message":"成功"}` back and re-pushes otherwise; that is
    `Normalized.response`. The push carries no order id and no buyer: events carry the
    tracking number and carrier, `order_id` stays unset and so does the subject (the envelope
    key falls back to the tracking number).

Signature
    Push docs (推送接口, api.kuaidi100.com; apifox 514987/api-8568518): "订阅参数salt值不为null时,
    推送数据将包含该加密签名,加密方式:md5(param+salt)", i.e.
    `sign = HEX_UPPER(MD5(param + salt))` over the `param` text exactly as received
    (form-decoded, UTF-8), salt = the shop's secret. Any of the shop's current secrets may
    match; an empty secret never does (it would make every unsigned md5 valid).

States (`lastResult.state`; the resultv2 high-precision sub-states refine them)
    =====  ================  ================  ===========================================
    code   Kuaidi100         canonical         note
    =====  ================  ================  ===========================================
    0      在途              in_transit        arrived_city when in the destination city
    1001   到达派件城市      arrived_city      the carrier says so itself
    1002   干线              in_transit        arrived_city when in the destination city
    1003   转递              in_transit        arrived_city when in the destination city
    1      揽收              picked_up
    101    已下单            (no event)        order placed, nothing picked up yet
    102    待揽收            (no event)        waiting for the courier
    103    已揽收            picked_up
    5      派件              out_for_delivery
    501    投柜或驿站        out_for_delivery  waiting in a locker/station for the buyer
    3      签收              delivered
    301    本人签收          delivered
    302    派件异常后签收    delivered
    303    代签              delivered
    304    投柜或站签收      delivered
    2      疑难              exception         reason "疑难"
    201    超时未签收        exception         reason = the state's name, likewise below
    202    超时未更新        exception
    203    拒收              exception
    204    派件异常          exception
    205    柜或驿站超时未取  exception
    206    无法联系          exception
    207    超区              exception
    208    滞留              exception
    209    破损              exception
    210    销单              exception
    4      退签              returned          signed for by the sender on return
    401    已销单            exception         waybill cancelled
    14     拒签              exception         the buyer refused the parcel
    6      退回              returned          on its way back to the sender
    7      转投              in_transit        handed to another carrier
    8      清关              in_transit        arrived_city when in the destination city
    10     待清关            in_transit        likewise
    11     清关中            in_transit        likewise
    12     已清关            in_transit        likewise
    13     清关异常          exception
    =====  ================  ================  ===========================================

    Codes and names are those of the docs' "运单快递状态(state)说明" table (apifox
    514987/api-8562559). The code used is `state`, refined by the newest checkpoint's
    `statusCode` when that is a sub-state of the same main state (state 0 with statusCode 1001
    is 1001). An undocumented sub-state falls back to its main state (2xx → 2, 100x → 0, ...);
    anything else is refused with 422. A push without checkpoints (e.g. abort, 3天查询无记录)
    yields no event.

Places and the arrived_city rule
    A checkpoint's province/city come from its `areaName`, either Kuaidi100's comma form
    ("江苏,苏州市", "江苏,苏州市,相城区,北桥") or written out ("浙江省杭州市西湖区"), else from a
    location in brackets at the start of `context` ("【江苏省无锡市锡新开发区公司】", "【长沙市】").
    Provinces are written out in full ("江苏省", "上海市"); a municipality is its own city.
    The destination is `routeInfo.to` as the carrier reports it. A status that would be
    in_transit becomes arrived_city when the newest checkpoint lies in the destination city:
    same city part of the 12-digit administrative codes (`areaCode` vs `to.number`; for the
    municipalities the same province part) when both are known to city level, else the same
    city name (without a trailing 市) and, when both are known, the same province. The event
    then describes the arrival, the oldest checkpoint of the newest unbroken run of checkpoints
    in that city, so later pushes from inside the city repeat the same event (same id) instead
    of announcing the arrival again.

Ids and times
    `kuaidi100:{shop_id}:{com}:{nu}:{status}:{checkpoint time, UTC ISO}` — a redelivery or an
    updateall re-push of the same checkpoint gives the same id. Times are Asia/Shanghai
    (UTC+8, no DST since 1991) and converted to UTC; the event time is the checkpoint's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Final
from urllib.parse import parse_qs

from libs.common.events import Envelope
from services.ingest.platforms.base import InvalidPayload, Normalized, ShopContext
from services.ingest.platforms.payloads import (
    CHINA_TIME,
    JsonObject,
    ShopEvents,
    address,
    arrival,
    bounded_utc,
    checkpoint,
    iso_second,
    load_json_object,
    missing,
    objects,
    required_object,
    required_text,
    secret_signs,
    text,
)

RESPONSE: Final = '{"result":true,"returnCode":"200","message":"成功"}'.encode()
PARAM_FIELD: Final = "param"
SIGN_FIELD: Final = "sign"

IN_TRANSIT: Final = "in_transit"
ARRIVED_CITY: Final = "arrived_city"
EXCEPTION: Final = "exception"


@dataclass(frozen=True)
class State:
    """One documented Kuaidi100 state: its name and the canonical status (None: no event)."""

    name: str
    status: str | None


STATES: Final[Mapping[int, State]] = {
    0: State("在途", IN_TRANSIT),
    1001: State("到达派件城市", ARRIVED_CITY),
    1002: State("干线", IN_TRANSIT),
    1003: State("转递", IN_TRANSIT),
    1: State("揽收", "picked_up"),
    101: State("已下单", None),
    102: State("待揽收", None),
    103: State("已揽收", "picked_up"),
    5: State("派件", "out_for_delivery"),
    501: State("投柜或驿站", "out_for_delivery"),
    3: State("签收", "delivered"),
    301: State("本人签收", "delivered"),
    302: State("派件异常后签收", "delivered"),
    303: State("代签", "delivered"),
    304: State("投柜或站签收", "delivered"),
    2: State("疑难", EXCEPTION),
    201: State("超时未签收", EXCEPTION),
    202: State("超时未更新", EXCEPTION),
    203: State("拒收", EXCEPTION),
    204: State("派件异常", EXCEPTION),
    205: State("柜或驿站超时未取", EXCEPTION),
    206: State("无法联系", EXCEPTION),
    207: State("超区", EXCEPTION),
    208: State("滞留", EXCEPTION),
    209: State("破损", EXCEPTION),
    210: State("销单", EXCEPTION),
    4: State("退签", "returned"),
    401: State("已销单", EXCEPTION),
    14: State("拒签", EXCEPTION),
    6: State("退回", "returned"),
    7: State("转投", IN_TRANSIT),
    8: State("清关", IN_TRANSIT),
    10: State("待清关", IN_TRANSIT),
    11: State("清关中", IN_TRANSIT),
    12: State("已清关", IN_TRANSIT),
    13: State("清关异常", EXCEPTION),
}
"""Every documented state code (main states and resultv2 sub-states)."""

MAIN_STATES: Final = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 14})

_PROVINCES: Final[Mapping[str, str]] = {
    "北京": "北京市",
    "天津": "天津市",
    "上海": "上海市",
    "重庆": "重庆市",
    "河北": "河北省",
    "山西": "山西省",
    "辽宁": "辽宁省",
    "吉林": "吉林省",
    "黑龙江": "黑龙江省",
    "江苏": "江苏省",
    "浙江": "浙江省",
    "安徽": "安徽省",
    "福建": "福建省",
    "江西": "江西省",
    "山东": "山东省",
    "河南": "河南省",
    "湖北": "湖北省",
    "湖南": "湖南省",
    "广东": "广东省",
    "海南": "海南省",
    "四川": "四川省",
    "贵州": "贵州省",
    "云南": "云南省",
    "陕西": "陕西省",
    "甘肃": "甘肃省",
    "青海": "青海省",
    "台湾": "台湾省",
    "内蒙古": "内蒙古自治区",
    "广西": "广西壮族自治区",
    "西藏": "西藏自治区",
    "宁夏": "宁夏回族自治区",
    "新疆": "新疆维吾尔自治区",
    "香港": "香港特别行政区",
    "澳门": "澳门特别行政区",
}
"""Short name → full name of every province-level division."""

_SHORT_NAMES: Final = sorted(_PROVINCES, key=len, reverse=True)
_MUNICIPALITIES: Final = frozenset({"北京市", "天津市", "上海市", "重庆市"})
_MUNICIPALITY_CODES: Final = frozenset({"11", "12", "31", "50"})
_CITY: Final = re.compile(r"^(.{1,12}?(?:市|自治州|地区|盟))")
_BRACKET: Final = re.compile(r"^\s*[【\[]([^】\]]{2,40})[】\]]")
_AREA_CODE: Final = re.compile(r"^(?:CN)?(\d{12})$")
_TIME_FORMATS: Final = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M")


@dataclass(frozen=True)
class Place:
    """Where a checkpoint or destination is: full province name, city, 12-digit area code."""

    province: str | None = None
    city: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class _Checkpoint:
    time: datetime
    place: Place
    description: str | None
    status_code: int | None


class Kuaidi100Adapter:
    """Verifies and normalises Kuaidi100 subscription pushes (快递信息推送服务)."""

    name = "kuaidi100"

    def verify(self, body: bytes, headers: Mapping[str, str], secrets: Sequence[str]) -> bool:
        try:
            form = _form(body)
        except InvalidPayload:
            return False
        param = form.get(PARAM_FIELD)
        remote = form.get(SIGN_FIELD)
        if param is None or not remote:
            return False
        return secret_signs(remote.strip().upper(), secrets, partial(sign, param))

    def normalize(self, body: bytes, headers: Mapping[str, str], shop: ShopContext) -> Normalized:
        form = _form(body)
        raw = form.get(PARAM_FIELD)
        if raw is None:
            missing(PARAM_FIELD)
        # A param that is not a JSON object is a 400 here, as for AfterShip (422 for platforms).
        param = load_json_object(raw, PARAM_FIELD, non_object_status=400)
        monitor = param.get("status")
        topic = monitor if isinstance(monitor, str) and monitor else "push"
        event = _event(param, ShopEvents("kuaidi100", shop))
        return Normalized(
            topic=topic,
            events=[event] if event is not None else [],
            response=RESPONSE,
        )


def sign(param: str, salt: str) -> str:
    """Kuaidi100's push signature: upper-case hex MD5 of `param + salt` (UTF-8)."""
    return hashlib.md5((param + salt).encode()).hexdigest().upper()


def parse_place(area: str | None, code: str | None = None) -> Place:
    """Province and city of an `areaName` ("江苏,苏州市" or "浙江省杭州市西湖区")."""
    area_code = _area_code(code)
    if not area or not area.strip():
        return Place(code=area_code)
    area = "".join(area.split())
    if "," in area or "，" in area:
        parts = [part for part in re.split(r"[,，]", area) if part]
        if not parts:
            return Place(code=area_code)
        named = _full_province(parts[0])
        city = named if named in _MUNICIPALITIES else (parts[1] if len(parts) > 1 else None)
        return Place(named, city, area_code)
    province, rest = _leading_province(area)
    if province in _MUNICIPALITIES:
        return Place(province, province, area_code)
    match = _CITY.match(rest)
    return Place(province, match.group(1) if match else None, area_code)


def same_city(checkpoint: Place, destination: Place) -> bool:
    """Whether a checkpoint lies in the destination city (codes first, then names)."""
    by_code = _same_city_by_code(checkpoint.code, destination.code)
    if by_code is not None:
        return by_code
    if not checkpoint.city or not destination.city:
        return False
    if _city_key(checkpoint.city) != _city_key(destination.city):
        return False
    return not (
        checkpoint.province and destination.province and checkpoint.province != destination.province
    )


def _form(body: bytes) -> dict[str, str]:
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidPayload("body", f"not a UTF-8 form: {exc}", status=400) from None
    return {name: values[0] for name, values in fields.items() if values}


def _event(param: JsonObject, shop: ShopEvents) -> Envelope | None:
    result = required_object(param, "lastResult", "param.lastResult")
    number = required_text(result, "nu", "param.lastResult.nu")
    carrier = required_text(result, "com", "param.lastResult.com")
    state_code = _code(result.get("state"))
    if state_code is None:
        raise InvalidPayload(
            "param.lastResult.state", f"missing or not a state code: {result.get('state')!r}"
        )
    checkpoints = _checkpoints(result.get("data"))
    if not checkpoints:
        return None
    latest = checkpoints[0]
    code = _refine(state_code, latest.status_code)
    state = _state(code)
    status = state.status
    if status is None:
        return None
    destination = _destination(result.get("routeInfo"))
    current = latest
    if status in (IN_TRANSIT, ARRIVED_CITY) and destination is not None:
        arrived = arrival(checkpoints, lambda item: same_city(item.place, destination))
        if arrived is not None:
            status, current = ARRIVED_CITY, arrived
    when = iso_second(current.time)
    data: JsonObject = {
        "tracking_number": number,
        "carrier": carrier,
        "status": status,
        "checkpoint": checkpoint(
            time=when,
            province=current.place.province,
            city=current.place.city,
            description=current.description,
        ),
    }
    if destination is not None and (destination.province or destination.city):
        data["destination"] = address(
            country="CN" if destination.code else None,
            province=destination.province,
            city=destination.city,
        )
    if status == EXCEPTION:
        data["reason"] = state.name
    key = (carrier, number, status, when)
    return shop.build(f"logistics.{status}", key, time=current.time, data=data)


def _checkpoints(value: Any) -> list[_Checkpoint]:
    """The checkpoints, newest first (pushes are newest first; sorting makes sure of it)."""
    found: list[tuple[int, _Checkpoint]] = []
    for index, item in enumerate(objects(value, "param.lastResult.data")):
        where = f"param.lastResult.data[{index}]"
        at = text(item.get("ftime")) or text(item.get("time")) or missing(f"{where}.ftime")
        context = text(item.get("context"))
        place = parse_place(text(item.get("areaName")), text(item.get("areaCode")))
        if place.city is None and place.province is None and context:
            bracket = _BRACKET.match(context)
            if bracket:
                place = parse_place(bracket.group(1), place.code)
        found.append(
            (
                index,
                _Checkpoint(
                    time=_time(at, f"{where}.ftime"),
                    place=place,
                    description=context,
                    status_code=_code(item.get("statusCode")),
                ),
            )
        )
    found.sort(key=lambda pair: (-pair[1].time.timestamp(), pair[0]))
    return [item for _, item in found]


def _destination(route: Any) -> Place | None:
    if not isinstance(route, dict):
        return None
    to = route.get("to")
    if not isinstance(to, dict):
        return None
    place = parse_place(text(to.get("name")), text(to.get("number")))
    if place.city is None and place.province is None and place.code is None:
        return None
    return place


def _parent(code: int) -> int | None:
    if code in MAIN_STATES:
        return code
    if 1000 <= code <= 1099:
        return 0
    if 100 <= code <= 999 and code // 100 in MAIN_STATES:
        return code // 100
    if 10 <= code <= 13:
        return 8
    return None


def _refine(state: int, checkpoint_code: int | None) -> int:
    if checkpoint_code is None or state not in MAIN_STATES or checkpoint_code == state:
        return state
    if checkpoint_code in STATES and _parent(checkpoint_code) == state:
        return checkpoint_code
    return state


def _state(code: int) -> State:
    known = STATES.get(code)
    if known is not None:
        return known
    parent = _parent(code)
    if parent is None:
        raise InvalidPayload("param.lastResult.state", f"unknown state {code}")
    return State(f"{STATES[parent].name}({code})", STATES[parent].status)


def _code(value: Any) -> int | None:
    """A state code given as a number or a string of up to 9 ASCII digits; None when absent
    or unreadable (no documented code has more than 4 digits)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    digits = value.strip() if isinstance(value, str) else ""
    if 0 < len(digits) <= 9 and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def _time(value: str, field: str) -> datetime:
    """A checkpoint time in UTC (1970–2100); unlike Taobao's `_top_time` it may lack seconds,
    never has fractions."""
    for fmt in _TIME_FORMATS:
        try:
            local = datetime.strptime(value.strip(), fmt).replace(tzinfo=CHINA_TIME)
        except ValueError:
            continue
        return bounded_utc(local, field)
    raise InvalidPayload(field, f"not a 'yyyy-MM-dd HH:mm:ss' time: {value!r}")


def _full_province(name: str) -> str:
    for short in _SHORT_NAMES:
        if name.startswith(short):
            rest = name[len(short) :]
            if not rest or rest == _PROVINCES[short][len(short) :] or rest in ("省", "市"):
                return _PROVINCES[short]
    return name


def _leading_province(text: str) -> tuple[str | None, str]:
    """A written-out province at the start of `text` (its suffix is required) and the rest."""
    for short in _SHORT_NAMES:
        full = _PROVINCES[short]
        if text.startswith(full):
            return full, text[len(full) :]
    return None, text


def _area_code(code: str | None) -> str | None:
    if not code:
        return None
    match = _AREA_CODE.match(code.strip().upper())
    return match.group(1) if match else None


def _same_city_by_code(left: str | None, right: str | None) -> bool | None:
    if left is None or right is None:
        return None
    if left[:2] != right[:2]:
        return False
    if left[:2] in _MUNICIPALITY_CODES:
        return True
    if left[2:4] == "00" or right[2:4] == "00":
        return None
    return left[2:4] == right[2:4]


def _city_key(city: str) -> str:
    """Chinese names only: no case to fold, and a lone 市 is kept (unlike Shopify's)."""
    city = "".join(city.split())
    return city[:-1] if len(city) > 1 and city.endswith("市") else city

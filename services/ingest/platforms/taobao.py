"""Taobao / Tmall trade and refund messages (TMC, 消息服务) forwarded to Huitou over HTTP.

What arrives
    TMC itself delivers to an app over the SDK's long connection or through the
    `taobao.tmc.messages.consume` API; it has no HTTP push of its own. The shop's relay (the
    official `TmcClient`, or an ISV gateway) POSTs each message, one per request, to
    `/v1/webhooks/taobao/{shop_id}`. The body is one message in the JSON shape that
    `taobao.tmc.messages.consume` returns (`TmcMessage`; real example in alibaba/top
    `test/fixtures/tmc_messages_consume_response.json`)::

        {"user_id": 123456789, "user_nick": "usernick", "content": "{\\"tid\\": ...}",
         "id": 7104300007405429232, "pub_time": "2013-10-05 10:55:58",
         "pub_app_key": "12499723", "topic": "taobao_trade_TradeBuyerPay"}

    `content` is the topic's own message as a JSON string (an already parsed object is accepted
    too); its fields per topic are those of the open platform's topic pages, as mirrored in
    TheNorthMemory/tmc.js `types/message-fields.d.ts` (tid, oid, buyer_nick, buyer_open_uid,
    payment, seller_nick, status, type; refunds: refund_id, refund_fee, modified, ...).

Signature
    The relay signs as the open platform signs the requests it pushes to developers (SPI). The
    rule is `SpiUtils.sign` of the official TOP Java SDK (`com.taobao.api.internal.spi`, as
    shipped in e.g. opendingtalk/alibaba-dingtalk-service-sdk)::

        sign = HEX_UPPER(MD5(secret + name1 + value1 + name2 + value2 + ... + body + secret))

    with the parameters sorted by name, `sign` itself left out, the body appended as text and
    everything encoded in the Content-Type charset (UTF-8 when none is given). Header values take
    part when the header is named in the comma-separated `top-sign-list` header, URL-decoded.
    SPI carries `sign` and `timestamp` in the URL query; an adapter sees only body and headers,
    so here every parameter is a header: `timestamp` (required, "yyyy-MM-dd HH:mm:ss" in GMT+8
    like every TOP timestamp, and listed in `top-sign-list`), any others the relay adds
    (`app_key`, ...) listed there too, and the signature in the `sign` header. The parameter set
    and so the signature are the same as with those parameters in the query. As
    `SpiUtils.checkTimestamp` does, a `timestamp` more than five minutes old is refused; unlike
    it, so is one more than five minutes ahead. SPI signs with MD5 only (the `hmac` sign methods
    belong to API calls made *to* the platform), so only MD5 is accepted.

Mapping (topic → canonical event)
    ============================================  ===============  =============================
    taobao_trade_TradeCreate                      order.created    created_at = pub_time
    taobao_trade_TradeBuyerPay                    order.paid       paid_at = pub_time
    taobao_trade_TradeSellerShip                  order.shipped    shipped_at = pub_time
    taobao_trade_TradeSuccess                     order.completed  completed_at = pub_time
    taobao_trade_TradeClose                       order.cancelled  cancelled_at = pub_time
    taobao_trade_TradeCloseAndModifyDetailOrder   order.cancelled  only when `status` is
                                                                   TRADE_CLOSED(_BY_TAOBAO);
                                                                   a sub-order change: no event
    taobao_refund_RefundSuccess                   order.refunded   refund = refund_fee,
                                                                   refunded_at = modified
    taobao_refund_RefundCreated, any other topic  (no event)       a refund request moves no
                                                                   money; it may be refused
    ============================================  ===============  =============================

Field rules
    - Money: yuan decimal strings ("200.07") become integer fen of CNY, the only currency of
      Taobao trades. The order total is `payment` (实付金额): it is required on trade topics, as
      a made-up total would poison every sum downstream; a relay that lacks it should enrich the
      message from `taobao.trade.fullinfo.get` first. Refund messages carry no order total, so
      `order.refunded` has no `total` (consumers keep the one they know) unless the relay added
      `payment`; the amount refunded is its `refund`. Amounts are plain non-negative yuan: a
      sign, an exponent, a float or a third decimal is refused.
    - Customer: `buyer_open_uid` (the stable, app-scoped buyer id meant to replace the nick),
      else `buyer_nick`; a masked nick ("t**") identifies nobody and is refused when no open uid
      comes with it. An unmasked nick is also the customer's name. The subject is that id.
    - Times: TOP times are "yyyy-MM-dd HH:mm:ss" in GMT+8 (Asia/Shanghai has no DST since 1991),
      converted to UTC. The event time is the content's `modified` when present (refunds), else
      the message's `pub_time`.
    - Ids: each transition happens once per trade, so an event id is
      `taobao:{shop_id}:{tid}:{type}` (refunds add `:{refund_id}`). Redelivery, and a second
      message for the same transition (TradeClose and TradeCloseAndModifyDetailOrder both
      closing a trade), give the same id and are deduplicated downstream.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final
from urllib.parse import unquote_plus

from libs.common.events import Envelope
from services.ingest.platforms.base import InvalidPayload, Normalized, ShopContext
from services.ingest.platforms.payloads import (
    CHINA_TIME,
    JsonObject,
    ShopEvents,
    bounded_utc,
    header,
    load_json_object,
    missing,
    money,
    required_object,
    required_string,
    secret_signs,
    text,
)

CURRENCY: Final = "CNY"
SIGN_HEADER: Final = "sign"
SIGN_LIST_HEADER: Final = "top-sign-list"
TIMESTAMP_PARAM: Final = "timestamp"
DEFAULT_MAX_SKEW: Final = timedelta(minutes=5)

ORDER_TOPICS: Final[Mapping[str, str]] = {
    "taobao_trade_TradeCreate": "created",
    "taobao_trade_TradeBuyerPay": "paid",
    "taobao_trade_TradeSellerShip": "shipped",
    "taobao_trade_TradeSuccess": "completed",
    "taobao_trade_TradeClose": "cancelled",
    "taobao_trade_TradeCloseAndModifyDetailOrder": "cancelled",
}
REFUND_SUCCESS_TOPIC: Final = "taobao_refund_RefundSuccess"
PARTIAL_CLOSE_TOPIC: Final = "taobao_trade_TradeCloseAndModifyDetailOrder"
TRADE_CLOSED_STATUSES: Final = frozenset({"TRADE_CLOSED", "TRADE_CLOSED_BY_TAOBAO"})

_TOP_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,6})?$")
_YUAN = re.compile(r"^(0|[1-9]\d*)(\.\d{1,2})?$")
_DIGITS = re.compile(r"^[1-9]\d*$")


def top_sign(params: Mapping[str, str], body: str, secret: str, charset: str = "utf-8") -> str:
    """The TOP SPI signature: upper-case hex MD5 of secret, sorted params, body and secret."""
    joined = "".join(name + params[name] for name in sorted(params) if name != SIGN_HEADER)
    return hashlib.md5((secret + joined + body + secret).encode(charset)).hexdigest().upper()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class TaobaoAdapter:
    """Verifies and normalises Taobao/Tmall TMC trade and refund messages relayed over HTTP."""

    name = "taobao"

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] = _utc_now,
        max_skew: timedelta = DEFAULT_MAX_SKEW,
    ) -> None:
        self._clock = clock
        self._max_skew = max_skew

    def verify(self, body: bytes, headers: Mapping[str, str], secrets: Sequence[str]) -> bool:
        # Not `header()`: signed values must stay exactly as sent, unstripped.
        lowered = {key.lower(): value for key, value in headers.items()}
        remote = lowered.get(SIGN_HEADER)
        charset = _charset(lowered.get("content-type"))
        if not remote or charset is None:
            return False
        try:
            decoded = body.decode(charset)
            params = _signed_header_params(lowered, charset)
        except UnicodeDecodeError:
            return False
        timestamp = params.get(TIMESTAMP_PARAM)
        if timestamp is None or not self._fresh(timestamp):
            return False
        return secret_signs(remote, secrets, partial(top_sign, params, decoded, charset=charset))

    def normalize(self, body: bytes, headers: Mapping[str, str], shop: ShopContext) -> Normalized:
        message = _message(body, headers)
        topic = required_string(message, "topic", "topic")
        delivery_id = text(message.get("id"))
        if topic not in ORDER_TOPICS and topic != REFUND_SUCCESS_TOPIC:
            return Normalized(topic=topic, delivery_id=delivery_id)
        content = _content(message)
        if topic == PARTIAL_CLOSE_TOPIC and content.get("status") not in TRADE_CLOSED_STATUSES:
            return Normalized(topic=topic, delivery_id=delivery_id)
        event = _order_event(ShopEvents("taobao", shop), topic, message, content)
        return Normalized(topic=topic, events=[event], delivery_id=delivery_id)

    def _fresh(self, timestamp: str) -> bool:
        try:
            sent = _top_time(timestamp, TIMESTAMP_PARAM)
        except InvalidPayload:
            return False
        return abs(self._clock() - sent) <= self._max_skew


def _charset(content_type: str | None) -> str | None:
    """The charset of a Content-Type, as the TOP SDK reads it (UTF-8 default, GB* as GBK)."""
    charset = "utf-8"
    for part in (content_type or "").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    if charset.lower().startswith("gb"):
        charset = "gbk"
    try:
        codecs.lookup(charset)
    except LookupError:
        return None
    return charset


def _signed_header_params(lowered: Mapping[str, str], charset: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for raw_name in lowered.get(SIGN_LIST_HEADER, "").split(","):
        name = raw_name.strip()
        if name:
            value = lowered.get(name.lower(), "")
            params[name] = unquote_plus(value, encoding=charset, errors="strict")
    return params


def _message(body: bytes, headers: Mapping[str, str]) -> JsonObject:
    charset = _charset(header(headers, "content-type"))
    if charset is None:
        raise InvalidPayload("content-type", "unknown charset", status=400)
    try:
        decoded = body.decode(charset)
    except UnicodeDecodeError as exc:
        raise InvalidPayload("body", f"not {charset}: {exc}", status=400) from None
    return load_json_object(decoded)


def _content(message: JsonObject) -> JsonObject:
    """The topic's own message: a JSON string, or an object a relay already parsed."""
    raw = message.get("content")
    if isinstance(raw, str):
        return load_json_object(raw, "content")
    return required_object(message, "content", "content")


def _order_event(
    shop: ShopEvents, topic: str, message: JsonObject, content: JsonObject
) -> Envelope:
    tid = _numeric_id(content, "tid")
    customer = _customer(content)
    if "modified" in content:
        occurred = _top_time(content["modified"], "modified")
    elif "pub_time" in message:
        occurred = _top_time(message["pub_time"], "pub_time")
    else:
        missing("pub_time")

    status = "refunded" if topic == REFUND_SUCCESS_TOPIC else ORDER_TOPICS[topic]
    key = [tid, f"order.{status}"]
    if status == "refunded":
        key.append(_numeric_id(content, "refund_id"))
    elif "payment" not in content:
        raise InvalidPayload("payment", "missing: the order total of a trade message")
    data: JsonObject = {
        "order_id": tid,
        "customer": customer,
        "status": status,
        f"{status}_at": occurred,
    }
    if "payment" in content:
        data["total"] = _yuan(content["payment"], "payment")
    if status == "refunded":
        if "refund_fee" not in content:
            missing("refund_fee")
        data["refund"] = _yuan(content["refund_fee"], "refund_fee")
    return shop.build(f"order.{status}", key, time=occurred, data=data)


def _customer(content: Mapping[str, Any]) -> dict[str, str]:
    """Not `contact()`: the id is the open uid or an unmasked nick, kept exactly as sent."""
    open_uid = content.get("buyer_open_uid")
    nick = content.get("buyer_nick")
    usable_nick = nick if isinstance(nick, str) and nick and "*" not in nick else None
    customer: dict[str, str] = {}
    if isinstance(open_uid, str) and open_uid:
        customer["id"] = open_uid
    elif usable_nick:
        customer["id"] = usable_nick
    else:
        raise InvalidPayload("buyer_open_uid", "missing, and buyer_nick is missing or masked")
    if usable_nick:
        customer["name"] = usable_nick
    return customer


def _numeric_id(content: Mapping[str, Any], field: str) -> str:
    """A TOP numeric id (tid, refund_id): digits only, unlike the lenient `required_text`."""
    value = content.get(field)
    if value is None:
        missing(field)
    digits = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if not _DIGITS.match(digits):
        raise InvalidPayload(field, f"not a numeric id: {value!r}")
    return digits


def _yuan(value: Any, field: str) -> JsonObject:
    """A yuan amount ("200.07", or a whole number) as CNY money.

    Stricter than `money` alone: a TOP amount is a plain non-negative decimal, never a float.
    """
    whole = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if not (whole or (isinstance(value, str) and _YUAN.match(value))):
        raise InvalidPayload(field, f"not an amount in yuan: {value!r}")
    return money(value, CURRENCY, field)


def _top_time(value: Any, field: str) -> datetime:
    """A TOP time, "yyyy-MM-dd HH:mm:ss" in GMT+8, as an aware UTC datetime (1970–2100).

    Stricter than Kuaidi100's `_time`: seconds are required (a fraction is allowed), as in TOP.
    """
    if not isinstance(value, str) or not _TOP_TIME.match(value):
        raise InvalidPayload(field, f"expected 'yyyy-MM-dd HH:mm:ss' (GMT+8), got {value!r}")
    try:
        local = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidPayload(field, str(exc)) from None
    return bounded_utc(local.replace(tzinfo=CHINA_TIME), field)

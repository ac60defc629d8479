"""Aliyun (Alibaba Cloud) SMS: Dysmsapi 2017-05-25, its RPC-style API.

A small signer over `httpx.AsyncClient`, not the official SDK: the SDK's clients
(`aliyun-python-sdk-core`, `alibabacloud_dysmsapi20170525`) are synchronous, so calling
them would block the event loop for a whole round trip or need a thread per call. The
RPC signature is a dozen lines (Aliyun's "请求签名" document), and the tests check ours
against the SDK's own signer in a local server (`tests/notifier/aliyun_server.py`).

- `send`: `SendSms` with the shop's sign name and the message's approved template
  (`TemplateCode`, `TemplateParam` as a JSON object); Huitou's `message_id` goes in
  `OutId`, Aliyun's `BizId` comes back as the provider message id.
- `query`: `QuerySendDetails` for the recipient and the China-time date of the attempt,
  looking for the record whose `OutId` is the message's id.
- `parse_callback`: Aliyun's HTTP batch pushes (HTTP批量推送): delivery reports
  (`SmsReport`) and inbound replies (`SmsUp`), JSON arrays. Aliyun does not sign them; the
  notifier checks the secret token of the callback URL before calling this. Aliyun wants
  `CALLBACK_ANSWER` back, or it pushes the batch again (up to 10 times).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any, Final, Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.notifier.providers.base import (
    CallbackRejected,
    Outcome,
    Outgoing,
    Receipt,
)

API_VERSION: Final = "2017-05-25"
DEFAULT_ENDPOINT: Final = "https://dysmsapi.aliyuncs.com"
DEFAULT_TIMEOUT_S: Final = 10.0
CHINA_TZ: Final = timezone(timedelta(hours=8))
"""Aliyun's dates (`SendDate`, the pushes' times) are China time."""

CALLBACK_ANSWER: Final[dict[str, Any]] = {"code": 0, "msg": "成功"}
"""The body Aliyun expects in answer to a push it should not send again."""

THROTTLED_CODES: Final = frozenset(
    {
        "isv.BUSINESS_LIMIT_CONTROL",  # per-number frequency limit (1/min, 5/h, 10/day…)
        "isv.DAY_LIMIT_CONTROL",  # the account's daily quota set in the console
        "isv.MONTH_LIMIT_CONTROL",  # the account's monthly quota
        "Throttling",  # the API gateway's own flow control
        "Throttling.User",
        "Throttling.Api",
    }
)
TRANSIENT_CODES: Final = frozenset(
    {"isp.SYSTEM_ERROR", "isp.GATEWAY_ERROR", "isp.UNKNOWN", "ServiceUnavailable", "InternalError"}
)
"""Aliyun's own failures: not sent, worth another try. Other `isp.*` codes are too, except
`isp.RAM_PERMISSION_DENY` (the key lacks the SMS permission: a configuration error)."""
PERMANENT_ISP_CODES: Final = frozenset({"isp.RAM_PERMISSION_DENY"})

PAGE_SIZE: Final = 50
"""`QuerySendDetails` answers at most 50 records a page."""
MAX_PAGES: Final = 20
DATE_SLACK: Final = (timedelta(minutes=-5), timedelta(0), timedelta(minutes=15))
"""`SendDate` is the day Aliyun received the request: an attempt started just before
midnight (China time), or under a skewed clock, is looked for on the neighbouring day too."""

_MAINLAND_MOBILE = re.compile(r"1\d{10}")
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class AliyunSettings(BaseModel):
    """A shop's Aliyun SMS account: an AccessKey (RAM user with `AliyunDysmsFullAccess`
    or a send-only policy) and the approved sign name (短信签名)."""

    model_config = ConfigDict(extra="forbid")

    access_key_id: str = Field(min_length=1)
    access_key_secret: SecretStr
    sign_name: str = Field(min_length=1)
    endpoint: str = DEFAULT_ENDPOINT
    """Base URL of the API (another region's endpoint, or a test server)."""
    region: str = "cn-hangzhou"


# --- Signing (Aliyun RPC signature, HMAC-SHA1, SignatureVersion 1.0) -------------------


def percent_encode(value: str) -> str:
    """RFC 3986 percent-encoding of UTF-8, as Aliyun's `specialUrlEncode`: only
    `A-Z a-z 0-9 - _ . ~` stay as they are (space is `%20`, `*` is `%2A`)."""
    return quote(value, safe="~")


def string_to_sign(method: str, params: Mapping[str, str]) -> str:
    """`METHOD&%2F&` + the encoded, key-sorted `key=value&…` of every parameter except
    `Signature`, itself encoded once more."""
    canonical = "&".join(
        f"{percent_encode(key)}={percent_encode(params[key])}"
        for key in sorted(params)
        if key != "Signature"
    )
    return f"{method}&{percent_encode('/')}&{percent_encode(canonical)}"


def sign(method: str, params: Mapping[str, str], secret: str) -> str:
    """The `Signature` of a request: base64(HMAC-SHA1(secret + "&", string to sign))."""
    digest = hmac.new(
        f"{secret}&".encode(), string_to_sign(method, params).encode(), hashlib.sha1
    ).digest()
    return base64.b64encode(digest).decode()


def signed_form(
    settings: AliyunSettings,
    action: str,
    params: Mapping[str, str],
    *,
    now: datetime | None = None,
    nonce: str | None = None,
) -> str:
    """The form body of one call: the action's parameters, the common ones (a fresh nonce
    and the current UTC time unless given) and their `Signature`."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    full = {
        **params,
        "Action": action,
        "Version": API_VERSION,
        "Format": "JSON",
        "AccessKeyId": settings.access_key_id,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": nonce or str(uuid.uuid4()),
        "Timestamp": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "RegionId": settings.region,
    }
    full["Signature"] = sign("POST", full, settings.access_key_secret.get_secret_value())
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in full.items())


# --- Phone numbers ---------------------------------------------------------------------


def aliyun_number(e164: str) -> str:
    """Aliyun's form of a number: mainland (+86) numbers as the 11-digit national number,
    others in international format without `+` (`+85291234567` → `85291234567`)."""
    digits = e164.strip().removeprefix("+")
    if e164.strip().startswith("+86"):
        return digits[2:]
    return digits


def e164_number(phone: str) -> str:
    """E.164 form of a number Aliyun reports: 11-digit mainland numbers get `+86`, other
    digit strings (international format without `+`) get `+`."""
    phone = phone.strip()
    if _MAINLAND_MOBILE.fullmatch(phone):
        return f"+86{phone}"
    if phone.isdigit():
        return f"+{phone}"
    return phone


# --- Answers ---------------------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _error_outcome(status: int, data: dict[str, Any] | None, body: bytes) -> Outcome:
    """The outcome of an answer that is not `Code: OK`."""
    code = str(data.get("Code") or "") if data else ""
    detail = str(data.get("Message") or "") or None if data else None
    if code in THROTTLED_CODES or code.startswith("Throttling") or (not code and status == 429):
        return Outcome("retry", code=code or "HTTP 429", detail=detail, throttled=True)
    if (
        status >= 500
        or code in TRANSIENT_CODES
        or (code.startswith("isp.") and code not in PERMANENT_ISP_CODES)
    ):
        return Outcome("retry", code=code or f"HTTP {status}", detail=detail)
    if code:
        return Outcome("failed", code=code, detail=detail)
    if 200 <= status < 300:
        # Not Aliyun's JSON: whether it took the message cannot be told from this.
        return Outcome("unknown", code=f"HTTP {status}", detail=body[:200].decode(errors="replace"))
    return Outcome("failed", code=f"HTTP {status}", detail=body[:200].decode(errors="replace"))


def send_outcome(status: int, body: bytes) -> Outcome:
    """The outcome of a `SendSms` answer."""
    data = _json_object(body)
    if status == 200 and data is not None and data.get("Code") == "OK":
        return Outcome("sent", provider_message_id=str(data.get("BizId") or "") or None)
    return _error_outcome(status, data, body)


def _transport_outcome(exc: httpx.TransportError) -> Outcome:
    """Before the request went out (no connection) it is a `retry`; after, Aliyun may have
    it: `unknown`."""
    kind: Literal["retry", "unknown"] = (
        "retry"
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        else "unknown"
    )
    return Outcome(kind, code=type(exc).__name__, detail=str(exc) or None)


def _china_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=CHINA_TZ)
    except ValueError:
        return None


def send_dates(sent_at: datetime) -> list[date]:
    """The China-time days on which Aliyun may have recorded an attempt started at
    `sent_at` (naive times are taken as UTC)."""
    if sent_at.tzinfo is None:
        sent_at = sent_at.replace(tzinfo=UTC)
    return sorted({(sent_at + slack).astimezone(CHINA_TZ).date() for slack in DATE_SLACK})


# --- Callbacks -------------------------------------------------------------------------


def _text(item: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = item.get(key)
    if value is None or value == "":
        if required:
            raise CallbackRejected(f"Aliyun push item without {key!r}")
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise CallbackRejected(f"Aliyun push item with a non-text {key!r}")
    return str(value)


def _report(item: Mapping[str, Any]) -> Receipt:
    """One `SmsReport` item: a delivery status."""
    success = item.get("success")
    if not isinstance(success, bool):
        raise CallbackRejected("SmsReport item whose 'success' is not a boolean")
    phone = _text(item, "phone_number", required=True)
    assert phone is not None
    return Receipt(
        "delivered" if success else "failed",
        provider_message_id=_text(item, "biz_id", required=True),
        message_id=_text(item, "out_id"),
        address=e164_number(phone),
        code=_text(item, "err_code"),
        detail=_text(item, "err_msg"),
        at=_china_time(item.get("report_time")),
    )


def _reply(item: Mapping[str, Any]) -> Receipt:
    """One `SmsUp` item: a message the recipient sent back."""
    phone = _text(item, "phone_number", required=True)
    assert phone is not None
    content = item.get("content")
    if not isinstance(content, str):
        raise CallbackRejected("SmsUp item whose 'content' is not text")
    return Receipt(
        "reply", address=e164_number(phone), text=content, at=_china_time(item.get("send_time"))
    )


def parse_push(body: bytes) -> list[Receipt]:
    """The receipts of one HTTP batch push: a JSON array of `SmsReport` items (they have
    `success`) or `SmsUp` items (they have `content`)."""
    try:
        items = json.loads(body)
    except ValueError as exc:
        raise CallbackRejected("Aliyun push that is not JSON") from exc
    if not isinstance(items, list):
        raise CallbackRejected("Aliyun push that is not a JSON array")
    receipts = []
    for item in items:
        if not isinstance(item, dict):
            raise CallbackRejected("Aliyun push item that is not an object")
        if "success" in item:
            receipts.append(_report(item))
        elif "content" in item:
            receipts.append(_reply(item))
        else:
            raise CallbackRejected("Aliyun push item that is neither SmsReport nor SmsUp")
    return receipts


# --- The adapter -----------------------------------------------------------------------


class AliyunAdapter:
    """Aliyun SMS for the notifier (see the module's docstring)."""

    name = "aliyun"
    channel: Literal["sms", "email"] = "sms"
    settings_model: type[BaseModel] = AliyunSettings
    can_query = True

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        """`client` is shared with the caller (who closes it); without one the adapter
        makes its own on first use (timeout `DEFAULT_TIMEOUT_S`), closed by `aclose()`."""
        self._client = client
        self._owns_client = client is None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT_S)
        return self._client

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _call(
        self, settings: AliyunSettings, action: str, params: Mapping[str, str]
    ) -> httpx.Response:
        return await self._http().post(
            settings.endpoint.rstrip("/") + "/",
            content=signed_form(settings, action, params).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        )

    async def send(self, settings: AliyunSettings, message: Outgoing) -> Outcome:
        template = message.template
        if template is None:
            return Outcome(
                "failed", code="template_required", detail="Aliyun sends approved templates only"
            )
        if not isinstance(template.params, Mapping):
            return Outcome(
                "failed",
                code="template_params_not_named",
                detail="Aliyun's TemplateParam takes named parameters",
            )
        params = {
            "PhoneNumbers": aliyun_number(message.to),
            "SignName": settings.sign_name,
            "TemplateCode": template.id,
            "OutId": message.message_id,
        }
        if template.params:
            params["TemplateParam"] = json.dumps(
                dict(template.params), ensure_ascii=False, separators=(",", ":")
            )
        try:
            response = await self._call(settings, "SendSms", params)
        except httpx.TransportError as exc:
            return _transport_outcome(exc)
        return send_outcome(response.status_code, response.content)

    async def query(
        self, settings: AliyunSettings, message: Outgoing, *, biz_id: str | None = None
    ) -> Outcome | None:
        """Aliyun's record of an earlier attempt: `sent` (waiting for its receipt or
        delivered), `failed` with the carrier's `ErrCode`, `None` when Aliyun has no record
        of it (safe to send again). When the status API itself cannot answer (network,
        5xx, throttling, an error code) this is an `unknown` outcome: ask again later,
        never a reason to send again. Aliyun's records carry no `BizId`, so
        `provider_message_id` is the `biz_id` given (when known), which also narrows the
        search."""
        phone = aliyun_number(message.to)
        found: list[Mapping[str, Any]] = []
        for day in send_dates(message.sent_at or datetime.now(UTC)):
            base = {"PhoneNumber": phone, "SendDate": day.strftime("%Y%m%d")}
            if biz_id:
                base["BizId"] = biz_id
            for page in range(1, MAX_PAGES + 1):
                params = {**base, "PageSize": str(PAGE_SIZE), "CurrentPage": str(page)}
                try:
                    response = await self._call(settings, "QuerySendDetails", params)
                except httpx.TransportError as exc:
                    return Outcome("unknown", code=type(exc).__name__, detail=str(exc) or None)
                data = _json_object(response.content)
                if response.status_code != 200 or data is None or data.get("Code") != "OK":
                    failure = _error_outcome(response.status_code, data, response.content)
                    return Outcome(
                        "unknown",
                        code=failure.code,
                        detail=failure.detail,
                        throttled=failure.throttled,
                    )
                records = _details(data)
                found += [r for r in records if r.get("OutId") == message.message_id]
                if len(records) < PAGE_SIZE or page * PAGE_SIZE >= _int(data.get("TotalCount")):
                    break
        return _query_outcome(found, biz_id)

    def parse_callback(
        self, settings: AliyunSettings, headers: Mapping[str, str], url: str, body: bytes
    ) -> list[Receipt]:
        return parse_push(body)


def _details(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """`SmsSendDetailDTOs.SmsSendDetailDTO[]` of a `QuerySendDetails` answer."""
    holder = data.get("SmsSendDetailDTOs")
    records = holder.get("SmsSendDetailDTO") if isinstance(holder, dict) else None
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def _int(value: object) -> int:
    """`TotalCount` is documented as a number in the sample and a string in the SDKs."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def _query_outcome(records: Iterable[Mapping[str, Any]], biz_id: str | None) -> Outcome | None:
    """`SendStatus` 1 (waiting for the receipt) or 3 (delivered) is `sent`, 2 `failed`;
    a `sent` record wins over a failed one of an earlier attempt."""
    failed: Outcome | None = None
    for record in records:
        status = _int(record.get("SendStatus"))
        if status in (1, 3):
            return Outcome("sent", provider_message_id=biz_id)
        if status == 2:
            failed = Outcome(
                "failed",
                provider_message_id=biz_id,
                code=str(record.get("ErrCode") or "") or None,
                detail="QuerySendDetails: SendStatus 2",
            )
    return failed


ADAPTER = AliyunAdapter()

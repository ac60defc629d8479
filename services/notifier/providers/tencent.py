"""Tencent Cloud SMS: API 3.0 `SendSms` (version 2021-01-11), signed with TC3-HMAC-SHA256.

The adapter is a small signer over `httpx.AsyncClient`, not the official SDK: the SDK's
classic client is synchronous (`requests`) and would block the notifier's event loop for
a whole provider round trip. (Recent `tencentcloud-sdk-python-common` releases add an
httpx-based async client, but it brings its own retries and circuit breaker, and those
decisions belong to the notifier; the signature itself is a few lines, checked in the
tests against Tencent's worked example and the SDK's signer.)

Signing follows Tencent's "签名方法 v3" exactly: canonical request `POST`, `/`, empty query,
the headers `content-type` and `host` (lower-cased), the SHA-256 of the body; the string
to sign `TC3-HMAC-SHA256`, the timestamp, the scope `<UTC date>/sms/tc3_request` and the
hash of the canonical request; the key derived from `"TC3" + SecretKey` through the date,
the service and `tc3_request`. The signed host is the endpoint's host (with its port,
for a test server), and it is the `Host` header sent.

`SessionContext` carries Huitou's `message_id`; Tencent echoes it in `SendStatusSet` and,
where the account has it enabled, in delivery reports (see `TencentAdapter.query`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr, field_validator

from services.notifier.providers.base import CallbackRejected, Outcome, Outgoing, Receipt

SERVICE = "sms"
API_VERSION = "2021-01-11"
DEFAULT_ENDPOINT = "https://sms.tencentcloudapi.com"
CONTENT_TYPE = "application/json; charset=utf-8"
SIGNED_HEADERS = "content-type;host"
ALGORITHM = "TC3-HMAC-SHA256"

CALLBACK_ANSWER: dict[str, Any] = {"result": 0, "errmsg": "OK"}
"""What Tencent expects back from a delivery-report or reply push."""

PULL_WINDOW = timedelta(days=7)
"""How far back `PullSmsSendStatusByPhoneNumber` reaches."""
QUERY_MARGIN = timedelta(minutes=1)
"""`BeginTime` starts this much before the attempt (clocks differ)."""

CHINA_TIME = timezone(timedelta(hours=8))
"""The zone of `user_receive_time` in delivery reports (Beijing time, no zone given)."""

# Codes named `LimitExceeded.*` that are not time-window limits: retrying cannot help.
_PERMANENT_LIMITS = frozenset(
    {"LimitExceeded.PhoneNumberCountLimit", "LimitExceeded.AppCountryOrRegionInBlacklist"}
)
# Codes where nothing was sent and a later attempt can succeed.
_TRANSIENT = frozenset(
    {
        "AuthFailure.SignatureExpire",  # our clock is off by more than 5 minutes
        "ServiceUnavailable",
        "ResourceUnavailable",
        "FailedOperation.MarketingSendTimeConstraint",  # marketing SMS only 08:00-22:00
    }
)
# Transport errors raised before the request could reach Tencent.
_NOT_SENT: tuple[type[httpx.HTTPError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
)


class TencentSettings(BaseModel):
    """A shop's Tencent Cloud SMS account."""

    model_config = ConfigDict(extra="forbid")

    secret_id: str
    secret_key: SecretStr
    sdk_app_id: str
    """`SmsSdkAppId`, e.g. `1400006666`."""
    sign_name: str
    """The approved signature (`SignName`), e.g. `腾讯云`."""
    region: str = "ap-guangzhou"
    endpoint: str = DEFAULT_ENDPOINT
    """Base URL of the API (a test server's `http://127.0.0.1:port` in tests)."""

    @field_validator("endpoint")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("endpoint must be an http(s) base URL")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("endpoint must be a base URL (API 3.0 posts to `/`)")
        return value


def tc3_authorization(
    secret_id: str,
    secret_key: str,
    *,
    host: str,
    timestamp: int,
    payload: bytes,
    service: str = SERVICE,
    content_type: str = CONTENT_TYPE,
) -> str:
    """The `Authorization` header for a TC3-HMAC-SHA256 signed `POST /` of `payload`."""
    date = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
    canonical_headers = (
        f"content-type:{content_type.strip().lower()}\nhost:{host.strip().lower()}\n"
    )
    canonical_request = "\n".join(
        ["POST", "/", "", canonical_headers, SIGNED_HEADERS, _sha256_hex(payload)]
    )
    scope = f"{date}/{service}/tc3_request"
    string_to_sign = "\n".join(
        [ALGORITHM, str(timestamp), scope, _sha256_hex(canonical_request.encode())]
    )
    key = _hmac(("TC3" + secret_key).encode(), date)
    key = _hmac(key, service)
    key = _hmac(key, "tc3_request")
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return (
        f"{ALGORITHM} Credential={secret_id}/{scope}, "
        f"SignedHeaders={SIGNED_HEADERS}, Signature={signature}"
    )


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


class TencentAdapter:
    """Sends one templated SMS per call through `SendSms`."""

    name = "tencent"
    channel: Literal["sms", "email"] = "sms"
    settings_model: type[BaseModel] = TencentSettings
    can_query = True

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`client` may be shared (its timeouts apply); without one, a client with a
        10 s timeout is made on first use. `clock` gives the signing timestamp."""
        self._client = client
        self._owns_client = client is None
        self._clock = clock

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10.0)
        return self._client

    async def aclose(self) -> None:
        """Close the client this adapter made (a shared one is its owner's to close)."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _call(
        self, settings: TencentSettings, action: str, params: Mapping[str, Any]
    ) -> httpx.Response:
        """POST one signed API 3.0 request; transport errors propagate."""
        payload = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
        host = urlsplit(settings.endpoint).netloc
        timestamp = int(self._clock())
        headers = {
            "Authorization": tc3_authorization(
                settings.secret_id,
                settings.secret_key.get_secret_value(),
                host=host,
                timestamp=timestamp,
                payload=payload,
            ),
            "Content-Type": CONTENT_TYPE,
            "Host": host,
            "X-TC-Action": action,
            "X-TC-Timestamp": str(timestamp),
            "X-TC-Version": API_VERSION,
            "X-TC-Region": settings.region,
        }
        url = settings.endpoint.rstrip("/") + "/"
        return await self._http().post(url, content=payload, headers=headers)

    async def send(self, settings: TencentSettings, message: Outgoing) -> Outcome:
        template = message.template
        if template is None:
            return Outcome(
                "failed", code="huitou.TemplateRequired", detail="Tencent sends templates only"
            )
        if isinstance(template.params, Mapping):
            return Outcome(
                "failed",
                code="huitou.TemplateParamsNotOrdered",
                detail="Tencent's TemplateParamSet is an ordered list, not a mapping",
            )
        params = {
            "PhoneNumberSet": [message.to],
            "SmsSdkAppId": settings.sdk_app_id,
            "SignName": settings.sign_name,
            "TemplateId": template.id,
            "TemplateParamSet": [str(value) for value in template.params],
            "SessionContext": message.message_id,
        }
        try:
            response = await self._call(settings, "SendSms", params)
        except _NOT_SENT as exc:
            return Outcome("retry", code=type(exc).__name__, detail=str(exc) or None)
        except httpx.TransportError as exc:
            # ReadTimeout, WriteTimeout, ReadError, RemoteProtocolError...: the request may
            # have reached Tencent; the notifier queries before sending again.
            return Outcome("unknown", code=type(exc).__name__, detail=str(exc) or None)
        return _send_outcome(response, message.to)

    async def query(self, settings: TencentSettings, message: Outgoing) -> Outcome | None:
        """Tencent's delivery report for an earlier attempt of `message`, found by its
        `SessionContext` (= `message_id`) among the reports `PullSmsSendStatusByPhoneNumber`
        returns for the number since a little before `message.sent_at`.

        - a `SUCCESS` report: `sent` (with its `SerialNo`); only `FAIL` reports: `failed`
          (the report's `Description` as detail);
        - no report: `None`, read as "never reached Tencent, safe to send again".

        Caveats. This API returns delivery reports, not accepted requests: a message that
        Tencent accepted but whose carrier report has not come back yet (reports lag,
        seconds to minutes, sometimes more) is not found either, so a resend right after
        an `unknown` can duplicate it; the later the query, the safer the `None`. Reports
        carry `SessionContext` only where Tencent has enabled it for the account (it is
        empty by default; ask Tencent's SMS helper), otherwise nothing matches and the
        answer is always `None`. Reports older than 7 days cannot be pulled; at most 100
        reports of the number are read.

        When the query itself fails (transport error, error answer), the answer is
        `unknown`: Tencent could not be asked, and the notifier should ask again later.
        """
        now = self._clock()
        margin = QUERY_MARGIN.total_seconds()
        start = (message.sent_at.timestamp() if message.sent_at else now) - margin
        start = max(start, now - PULL_WINDOW.total_seconds() + margin)
        params = {
            "BeginTime": int(start),
            "Offset": 0,
            "Limit": 100,
            "PhoneNumber": message.to,
            "SmsSdkAppId": settings.sdk_app_id,
        }
        try:
            response = await self._call(settings, "PullSmsSendStatusByPhoneNumber", params)
        except httpx.TransportError as exc:
            return Outcome("unknown", code=type(exc).__name__, detail=str(exc) or None)
        body = _response_body(response)
        if body is None or response.status_code != 200:
            return Outcome("unknown", code=f"HTTP {response.status_code}")
        error = body.get("Error")
        if isinstance(error, dict):
            return Outcome(
                "unknown", code=str(error.get("Code")), detail=_opt_str(error, "Message")
            )
        reports = body.get("PullSmsSendStatusSet")
        if not isinstance(reports, list):
            return Outcome("unknown", code="huitou.UnreadableResponse")
        ours = [
            r
            for r in reports
            if isinstance(r, dict) and r.get("SessionContext") == message.message_id
        ]
        for report in ours:
            if report.get("ReportStatus") == "SUCCESS":
                return Outcome("sent", provider_message_id=_opt_str(report, "SerialNo"))
        for report in ours:
            if report.get("ReportStatus") == "FAIL":
                return Outcome(
                    "failed",
                    provider_message_id=_opt_str(report, "SerialNo"),
                    code="FAIL",
                    detail=_opt_str(report, "Description"),
                )
        return None

    def parse_callback(
        self, settings: TencentSettings, headers: Mapping[str, str], url: str, body: bytes
    ) -> list[Receipt]:
        """Tencent's pushes: a JSON array of delivery reports (`report_status`, `sid`,
        `nationcode`, `mobile`, `errmsg`, `description`, `user_receive_time`), or one reply
        object (`nationcode`, `mobile`, `text`, `sign`, `time`, `extend`). Tencent does
        not sign them (the notifier checks the callback URL's token first), so only a
        wrong shape is rejected. Answer them with `CALLBACK_ANSWER`."""
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("not JSON") from exc
        if isinstance(data, list):
            return [_report_receipt(item) for item in data]
        if isinstance(data, dict) and "text" in data:
            return [_reply_receipt(data)]
        raise CallbackRejected("neither a delivery-report array nor a reply")


def _send_outcome(response: httpx.Response, phone: str) -> Outcome:
    """The `Outcome` of a `SendSms` answer."""
    status = response.status_code
    if status == 429:
        return Outcome("retry", code="HTTP 429", throttled=True)
    if status == 504:
        # A gateway gave up waiting for Tencent's backend, which may have sent it.
        return Outcome("unknown", code="HTTP 504")
    if status >= 500:
        return Outcome("retry", code=f"HTTP {status}")
    body = _response_body(response)
    if body is None:
        if 200 <= status < 300:
            return Outcome("unknown", code="huitou.UnreadableResponse")
        return Outcome("failed", code=f"HTTP {status}")
    error = body.get("Error")
    if isinstance(error, dict):
        return _classify(str(error.get("Code")), _opt_str(error, "Message"))
    statuses = body.get("SendStatusSet")
    entries = [s for s in statuses if isinstance(s, dict)] if isinstance(statuses, list) else []
    entry = next((s for s in entries if s.get("PhoneNumber") == phone), None)
    if entry is None and len(entries) == 1:
        entry = entries[0]
    if entry is None:
        return Outcome("unknown", code="huitou.UnreadableResponse")
    code = str(entry.get("Code"))
    if code == "Ok":
        return Outcome("sent", provider_message_id=_opt_str(entry, "SerialNo"))
    return _classify(code, _opt_str(entry, "Message"))


def _classify(code: str, message: str | None) -> Outcome:
    """A Tencent error code (request-level or one number's) as an `Outcome`."""
    family = code.split(".", 1)[0]
    if family == "RequestLimitExceeded" or (
        family == "LimitExceeded" and code not in _PERMANENT_LIMITS
    ):
        return Outcome("retry", code=code, detail=message, throttled=True)
    if family == "InternalError" or code in _TRANSIENT:
        return Outcome("retry", code=code, detail=message)
    return Outcome("failed", code=code, detail=message)


def _response_body(response: httpx.Response) -> dict[str, Any] | None:
    """The `Response` object of an API 3.0 answer, or None if it has none."""
    try:
        data = response.json()
    except ValueError:
        return None
    body = data.get("Response") if isinstance(data, dict) else None
    return body if isinstance(body, dict) else None


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return str(value) if value not in (None, "") else None


def _field(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise CallbackRejected(f"`{key}` missing or not a string")
    return value


def _address(data: Mapping[str, Any]) -> str:
    mobile = _field(data, "mobile")
    if mobile.startswith("+"):
        return mobile
    return "+" + _field(data, "nationcode").lstrip("+") + mobile


def _report_receipt(item: Any) -> Receipt:
    if not isinstance(item, dict):
        raise CallbackRejected("a delivery report is not an object")
    status = item.get("report_status")
    if status not in ("SUCCESS", "FAIL"):
        raise CallbackRejected("`report_status` is neither SUCCESS nor FAIL")
    at = None
    if isinstance(received := item.get("user_receive_time"), str):
        try:
            at = datetime.strptime(received, "%Y-%m-%d %H:%M:%S").replace(tzinfo=CHINA_TIME)
        except ValueError:
            at = None
    ext = item.get("ext")
    return Receipt(
        "delivered" if status == "SUCCESS" else "failed",
        provider_message_id=_field(item, "sid"),
        message_id=ext if isinstance(ext, str) and ext else None,
        address=_address(item),
        code=_opt_str(item, "errmsg"),
        detail=_opt_str(item, "description"),
        at=at,
    )


def _reply_receipt(data: Mapping[str, Any]) -> Receipt:
    text = data.get("text")
    if not isinstance(text, str):
        raise CallbackRejected("`text` is not a string")
    sent = data.get("time")
    at = datetime.fromtimestamp(sent, UTC) if isinstance(sent, int) else None
    return Receipt("reply", address=_address(data), text=text, at=at)


ADAPTER = TencentAdapter()

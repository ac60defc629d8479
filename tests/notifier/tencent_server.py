"""A local Tencent Cloud SMS (API 3.0, 2021-01-11) for the adapter's tests.

`TencentServer` is a small Starlette app served by uvicorn on 127.0.0.1, in a background
task of the test's event loop. It checks every request as Tencent does: the `X-TC-*`
headers, the timestamp (5 minutes either way), the TC3-HMAC-SHA256 signature, recomputed
with the official SDK's signer (`tencentcloud-sdk-python-common`: an implementation
independent of the adapter's), over the server's own host and port, unknown and missing
parameters, the SDK app, the sign name, the template and its parameter count, the phone
number (E.164 only: the double is stricter than Tencent, which also takes 0086/86/bare
11-digit numbers), and the 30-second limit for the same content to the same number. It
answers with Tencent's documented bodies, records accepted sends (`sent`) and every call
(`calls`), and answers `PullSmsSendStatusByPhoneNumber` from the accepted sends.

It knows one signed header set, `content-type;host` (the only one the SDK's signer
computes, and the one the adapter signs); Tencent itself also accepts larger sets.

Faults are scripted per call, in order: `fail_next` (an HTTP error before anything is
checked), `error_next` (a request-level error answer after authentication),
`stall_next` (accept, then answer after a delay: a read timeout for a short client
timeout) and `drop_next` (accept, then cut the connection in the middle of the answer).

    async with TencentServer(SECRET_ID, SECRET_KEY, APP_ID) as server:
        settings = TencentSettings(..., endpoint=server.url)
        server.fail_next(1, status=500)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Literal, Self

import phonenumbers
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from tencentcloud.common.abstract_client_async import (  # type: ignore[import-untyped]
    AbstractClient,
)

VERSION = "2021-01-11"
REGIONS = frozenset({"ap-guangzhou", "ap-beijing", "ap-nanjing", "ap-singapore"})
MAX_SKEW_S = 300
SAME_CONTENT_WINDOW_S = 30
PULL_WINDOW_S = 7 * 24 * 3600
CHINA_TIME = timezone(timedelta(hours=8))

SEND_PARAMS = frozenset(
    {
        "PhoneNumberSet",
        "SmsSdkAppId",
        "TemplateId",
        "SignName",
        "TemplateParamSet",
        "ExtendCode",
        "SessionContext",
        "SenderId",
    }
)
PULL_PARAMS = frozenset({"BeginTime", "Offset", "Limit", "PhoneNumber", "SmsSdkAppId", "EndTime"})

# Tencent's messages for the codes this double answers.
MESSAGES = {
    "AuthFailure.SignatureFailure": (
        "The provided credentials could not be validated. Please check your signature is correct."
    ),
    "AuthFailure.SecretIdNotFound": "The SecretId is not found, please ensure that your "
    "SecretId is correct.",
    "AuthFailure.SignatureExpire": "Signature expired. Timestamp and server time cannot "
    "differ by more than 5 minutes.",
    "AuthFailure.InvalidAuthorization": "Authorization header is not in the TC3 format.",
    "RequestLimitExceeded": "Your current request times exceeds the frequency limit. "
    "Please reduce the frequency of calls.",
    "LimitExceeded.PhoneNumberThirtySecondLimit": "the number of sms messages sent from a "
    "single mobile number within 30 seconds exceeds the upper limit",
    "FailedOperation.TemplateIncorrectOrUnapproved": "template is not approved or request "
    "content does not match the approved template content",
    "FailedOperation.TemplateParamSetNotMatchApprovedTemplate": "request content does not "
    "match the template content",
    "FailedOperation.SignatureIncorrectOrUnapproved": "signature format is incorrect or "
    "signature is not approved",
    "InvalidParameterValue.IncorrectPhoneNumber": "incorrect number format",
    "UnauthorizedOperation.SmsSdkAppIdVerifyFail": "SmsSdkAppId verify failed",
}


@dataclass
class SentSms:
    """One number of an accepted `SendSms`."""

    serial_no: str
    phone: str
    template_id: str
    params: list[str]
    sign_name: str | None
    session_context: str
    at: float


@dataclass
class Call:
    """One request as received, and what it was answered."""

    action: str | None
    headers: dict[str, str]
    body: bytes
    answer: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Fault:
    kind: Literal["http", "error", "stall", "drop"]
    status: int = 500
    code: str = ""
    message: str = ""
    seconds: float = 0.0


@dataclass
class _Report:
    status: Literal["SUCCESS", "FAIL"]
    errmsg: str
    description: str


class _Dropped(Exception):
    """Raised mid-answer so that uvicorn cuts the connection."""


class _QuietDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Dropped))


@dataclass
class _AsgiEndpoint:
    handler: Callable[[Scope, Receive, Send], Awaitable[None]]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class _ApiError(Exception):
    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.message = message or MESSAGES.get(code, code)


@dataclass
class TencentServer:
    secret_id: str
    secret_key: str
    sdk_app_id: str
    sign_names: Sequence[str] = ("惠投科技",)
    templates: Mapping[str, int] = field(default_factory=lambda: {"1110": 2, "2220": 0})
    """Approved templates: id → number of parameters."""
    report_lag_s: float = 0.0
    """Delivery reports become visible to the pull API this long after a send."""

    sent: list[SentSms] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._faults: deque[_Fault] = deque()
        self._reports: dict[str, _Report] = {}
        self._closing = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._quiet = _QuietDrops()
        self.port = 0

    @property
    def host(self) -> str:
        """The host Tencent signs with: this server's `host:port`."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # --- scripting -------------------------------------------------------------------

    def fail_next(self, n: int = 1, *, status: int = 500) -> None:
        """The next `n` calls answer HTTP `status` (plain text), checked for nothing."""
        self._faults.extend(_Fault("http", status=status) for _ in range(n))

    def error_next(self, code: str, message: str | None = None, n: int = 1) -> None:
        """The next `n` authenticated calls answer the request-level error `code`."""
        text = message or MESSAGES.get(code, code)
        self._faults.extend(_Fault("error", code=code, message=text) for _ in range(n))

    def stall_next(self, seconds: float, n: int = 1) -> None:
        """The next `n` calls are processed (a send is accepted), then answered only
        after `seconds` (or when the server stops)."""
        self._faults.extend(_Fault("stall", seconds=seconds) for _ in range(n))

    def drop_next(self, n: int = 1) -> None:
        """The next `n` calls are processed (a send is accepted), then the connection is
        cut after part of the answer."""
        self._faults.extend(_Fault("drop") for _ in range(n))

    def set_report(
        self, serial_no: str, status: Literal["SUCCESS", "FAIL"], errmsg: str, description: str
    ) -> None:
        """The delivery report of an accepted send (default: SUCCESS, DELIVRD)."""
        self._reports[serial_no] = _Report(status, errmsg, description)

    def report_push(self, *serial_nos: str) -> list[dict[str, str]]:
        """The delivery-report push Tencent would POST for these sends (its documented
        array of `user_receive_time`, `nationcode`, `mobile`, `report_status`, `errmsg`,
        `description`, `sid`)."""
        pushes = []
        for sms in (s for s in self.sent if s.serial_no in serial_nos):
            number = phonenumbers.parse(sms.phone)
            report = self._report(sms)
            received = datetime.fromtimestamp(sms.at + 1, CHINA_TIME)
            pushes.append(
                {
                    "user_receive_time": received.strftime("%Y-%m-%d %H:%M:%S"),
                    "nationcode": str(number.country_code),
                    "mobile": str(number.national_number),
                    "report_status": report.status,
                    "errmsg": report.errmsg,
                    "description": report.description,
                    "sid": sms.serial_no,
                }
            )
        return pushes

    # --- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        # A callable object, not a function: Starlette then passes it the raw ASGI call,
        # which `drop_next` needs to cut a connection mid-answer.
        endpoint = _AsgiEndpoint(self._endpoint)
        app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        logging.getLogger("uvicorn.error").addFilter(self._quiet)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._task.done() or time.monotonic() > deadline:
                await self._stop()
                raise RuntimeError("the Tencent test server did not start")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await self._task
        logging.getLogger("uvicorn.error").removeFilter(self._quiet)

    # --- requests --------------------------------------------------------------------

    async def _endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        body = await request.body()
        call = Call(request.headers.get("x-tc-action"), dict(request.headers), body)
        self.calls.append(call)
        fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.kind == "http":
            call.answer = f"HTTP {fault.status}"
            await PlainTextResponse("upstream error", fault.status)(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        try:
            self._authenticate(request, body)
            if fault is not None and fault.kind == "error":
                raise _ApiError(fault.code, fault.message)
            params = self._params(body)
            if call.action == "SendSms":
                answer = self._send_sms(params)
                codes = [s["Code"] for s in answer["SendStatusSet"]]
                call.answer = ",".join(codes)
            else:
                answer = self._pull_status(params)
                call.answer = "Ok"
        except _ApiError as error:
            call.answer = error.code
            answer = {"Error": {"Code": error.code, "Message": error.message}}
            fault = None  # nothing was accepted: no stall or drop after an error
        content = {"Response": {**answer, "RequestId": request_id}}
        if fault is not None and fault.kind == "stall":
            call.answer += " (stalled)"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), fault.seconds)
        if fault is not None and fault.kind == "drop":
            call.answer += " (dropped)"
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"4096"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b'{"Response": {', "more_body": True})
            raise _Dropped()
        await JSONResponse(content)(scope, receive, send)

    def _authenticate(self, request: Request, body: bytes) -> None:
        """Tencent's checks of the common parameters and the TC3 signature."""
        headers = request.headers
        if request.method != "POST" or request.url.path != "/":
            raise _ApiError("UnsupportedProtocol", "only POST / is served here")
        for name in (
            "Authorization",
            "Content-Type",
            "Host",
            "X-TC-Action",
            "X-TC-Timestamp",
            "X-TC-Version",
            "X-TC-Region",
        ):
            if not headers.get(name):
                raise _ApiError("MissingParameter", f"The request is missing `{name}`.")
        if headers["X-TC-Version"] != VERSION:
            raise _ApiError(
                "NoSuchVersion", f"The API version `{headers['X-TC-Version']}` does not exist."
            )
        if headers["X-TC-Action"] not in ("SendSms", "PullSmsSendStatusByPhoneNumber"):
            raise _ApiError("InvalidAction", f"`{headers['X-TC-Action']}` is not found.")
        if headers["X-TC-Region"] not in REGIONS:
            raise _ApiError("UnsupportedRegion", "The region is not supported.")
        if headers["Content-Type"].split(";")[0].strip().lower() != "application/json":
            raise _ApiError("InvalidParameter", "Content-Type must be application/json.")
        parts = _parse_authorization(headers["Authorization"])
        if parts is None:
            raise _ApiError("AuthFailure.InvalidAuthorization")
        try:
            timestamp = int(headers["X-TC-Timestamp"])
        except ValueError as exc:
            raise _ApiError("InvalidParameter", "X-TC-Timestamp is not an integer.") from exc
        if abs(time.time() - timestamp) > MAX_SKEW_S:
            raise _ApiError("AuthFailure.SignatureExpire")
        if parts["secret_id"] != self.secret_id:
            raise _ApiError("AuthFailure.SecretIdNotFound")
        date = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
        if (
            parts["date"] != date
            or parts["service"] != "sms"
            or parts["signed_headers"] != "content-type;host"
        ):
            raise _ApiError("AuthFailure.SignatureFailure")
        # The official signer, over what Tencent sees: its own host, the received
        # Content-Type, timestamp and body.
        expected = AbstractClient._get_tc3_signature(
            "POST",
            "/",
            request.url.query,
            body,
            {
                "Content-Type": headers["Content-Type"],
                "Host": self.host,
                "X-TC-Timestamp": headers["X-TC-Timestamp"],
            },
            date,
            "sms",
            self.secret_key,
            {},
        )
        if not hmac.compare_digest(str(expected), parts["signature"]):
            raise _ApiError("AuthFailure.SignatureFailure")

    @staticmethod
    def _params(body: bytes) -> dict[str, Any]:
        try:
            params = json.loads(body)
        except ValueError as exc:
            raise _ApiError("FailedOperation.JsonParseFail", "the body is not JSON") from exc
        if not isinstance(params, dict):
            raise _ApiError("FailedOperation.JsonParseFail", "the body is not a JSON object")
        return params

    def _send_sms(self, params: dict[str, Any]) -> dict[str, Any]:
        _check_names(params, SEND_PARAMS, ("PhoneNumberSet", "SmsSdkAppId", "TemplateId"))
        phones = params["PhoneNumberSet"]
        template_params = params.get("TemplateParamSet", [])
        if not _strings(phones) or not _strings(template_params):
            raise _ApiError("InvalidParameter", "PhoneNumberSet and TemplateParamSet take strings.")
        for name in ("SmsSdkAppId", "TemplateId", "SignName", "SessionContext"):
            if name in params and not isinstance(params[name], str):
                raise _ApiError("InvalidParameter", f"{name} must be a string.")
        if not phones:
            raise _ApiError("MissingParameter.EmptyPhoneNumberSet", "PhoneNumberSet is empty.")
        if len(phones) > 200:
            raise _ApiError("LimitExceeded.PhoneNumberCountLimit", "at most 200 numbers.")
        if params["SmsSdkAppId"] != self.sdk_app_id:
            raise _ApiError("UnauthorizedOperation.SmsSdkAppIdVerifyFail")
        context = params.get("SessionContext", "")
        if len(context.encode()) >= 512:
            raise _ApiError("InvalidParameterValue", "SessionContext must be under 512 bytes.")
        return {"SendStatusSet": [self._send_one(phone, params, context) for phone in phones]}

    def _send_one(self, phone: str, params: dict[str, Any], context: str) -> dict[str, Any]:
        template_id: str = params["TemplateId"]
        values: list[str] = list(params.get("TemplateParamSet", []))
        sign_name: str | None = params.get("SignName")
        now = time.time()
        if not _valid_e164(phone):
            code = "InvalidParameterValue.IncorrectPhoneNumber"
        elif sign_name not in self.sign_names:
            code = "FailedOperation.SignatureIncorrectOrUnapproved"
        elif template_id not in self.templates:
            code = "FailedOperation.TemplateIncorrectOrUnapproved"
        elif len(values) != self.templates[template_id]:
            code = "FailedOperation.TemplateParamSetNotMatchApprovedTemplate"
        elif any(
            s.phone == phone
            and s.template_id == template_id
            and s.params == values
            and now - s.at < SAME_CONTENT_WINDOW_S
            for s in self.sent
        ):
            code = "LimitExceeded.PhoneNumberThirtySecondLimit"
        else:
            serial = f"5000:{uuid.uuid4().int % 10**28:028d}"
            self.sent.append(SentSms(serial, phone, template_id, values, sign_name, context, now))
            return {
                "SerialNo": serial,
                "PhoneNumber": phone,
                "Fee": 1,
                "SessionContext": context,
                "Code": "Ok",
                "Message": "send success",
                "IsoCode": phonenumbers.region_code_for_number(phonenumbers.parse(phone)),
            }
        return {
            "SerialNo": "",
            "PhoneNumber": phone,
            "Fee": 0,
            "SessionContext": context,
            "Code": code,
            "Message": MESSAGES[code],
            "IsoCode": "",
        }

    def _pull_status(self, params: dict[str, Any]) -> dict[str, Any]:
        required = ("BeginTime", "Offset", "Limit", "PhoneNumber", "SmsSdkAppId")
        _check_names(params, PULL_PARAMS, required)
        now = time.time()
        begin, offset, limit = params["BeginTime"], params["Offset"], params["Limit"]
        end = params.get("EndTime")
        if not isinstance(begin, int) or begin < now - PULL_WINDOW_S:
            raise _ApiError("InvalidParameterValue.BeginTimeVerifyFail", "BeginTime is invalid.")
        if end is not None and (not isinstance(end, int) or end < begin):
            raise _ApiError("InvalidParameterValue.EndTimeVerifyFail", "EndTime is invalid.")
        if offset != 0:
            raise _ApiError("InvalidParameterValue.OffsetVerifyFail", "Offset must be 0.")
        if not isinstance(limit, int) or not 0 < limit <= 100:
            raise _ApiError("InvalidParameterValue.LimitVerifyFail", "Limit is 1 to 100.")
        if params["SmsSdkAppId"] != self.sdk_app_id:
            raise _ApiError("UnauthorizedOperation.SmsSdkAppIdVerifyFail")
        phone = params["PhoneNumber"]
        if not isinstance(phone, str) or not _valid_e164(phone):
            raise _ApiError("InvalidParameterValue.IncorrectPhoneNumber")
        number = phonenumbers.parse(phone)
        reports = []
        for sms in self.sent:
            if sms.phone != phone or sms.at < begin or (end is not None and sms.at > end):
                continue
            if sms.at + self.report_lag_s > now:
                continue  # the carrier's report has not come back yet
            report = self._report(sms)
            reports.append(
                {
                    "UserReceiveTime": int(sms.at) + 1,
                    "CountryCode": str(number.country_code),
                    "SubscriberNumber": str(number.national_number),
                    "PhoneNumber": phone,
                    "SerialNo": sms.serial_no,
                    "ReportStatus": report.status,
                    "Description": report.description,
                    "SessionContext": sms.session_context,
                }
            )
        return {"PullSmsSendStatusSet": reports[:limit]}

    def _report(self, sms: SentSms) -> _Report:
        return self._reports.get(sms.serial_no, _Report("SUCCESS", "DELIVRD", "用户短信送达成功"))


def _parse_authorization(value: str) -> dict[str, str] | None:
    """The parts of `TC3-HMAC-SHA256 Credential=id/date/service/tc3_request,
    SignedHeaders=..., Signature=...`, or None if it is not of that form."""
    algorithm, _, rest = value.partition(" ")
    if algorithm != "TC3-HMAC-SHA256":
        return None
    fields = dict(part.strip().partition("=")[::2] for part in rest.split(","))
    credential = fields.get("Credential", "").split("/")
    if len(credential) != 4 or credential[3] != "tc3_request":
        return None
    if not fields.get("SignedHeaders") or len(fields.get("Signature", "")) != 64:
        return None
    return {
        "secret_id": credential[0],
        "date": credential[1],
        "service": credential[2],
        "signed_headers": fields["SignedHeaders"],
        "signature": fields["Signature"],
    }


def _check_names(
    params: Mapping[str, Any], allowed: frozenset[str], required: Sequence[str]
) -> None:
    for name in params:
        if name not in allowed:
            raise _ApiError("UnknownParameter", f"The parameter `{name}` is not recognized.")
    for name in required:
        if name not in params:
            raise _ApiError("MissingParameter", f"The request is missing `{name}`.")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _valid_e164(phone: str) -> bool:
    if not phone.startswith("+"):
        return False
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(phone))
    except phonenumbers.NumberParseException:
        return False

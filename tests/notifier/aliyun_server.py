"""A local stand-in for Aliyun's SMS API (Dysmsapi 2017-05-25) for the adapter's tests.

It checks each request as Aliyun's gateway does, independently of the adapter's code: the
`Signature` is recomputed with the official SDK's RPC signer (`aliyun-python-sdk-core`,
a dev dependency), the common parameters must all be there with Aliyun's values, the
`Timestamp` must be within 15 minutes and a `SignatureNonce` is accepted once. Then it
answers `SendSms` and `QuerySendDetails` with Aliyun's documented bodies and HTTP statuses
(business errors such as `isv.MOBILE_NUMBER_ILLEGAL` are HTTP 200 with their `Code`; the
gateway's, such as `SignatureDoesNotMatch`, 400 or 404). Accepted sends are kept in
`sent`, which `QuerySendDetails` answers from.

A test scripts faults for the next requests: `fail_next` (an HTTP error, nothing
recorded), `delay_next` (handled, then answered late), `drop_next` (handled, then the
connection closed without an answer). It is served on asyncio streams rather than by an
ASGI server because dropping a connection mid-request is not something an ASGI app can do.

    async with AliyunServer("LTAI-id", "secret", templates={"SMS_1": "Hi ${name}"}) as server:
        settings = AliyunSettings(..., endpoint=server.url)
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aliyunsdkcore.auth.algorithm import sha_hmac1  # type: ignore[import-untyped]
from aliyunsdkcore.auth.composer import rpc_signature_composer  # type: ignore[import-untyped]

CHINA_TZ = timezone(timedelta(hours=8))
MAX_SKEW = timedelta(minutes=15)
COMMON_PARAMS = (
    "Action",
    "Version",
    "Format",
    "AccessKeyId",
    "SignatureMethod",
    "SignatureVersion",
    "SignatureNonce",
    "Timestamp",
    "RegionId",
    "Signature",
)
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
_MAINLAND = re.compile(r"1\d{10}")
_INTERNATIONAL = re.compile(r"[2-9]\d{6,14}")

Answer = tuple[int, dict[str, Any]]


def sdk_signature(method: str, params: Mapping[str, str], secret: str) -> tuple[str, str]:
    """The string to sign and the signature of `params` by the official SDK's RPC signer
    (module-level: the SDK's helper is a double-underscore name, mangled inside a class)."""
    compose = getattr(rpc_signature_composer, "__compose_string_to_sign")
    string_to_sign: str = compose(method, dict(params))
    signature: str = sha_hmac1.get_sign_string(string_to_sign, secret + "&")
    return string_to_sign, signature


@dataclass
class SentSms:
    """One accepted `SendSms` for one number (Aliyun keeps one record per number)."""

    biz_id: str
    phone: str
    params: dict[str, str]
    """Every parameter of the request as received (common ones and `Signature` too)."""
    content: str
    received_at: datetime
    send_status: int = 1
    """1 waiting for the receipt, 2 failed, 3 delivered (`QuerySendDetails`'s values)."""
    err_code: str = ""


@dataclass
class _Fault:
    kind: str  # "status" | "delay" | "drop"
    status: int = 500
    seconds: float = 0.0


@dataclass
class AliyunServer:
    access_key_id: str
    access_key_secret: str
    templates: Mapping[str, str] = field(default_factory=dict)
    """Approved templates: `TemplateCode` → text with `${name}` placeholders."""
    sign_names: Collection[str] = ("惠投",)
    per_minute_limit: int | None = None
    """Sends allowed per number, sign and template in 60 s (Aliyun's default for
    verification codes is 1); more answer `isv.BUSINESS_LIMIT_CONTROL`."""

    sent: list[SentSms] = field(default_factory=list, init=False)
    requests: list[dict[str, str]] = field(default_factory=list, init=False)
    """Every request's parameters, accepted or not."""
    url: str = field(default="", init=False)
    _nonces: set[str] = field(default_factory=set, init=False)
    _faults: deque[_Fault] = field(default_factory=deque, init=False)
    _server: asyncio.Server | None = field(default=None, init=False)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set, init=False)

    # --- Scripting -----------------------------------------------------------------

    def fail_next(self, n: int = 1, *, status: int = 500) -> None:
        """The next `n` requests answer HTTP `status` (500 `InternalError`, 503
        `ServiceUnavailable`) without being handled."""
        self._faults.extend(_Fault("status", status=status) for _ in range(n))

    def delay_next(self, seconds: float, n: int = 1) -> None:
        """The next `n` requests are handled (a send is recorded) and answered `seconds`
        later."""
        self._faults.extend(_Fault("delay", seconds=seconds) for _ in range(n))

    def drop_next(self, n: int = 1) -> None:
        """The next `n` requests are handled (a send is recorded), then the connection is
        closed without an answer."""
        self._faults.extend(_Fault("drop") for _ in range(n))

    def report(self, biz_id: str, *, success: bool, err_code: str | None = None) -> None:
        """The carrier's receipt for the send `biz_id`, as `QuerySendDetails` shows it."""
        for record in self.sent:
            if record.biz_id == biz_id:
                record.send_status = 3 if success else 2
                record.err_code = err_code or ("DELIVRD" if success else "UNDELIV")

    # --- Serving -------------------------------------------------------------------

    async def __aenter__(self) -> AliyunServer:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; False when the connection is to be closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        request_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.kind == "status":
            status, answer = self._fault_answer(fault.status)
        else:
            status, answer = self._handle(method, target, headers, body)
        if fault is not None and fault.kind == "drop":
            return False
        if fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
        data = json.dumps(answer, ensure_ascii=False).encode()
        writer.write(
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "Content-Type: application/json;charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        return headers.get("connection", "").lower() != "close"

    # --- Aliyun --------------------------------------------------------------------

    @staticmethod
    def _error(status: int, code: str, message: str) -> Answer:
        request_id = str(uuid.uuid4()).upper()
        answer: dict[str, Any] = {"RequestId": request_id, "Message": message, "Code": code}
        if status != 200:  # the gateway's errors carry these too
            answer["HostId"] = "dysmsapi.aliyuncs.com"
            answer["Recommend"] = (
                f"https://api.aliyun.com/troubleshoot?q={code}&product=Dysmsapi"
                f"&requestId={request_id}"
            )
        return status, answer

    def _fault_answer(self, status: int) -> Answer:
        if status == 503:
            return self._error(
                503,
                "ServiceUnavailable",
                "The request has failed due to a temporary failure of the server.",
            )
        return self._error(
            status,
            "InternalError",
            "The request processing has failed due to some unknown error, exception or failure.",
        )

    def _handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Answer:
        params = dict(parse_qsl(urlsplit(target).query, keep_blank_values=True))
        if body:
            if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                return self._error(400, "InvalidParameter", "The body is not a form.")
            params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        self.requests.append(dict(params))
        if rejected := self._check_common(method, params):
            return rejected
        if params["Action"] == "SendSms":
            return self._send_sms(params)
        if params["Action"] == "QuerySendDetails":
            return self._query_send_details(params)
        return self._error(
            404,
            "InvalidAction.NotFound",
            "Specified api is not found, please check your url and method.",
        )

    def _check_common(self, method: str, params: Mapping[str, str]) -> Answer | None:
        for name in COMMON_PARAMS:
            if not params.get(name):
                return self._error(400, f"Missing{name}", f"{name} is mandatory for this action.")
        if params["Version"] != "2017-05-25":
            return self._error(400, "InvalidVersion", "Specified parameter Version is not valid.")
        if params["Format"] != "JSON":  # this server answers JSON only
            return self._error(400, "InvalidParameter", "Format must be JSON here.")
        if params["SignatureMethod"] != "HMAC-SHA1" or params["SignatureVersion"] != "1.0":
            return self._error(
                400, "InvalidParameter", "SignatureMethod HMAC-SHA1, SignatureVersion 1.0."
            )
        if params["AccessKeyId"] != self.access_key_id:
            return self._error(
                404, "InvalidAccessKeyId.NotFound", "Specified access key is not found."
            )
        try:
            stamp = datetime.strptime(params["Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            return self._error(
                400,
                "InvalidTimeStamp.Format",
                "Specified time stamp or date value is not well formatted.",
            )
        if abs(datetime.now(UTC) - stamp) > MAX_SKEW:
            return self._error(
                400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired."
            )
        unsigned = {k: v for k, v in params.items() if k != "Signature"}
        expected_sts, expected = sdk_signature(method, unsigned, self.access_key_secret)
        if params["Signature"] != expected:
            return self._error(
                400,
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation. "
                f"server string to sign is:{expected_sts}",
            )
        if params["SignatureNonce"] in self._nonces:
            return self._error(
                400, "SignatureNonceUsed", "Specified signature nonce was used already."
            )
        self._nonces.add(params["SignatureNonce"])
        return None

    def _send_sms(self, params: Mapping[str, str]) -> Answer:
        for name in ("PhoneNumbers", "SignName", "TemplateCode"):
            if not params.get(name):
                return self._error(400, f"Missing{name}", f"{name} is mandatory for this action.")
        phones = params["PhoneNumbers"].split(",")
        if len(phones) > 1000:
            return self._error(200, "isv.MOBILE_COUNT_OVER_LIMIT", "手机号码数量超过限制")
        # Mainland numbers are the 11-digit national number; others are international
        # without '+' (a mainland number with its 86 is refused here, as it should not come).
        if not all(
            _MAINLAND.fullmatch(p) or (_INTERNATIONAL.fullmatch(p) and not p.startswith("86"))
            for p in phones
        ):
            return self._error(200, "isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")
        if params["SignName"] not in self.sign_names:
            return self._error(200, "isv.SMS_SIGNATURE_ILLEGAL", "短信签名不合法")
        text = self.templates.get(params["TemplateCode"])
        if text is None:
            return self._error(200, "isv.SMS_TEMPLATE_ILLEGAL", "短信模版不合法")
        try:
            values = json.loads(params.get("TemplateParam") or "{}")
        except ValueError:
            values = None
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            return self._error(200, "isv.INVALID_JSON_PARAM", "JSON参数不合法，只接受字符串值")
        if any(name not in values for name in _PLACEHOLDER.findall(text)):
            return self._error(200, "isv.TEMPLATE_MISSING_PARAMETERS", "模版缺少变量")
        now = datetime.now(UTC)
        if self.per_minute_limit is not None:
            for phone in phones:
                recent = [
                    s
                    for s in self.sent
                    if s.phone == phone
                    and s.params["SignName"] == params["SignName"]
                    and s.params["TemplateCode"] == params["TemplateCode"]
                    and now - s.received_at < timedelta(minutes=1)
                ]
                if len(recent) >= self.per_minute_limit:
                    return self._error(
                        200,
                        "isv.BUSINESS_LIMIT_CONTROL",
                        f"触发分钟级流控Permits:{self.per_minute_limit}",
                    )
        biz_id = f"{random.randrange(10**17, 10**18)}^0"
        content = f"【{params['SignName']}】" + _PLACEHOLDER.sub(lambda m: values[m[1]], text)
        self.sent += [SentSms(biz_id, p, dict(params), content, now) for p in phones]
        request_id = str(uuid.uuid4()).upper()
        return 200, {"Message": "OK", "RequestId": request_id, "BizId": biz_id, "Code": "OK"}

    def _query_send_details(self, params: Mapping[str, str]) -> Answer:
        for name in ("PhoneNumber", "SendDate", "PageSize", "CurrentPage"):
            if not params.get(name):
                return self._error(400, f"Missing{name}", f"{name} is mandatory for this action.")
        try:
            day = datetime.strptime(params["SendDate"], "%Y%m%d").date()
            size, page = int(params["PageSize"]), int(params["CurrentPage"])
        except ValueError:
            return self._error(200, "isv.INVALID_PARAMETERS", "参数异常")
        if not (1 <= size <= 50 and page >= 1) or not re.fullmatch(r"\d{8}", params["SendDate"]):
            return self._error(200, "isv.INVALID_PARAMETERS", "参数异常")
        matching = [
            s
            for s in self.sent
            if s.phone == params["PhoneNumber"]
            and s.received_at.astimezone(CHINA_TZ).date() == day
            and (not params.get("BizId") or s.biz_id == params["BizId"])
        ]
        matching.reverse()  # newest first
        shown = matching[(page - 1) * size : page * size]
        return 200, {
            "TotalCount": len(matching),
            "Message": "OK",
            "RequestId": str(uuid.uuid4()).upper(),
            "SmsSendDetailDTOs": {
                "SmsSendDetailDTO": [
                    {
                        "SendDate": s.received_at.astimezone(CHINA_TZ).strftime(
                            "%Y-%m-%d %H:%M:%S"
                        ),
                        "OutId": s.params.get("OutId", ""),
                        "SendStatus": s.send_status,
                        "ReceiveDate": s.received_at.astimezone(CHINA_TZ).strftime(
                            "%Y-%m-%d %H:%M:%S"
                        ),
                        "ErrCode": s.err_code,
                        "TemplateCode": s.params["TemplateCode"],
                        "Content": s.content,
                        "PhoneNum": s.phone,
                    }
                    for s in shown
                ]
            },
            "Code": "OK",
        }

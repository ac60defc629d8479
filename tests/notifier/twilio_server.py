"""A local stand-in for Twilio's Messages API (2010-04-01) for the adapter's tests.

A small Starlette app served by uvicorn on 127.0.0.1, in a task of the test's event loop.
It checks each request as Twilio does, independently of the adapter's code: HTTP basic
auth with the account's SID and auth token (else 401, code 20003), the account SID of the
path (else 404, code 20404), the form fields of a send (`To`, `Body`, `From` or
`MessagingServiceSid`, E.164 numbers, a `From` the account owns) and Twilio's magic test
recipients (+15005550001 invalid: 21211, +15005550002 unroutable: 21612, +15005550003 no
permission for the region: 21408, +15005550004 unsubscribed: 21610, +15005550009 not a
mobile: 21614) and sender (+15005550008, whose queue is full: 21611), plus the numbers a
test `unsubscribe`s. Answers are Twilio's documented
bodies: 201 with the Message resource, `{"code", "message", "more_info", "status"}` for
errors.

Accepted messages are kept in `sent` (the Message resources as Twilio shows them) and
served by the list (`To`, `From`, `DateSent`/`DateSent<`/`DateSent>` filters, pages with
`next_page_uri`) and fetch endpoints. A message stays `queued` (`accepted` through a
Messaging Service) with a null `date_sent` until a test moves it with `set_status`, as on
Twilio, where `date_sent` is set when the message leaves Twilio's queue.

Faults a test scripts for the next sends: `fail_next` (an HTTP error such as 500, nothing
recorded), `throttle_next` (429, code 20429), `delay_next` (recorded, answered late, after
the client gave up), `drop_next` (recorded, then the connection closed after the
response's headers, before its body).

Callbacks from Twilio: `status_callback` and `inbound` build the form-encoded requests
Twilio would post, with Twilio's parameters, signed by the official SDK's
`twilio.request_validator.RequestValidator` (a dev dependency), so that the adapter's
signature check is tested against an implementation other than its own.

    async with TwilioServer(ACCOUNT_SID, SECRET, numbers={"+15017122661"}) as server:
        settings = TwilioSettings(..., endpoint=server.url)
        server.fail_next(1, status=500)
        ... server.sent[-1]["sid"] ...
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from tests.servers import free_port

API = "/2010-04-01"
E164 = re.compile(r"^\+[1-9]\d{1,14}$")
MAGIC_RECIPIENTS: dict[str, tuple[int, str]] = {
    "+15005550001": (21211, "The 'To' number {to} is not a valid phone number."),
    "+15005550002": (21612, "The 'To' phone number: {to}, is not currently reachable"),
    "+15005550003": (21408, "Permission to send an SMS has not been enabled for the region"),
    "+15005550004": (21610, "Attempt to send to unsubscribed recipient"),
    "+15005550009": (21614, "'To' number is not a valid mobile number"),
}
"""Twilio's test-credential recipients and the error each gives."""
MAGIC_SENDERS: dict[str, tuple[int, str]] = {
    "+15005550008": (
        21611,
        "This 'From' number has exceeded the maximum number of queued messages",
    ),
}
"""Twilio's test-credential senders that fail (this one: its queue is full)."""
STATUSES_WITH_DATE_SENT = frozenset(
    {"sent", "delivered", "undelivered", "failed", "read", "partially_delivered"}
)


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    query: list[tuple[str, str]]
    form: list[tuple[str, str]]
    """The form fields in the order sent (empty for a GET)."""
    content_type: str
    auth: tuple[str, str] | None
    """The basic-auth user and password, if the request had any."""


@dataclass
class _Fault:
    kind: str  # "fail", "throttle", "delay", "drop"
    status: int = 500
    seconds: float = 0.0


class _Dropped(Response):
    """Starts a response and closes the connection before its body: the client has sent
    its request and gets no answer it can read."""

    def __init__(self) -> None:
        super().__init__(status_code=201)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"900")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"sid": "SM', "more_body": True})
        # Returning without the rest of the body: uvicorn closes the connection.


def error_body(status: int, code: int, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def rfc2822(moment: datetime) -> str:
    """Twilio's timestamps: `Tue, 27 Nov 2018 16:14:39 +0000`."""
    return format_datetime(moment.astimezone(UTC))


class TwilioServer:
    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        numbers: Collection[str] = ("+15017122661",),
        messaging_services: Collection[str] = (),
        max_page_size: int = 1000,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.numbers = set(numbers)
        self.messaging_services = set(messaging_services)
        self.max_page_size = max_page_size
        """Twilio's is 1000; a test lowers it to see pages followed."""
        self.sent: list[dict[str, Any]] = []
        """The accepted messages, oldest first, as Message resources."""
        self.requests: list[Recorded] = []
        self.unsubscribed: set[str] = set()
        self.validator = RequestValidator(auth_token)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._faults: list[_Fault] = []
        self._closing = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = Starlette(
            routes=[
                Route(
                    f"{API}/Accounts/{{account}}/Messages.json",
                    self._messages,
                    methods=["GET", "POST"],
                ),
                Route(
                    f"{API}/Accounts/{{account}}/Messages/{{sid}}.json",
                    self._message,
                    methods=["GET"],
                ),
            ]
        )

    async def __aenter__(self) -> TwilioServer:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,  # uvicorn's own config would reconfigure the test's logging
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the Twilio stand-in stopped while starting")
            if loop.time() > deadline:
                raise TimeoutError("the Twilio stand-in did not start")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task

    # Scripting

    def fail_next(self, n: int = 1, *, status: int = 500) -> None:
        """The next `n` sends answer `status` with Twilio's error body, nothing recorded."""
        self._faults.extend(_Fault("fail", status=status) for _ in range(n))

    def throttle_next(self, n: int = 1) -> None:
        """The next `n` sends answer 429 with code 20429, nothing recorded."""
        self._faults.extend(_Fault("throttle", status=429) for _ in range(n))

    def delay_next(self, n: int = 1, *, seconds: float = 5.0) -> None:
        """The next `n` sends are accepted and recorded, then answered `seconds` late."""
        self._faults.extend(_Fault("delay", seconds=seconds) for _ in range(n))

    def drop_next(self, n: int = 1) -> None:
        """The next `n` sends are accepted and recorded, then the connection is closed
        before the answer's body."""
        self._faults.extend(_Fault("drop") for _ in range(n))

    def unsubscribe(self, number: str) -> None:
        """`number` replied STOP: sends to it answer 400, code 21610."""
        self.unsubscribed.add(number)

    def set_status(
        self,
        sid: str,
        status: str,
        *,
        error_code: int | None = None,
        error_message: str | None = None,
    ) -> dict[str, Any]:
        """Move a message on (Twilio sets `date_sent` when it leaves the queue)."""
        resource = self.message(sid)
        now = datetime.now(UTC)
        resource["status"] = status
        resource["date_updated"] = rfc2822(now)
        if status in STATUSES_WITH_DATE_SENT and resource["date_sent"] is None:
            resource["date_sent"] = rfc2822(now)
        if error_code is not None:
            resource["error_code"] = error_code
            resource["error_message"] = error_message
        return resource

    def message(self, sid: str) -> dict[str, Any]:
        for resource in self.sent:
            if resource["sid"] == sid:
                return resource
        raise KeyError(sid)

    # Callbacks Twilio would post

    def sign(self, url: str, params: Mapping[str, str]) -> str:
        """`X-Twilio-Signature` of a POST of `params` to `url`, by the official SDK."""
        signature: str = self.validator.compute_signature(url, dict(params))
        return signature

    def callback_request(self, url: str, params: Mapping[str, str]) -> tuple[dict[str, str], bytes]:
        """The headers and body of Twilio's signed form-encoded POST of `params` to `url`."""
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "TwilioProxy/1.1",
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
            "X-Twilio-Signature": self.sign(url, params),
        }
        return headers, urlencode(params).encode()

    def status_params(
        self, sid: str, status: str, *, error_code: int | None = None
    ) -> dict[str, str]:
        """The parameters of Twilio's status callback for a message it holds."""
        resource = self.message(sid)
        params = {
            "ApiVersion": "2010-04-01",
            "AccountSid": self.account_sid,
            "SmsSid": sid,
            "SmsStatus": status,
            "MessageSid": sid,
            "MessageStatus": status,
            "To": resource["to"],
            "From": resource["from"] or sorted(self.numbers)[0],
        }
        if resource["messaging_service_sid"]:
            params["MessagingServiceSid"] = resource["messaging_service_sid"]
        if error_code is not None:
            params["ErrorCode"] = str(error_code)
        if status == "delivered":
            params["RawDlrDoneDate"] = datetime.now(UTC).strftime("%y%m%d%H%M")
        return params

    def status_callback(
        self, sid: str, status: str, *, error_code: int | None = None, url: str | None = None
    ) -> tuple[dict[str, str], str, bytes]:
        """Headers, URL and body of the status callback Twilio posts to the message's
        `StatusCallback` (or `url`)."""
        target = url or self.message(sid).get("_status_callback")
        if not target:
            raise ValueError("the message had no StatusCallback; give a url")
        headers, body = self.callback_request(
            target, self.status_params(sid, status, error_code=error_code)
        )
        return headers, target, body

    def inbound_params(
        self,
        sender: str,
        body: str,
        *,
        to: str | None = None,
        opt_out_type: str | None = None,
        messaging_service_sid: str | None = None,
    ) -> dict[str, str]:
        """The parameters of Twilio's incoming-message webhook (blank ones included)."""
        sid = "SM" + uuid.uuid4().hex
        params = {
            "ToCountry": "US",
            "ToState": "CA",
            "SmsMessageSid": sid,
            "NumMedia": "0",
            "ToCity": "",
            "FromZip": "",
            "SmsSid": sid,
            "FromState": "",
            "SmsStatus": "received",
            "FromCity": "",
            "Body": body,
            "FromCountry": "US",
            "To": to or sorted(self.numbers)[0],
            "ToZip": "",
            "NumSegments": "1",
            "MessageSid": sid,
            "AccountSid": self.account_sid,
            "From": sender,
            "ApiVersion": "2010-04-01",
        }
        if messaging_service_sid:
            params["MessagingServiceSid"] = messaging_service_sid
        if opt_out_type:
            params["OptOutType"] = opt_out_type
        return params

    def inbound(
        self,
        url: str,
        sender: str,
        body: str,
        *,
        opt_out_type: str | None = None,
        to: str | None = None,
    ) -> tuple[dict[str, str], str, bytes]:
        """Headers, URL and body of the incoming-message webhook Twilio posts to `url`."""
        params = self.inbound_params(sender, body, to=to, opt_out_type=opt_out_type)
        headers, raw = self.callback_request(url, params)
        return headers, url, raw

    # The API

    async def _record(self, request: Request) -> tuple[Recorded, bytes]:
        raw = await request.body()
        content_type = request.headers.get("content-type", "")
        form: list[tuple[str, str]] = []
        if request.method == "POST" and content_type.startswith(
            "application/x-www-form-urlencoded"
        ):
            form = parse_qsl(raw.decode(), keep_blank_values=True)
        recorded = Recorded(
            method=request.method,
            path=request.url.path,
            query=list(request.query_params.multi_items()),
            form=form,
            content_type=content_type,
            auth=_basic_auth(request.headers.get("authorization")),
        )
        self.requests.append(recorded)
        return recorded, raw

    def _check_auth(self, recorded: Recorded, account: str) -> Response | None:
        if recorded.auth != (self.account_sid, self.auth_token):
            return JSONResponse(
                error_body(401, 20003, "Authenticate"),
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="Twilio API"'},
            )
        if account != self.account_sid:
            return _not_found(recorded.path)
        return None

    async def _messages(self, request: Request) -> Response:
        recorded, _ = await self._record(request)
        denied = self._check_auth(recorded, request.path_params["account"])
        if denied is not None:
            return denied
        if request.method == "GET":
            return self._list(recorded)
        return await self._create(recorded)

    async def _message(self, request: Request) -> Response:
        recorded, _ = await self._record(request)
        denied = self._check_auth(recorded, request.path_params["account"])
        if denied is not None:
            return denied
        try:
            return JSONResponse(_public(self.message(request.path_params["sid"])))
        except KeyError:
            return _not_found(recorded.path)

    async def _create(self, recorded: Recorded) -> Response:
        fault = self._faults.pop(0) if self._faults else None
        if fault is not None and fault.kind == "fail":
            message = HTTPStatus(fault.status).phrase
            return JSONResponse(
                error_body(fault.status, 20000 + fault.status, message), status_code=fault.status
            )
        if fault is not None and fault.kind == "throttle":
            return JSONResponse(error_body(429, 20429, "Too Many Requests"), status_code=429)
        form = dict(recorded.form)
        if len(form) != len(recorded.form):
            return _bad_request(21607, "A parameter was given more than once")
        problem = self._validate(form)
        if problem is not None:
            return problem
        resource = self._accept(form)
        if fault is not None and fault.kind == "delay":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), fault.seconds)
        if fault is not None and fault.kind == "drop":
            return _Dropped()
        return JSONResponse(_public(resource), status_code=201)

    def _validate(self, form: dict[str, str]) -> Response | None:
        to = form.get("To")
        if not to:
            return _bad_request(21604, "A 'To' phone number is required.")
        sender = form.get("From")
        service = form.get("MessagingServiceSid")
        if not sender and not service:
            return _bad_request(
                21603, "A 'From' or 'MessagingServiceSid' parameter is required to send a message"
            )
        if not form.get("Body") and not form.get("MediaUrl") and not form.get("ContentSid"):
            return _bad_request(21602, "Message body is required.")
        if len(form.get("Body", "")) > 1600:
            return _bad_request(
                21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if service and service not in self.messaging_services:
            return _bad_request(21701, f"The Messaging Service Sid {service} is invalid.")
        if sender and not E164.match(sender):
            return _bad_request(
                21212,
                f"The 'From' number {sender} is not a valid phone number, shortcode, "
                "or alphanumeric sender ID.",
            )
        if sender in MAGIC_SENDERS:
            code, message = MAGIC_SENDERS[sender]
            return _bad_request(code, message)
        if sender and sender not in self.numbers:
            return _bad_request(
                21606,
                f"The From phone number {sender} is not a valid, SMS-capable inbound phone "
                "number or short code for your account.",
            )
        if not E164.match(to):
            return _bad_request(21211, f"The 'To' number {to} is not a valid phone number.")
        if to in MAGIC_RECIPIENTS:
            code, message = MAGIC_RECIPIENTS[to]
            return _bad_request(code, message.format(to=to))
        if to in self.unsubscribed:
            return _bad_request(21610, "Attempt to send to unsubscribed recipient")
        callback = form.get("StatusCallback")
        if callback is not None and not re.match(r"^https?://[^\s/]+", callback):
            return _bad_request(21609, "The StatusCallback URL is not a valid URL")
        return None

    def _accept(self, form: dict[str, str]) -> dict[str, Any]:
        now = datetime.now(UTC)
        sid = "SM" + uuid.uuid4().hex
        uri = f"{API}/Accounts/{self.account_sid}/Messages/{sid}.json"
        service = form.get("MessagingServiceSid")
        resource: dict[str, Any] = {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": form.get("Body", ""),
            "date_created": rfc2822(now),
            "date_sent": None,
            "date_updated": rfc2822(now),
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form.get("From"),
            "messaging_service_sid": service,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service else "queued",
            "subresource_uris": {"media": uri.removesuffix(".json") + "/Media.json"},
            "to": form["To"],
            "uri": uri,
            "_status_callback": form.get("StatusCallback"),
            "_created": now,
        }
        self.sent.append(resource)
        return resource

    def _list(self, recorded: Recorded) -> Response:
        query = dict(recorded.query)
        try:
            page_size = min(int(query.get("PageSize", "50")), 1000, self.max_page_size)
            page = int(query.get("Page", "0"))
            if page_size < 1 or page < 0:
                raise ValueError
            bounds = {
                name: _date(query[name])
                for name in ("DateSent", "DateSent<", "DateSent>")
                if name in query
            }
        except ValueError:
            return _bad_request(20001, "Invalid paging or date value")
        found = []
        for resource in self.sent:
            if "To" in query and resource["to"] != query["To"]:
                continue
            if "From" in query and resource["from"] != query["From"]:
                continue
            if bounds:
                if resource["date_sent"] is None:
                    continue  # not sent yet: no date to compare
                sent_on = _parse_rfc2822(resource["date_sent"]).date()
                if "DateSent" in bounds and sent_on != bounds["DateSent"]:
                    continue
                if "DateSent<" in bounds and sent_on > bounds["DateSent<"]:
                    continue
                if "DateSent>" in bounds and sent_on < bounds["DateSent>"]:
                    continue
            found.append(resource)
        # Most recent first: by date sent (a message not sent yet by its creation), then
        # by creation (Twilio's dates have whole seconds).
        found.sort(
            key=lambda r: (
                _parse_rfc2822(r["date_sent"]) if r["date_sent"] else r["_created"],
                r["_created"],
            ),
            reverse=True,
        )
        chunk = found[page * page_size : (page + 1) * page_size]
        filters = [(k, v) for k, v in recorded.query if k not in ("Page", "PageSize", "PageToken")]

        def page_uri(number: int, token: str | None = None) -> str:
            params = [*filters, ("PageSize", str(page_size)), ("Page", str(number))]
            if token:
                params.append(("PageToken", token))
            return f"{API}/Accounts/{self.account_sid}/Messages.json?{urlencode(params)}"

        more = (page + 1) * page_size < len(found)
        return JSONResponse(
            {
                "end": page * page_size + max(len(chunk) - 1, 0),
                "first_page_uri": page_uri(0),
                "messages": [_public(r) for r in chunk],
                "next_page_uri": page_uri(page + 1, "PA" + chunk[-1]["sid"]) if more else None,
                "page": page,
                "page_size": page_size,
                "previous_page_uri": page_uri(page - 1, "PB" + chunk[0]["sid"])
                if page and chunk
                else None,
                "start": page * page_size,
                "uri": page_uri(page),
            }
        )


def _public(resource: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if not k.startswith("_")}


def _bad_request(code: int, message: str) -> Response:
    return JSONResponse(error_body(400, code, message), status_code=400)


def _not_found(path: str) -> Response:
    return JSONResponse(
        error_body(404, 20404, f"The requested resource {path} was not found"), status_code=404
    )


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = (
            base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        )
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


def _date(value: str) -> date:
    """Twilio compares the date part only (`YYYY-MM-DD`, or the date of a timestamp)."""
    return date.fromisoformat(value[:10])


def _parse_rfc2822(value: str) -> datetime:
    return parsedate_to_datetime(value)

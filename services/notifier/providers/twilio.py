"""Twilio Programmable Messaging (SMS), over the Messages API 2010-04-01 and httpx.

Why not the official `twilio` SDK: its default HTTP client is synchronous (requests) and
would block the event loop on every send; its asynchronous client brings aiohttp and a
second connection stack. The API is a few form-encoded calls, so this adapter speaks it
directly over a shared `httpx.AsyncClient`, like the other adapters. (The SDK is still
used, by the tests only, as an independent signer of callbacks.)

Send: `POST {endpoint}/2010-04-01/Accounts/{AccountSid}/Messages.json`, HTTP basic auth
(AccountSid:AuthToken), form fields `To`, `From` and/or `MessagingServiceSid` (Twilio
takes either, or both: the number is then used through the service), `Body`, and
`StatusCallback` when the message has one. Answers:
- 2xx with the Message resource (`status` queued/accepted/scheduled): `sent`, its `sid`
  as `provider_message_id`;
- 429, or code 20429 (too many requests) or 21611 (the `From` number's queue is full):
  `retry`, throttled;
- 5xx: `retry` (Twilio did not take the message), except 504: a gateway gave up waiting
  for Twilio, which may have created it, so `unknown`;
- other 4xx: `failed` with Twilio's `code` (as a string) and `message` as `detail`:
  20003 bad credentials, 21211 invalid `To`, 21408 no permission for the region, 21610
  the recipient replied STOP (`UNSUBSCRIBED_CODE`: the notifier suppresses the address),
  21614 not a mobile number, ...
- a connection that failed before the request went out (`ConnectError`, `ConnectTimeout`,
  `PoolTimeout`): `retry`; any other transport error (read/write timeout, dropped
  connection, protocol error) may come after Twilio received the request: `unknown`.

Reconciliation (`query`): Messages have no caller reference, so an attempt is found by
its content. `query` lists `GET …/Messages.json?To={to}[&From={from}]&PageSize=1000`
(every page, up to `QUERY_MAX_PAGES`) and takes the outbound messages whose `body` equals
`Outgoing.text` exactly (and, for a Messaging Service without a number, whose
`messaging_service_sid` is ours), created no earlier than `Outgoing.sent_at` minus
`CLOCK_SKEW` (without `sent_at`, any such message counts). Status queued, accepted,
scheduled, sending, sent, delivered, read, partially_delivered: `sent`; failed,
undelivered, canceled: `failed` with Twilio's `error_code`; a `sent` match wins over a
failed one; no match: `None`.
The list is not filtered with `DateSent>=YYYY-MM-DD` (Twilio's date filter): a message
still in Twilio's queue has no `date_sent` yet (it is null until Twilio hands it to the
carrier, up to hours under throttling), so that filter would miss exactly the attempts
that were accepted and not answered.
Limits of the rule:
- two messages with the same text to the same number from the same sender within the
  window are one to it: a different earlier message with an identical body makes the
  attempt look sent (a missed message, never a duplicate);
- a body Twilio changed (Smart Encoding of a Messaging Service, link shortening) or
  redacted (message redaction / content retention) does not match: `None`;
- Twilio's list lags the sends (users report recent messages missing from it for
  minutes, at times hours): a `None` soon after the attempt is weak evidence, to be asked
  again before sending again (the notifier's `QUERY_GRACE`);
- more than `QUERY_MAX_PAGES` pages to one number, or an error from Twilio while asking:
  `Outcome("unknown")`, i.e. still cannot tell, ask again later (never an exception: the
  notifier would take it for "not sent").
When the Message SID is known, `fetch` reads that one message instead
(`GET …/Messages/{Sid}.json`).

Callbacks (`parse_callback`): status callbacks and inbound messages are form-encoded POSTs
signed with `X-Twilio-Signature` = base64(HMAC-SHA1(AuthToken, URL + the POST parameters
sorted by name, each name followed by its value)), checked in constant time against the
URL as given, with the scheme's default port added and with the port removed (as Twilio's
own validators do: Twilio is not consistent about the port); anything else raises
`CallbackRejected`. Requests signed with a webhook shared key
(`X-Twilio-Webhooks-Signature-Settings`) are rejected: the settings hold no such key.
- status callback (`MessageStatus`): delivered (or read) → `Receipt("delivered")`,
  failed/undelivered → `Receipt("failed", code=ErrorCode)`, with `MessageSid` and `To`;
  queued/accepted/sending/sent and other intermediate statuses → no receipt;
- inbound message (`SmsStatus=received`, `From`, `Body`): `OptOutType=STOP` (Advanced
  Opt-Out of a Messaging Service) → `Receipt("opt_out")`, anything else →
  `Receipt("reply")` with `code` = START or HELP when Twilio says so. Without
  `OptOutType` (a number outside a Messaging Service with Advanced Opt-Out), a body that
  is one of Twilio's default opt-out keywords (STOP, STOPALL, UNSUBSCRIBE, CANCEL, END,
  QUIT, REVOKE, OPTOUT; whole message, any case) is an `opt_out` too, since Twilio
  blocks the number from then on (error 21610); START/YES/UNSTOP and HELP/INFO give
  `code` START and HELP.
The answer to Twilio is an empty TwiML document (`CALLBACK_ANSWER`, `CALLBACK_CONTENT_TYPE`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from services.notifier.providers.base import CallbackRejected, Outcome, Outgoing, Receipt

DEFAULT_ENDPOINT = "https://api.twilio.com"
API_VERSION = "2010-04-01"
TIMEOUT_S = 10.0
"""Timeout of the adapter's own client (connect, read, write, pool)."""

SIGNATURE_HEADER = "X-Twilio-Signature"
SIGNATURE_SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
CALLBACK_ANSWER = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
CALLBACK_CONTENT_TYPE = "text/xml"

UNSUBSCRIBED_CODE = "21610"
"""Twilio's code for a recipient who replied STOP: the address should be suppressed."""
THROTTLED_CODES = frozenset({20429, 21611})
"""Too many requests; the `From` number's queue is full."""

QUERY_PAGE_SIZE = 1000
"""Twilio's maximum page size."""
QUERY_MAX_PAGES = 10
CLOCK_SKEW = timedelta(minutes=2)
"""How far Twilio's `date_created` may lag behind our `sent_at` (clock differences)."""

SENT_STATUSES = frozenset(
    {
        "queued",
        "accepted",
        "scheduled",
        "sending",
        "sent",
        "delivered",
        "read",
        "partially_delivered",
    }
)
FAILED_STATUSES = frozenset({"failed", "undelivered", "canceled"})
DELIVERED_CALLBACK_STATUSES = frozenset({"delivered", "read"})
FAILED_CALLBACK_STATUSES = frozenset({"failed", "undelivered"})
INBOUND_STATUSES = frozenset({"received", "receiving"})

DEFAULT_OPT_OUT_KEYWORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
DEFAULT_OPT_IN_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})
DEFAULT_HELP_KEYWORDS = frozenset({"HELP", "INFO"})

E164 = r"^\+[1-9]\d{1,14}$"
ACCOUNT_SID = r"^AC[0-9a-fA-F]{32}$"
MESSAGING_SERVICE_SID = r"^MG[0-9a-fA-F]{32}$"
_MESSAGE_SID = re.compile(r"^(SM|MM)[0-9a-fA-F]{32}$")


class TwilioSettings(BaseModel):
    """A shop's Twilio account: `from` (an E.164 number of the account) and/or
    `messaging_service_sid` (a Messaging Service, which picks the number)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    account_sid: str = Field(pattern=ACCOUNT_SID)
    auth_token: SecretStr = Field(min_length=1)
    from_: str | None = Field(default=None, alias="from", pattern=E164)
    messaging_service_sid: str | None = Field(default=None, pattern=MESSAGING_SERVICE_SID)
    endpoint: str = DEFAULT_ENDPOINT
    """The API's base URL (a regional edge, or a local stand-in for tests)."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("endpoint must be an http(s) URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("endpoint must be a plain base URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _sender(self) -> TwilioSettings:
        if not self.from_ and not self.messaging_service_sid:
            raise ValueError("either `from` or `messaging_service_sid` is required")
        return self


class TwilioAdapter:
    name = "twilio"
    channel: Literal["sms", "email"] = "sms"
    settings_model: type[BaseModel] = TwilioSettings
    can_query = True

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client
        self._own_client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is not None:
            return self._client
        if self._own_client is None:
            self._own_client = httpx.AsyncClient(timeout=TIMEOUT_S)
        return self._own_client

    async def aclose(self) -> None:
        """Close the client this adapter created (a shared one belongs to its owner)."""
        if self._own_client is not None:
            await self._own_client.aclose()
            self._own_client = None

    # Sending

    async def send(
        self, settings: TwilioSettings | Mapping[str, Any], message: Outgoing
    ) -> Outcome:
        s = _settings(settings)
        if message.channel != "sms":
            return Outcome("failed", code="channel", detail="Twilio sends SMS only")
        form = {"To": message.to}
        if s.from_:
            form["From"] = s.from_
        if s.messaging_service_sid:
            form["MessagingServiceSid"] = s.messaging_service_sid
        form["Body"] = message.text
        if message.status_callback:
            form["StatusCallback"] = message.status_callback
        try:
            response = await self._http().post(
                _messages_url(s), data=form, auth=_auth(s), headers={"Accept": "application/json"}
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return Outcome("retry", detail=f"not sent: {type(exc).__name__}")
        except httpx.TransportError as exc:
            return Outcome("unknown", detail=f"no answer: {type(exc).__name__}")
        return _send_outcome(response)

    # Reconciliation

    async def query(
        self, settings: TwilioSettings | Mapping[str, Any], message: Outgoing
    ) -> Outcome | None:
        s = _settings(settings)
        filters = {"To": message.to, "PageSize": str(QUERY_PAGE_SIZE)}
        if s.from_:
            filters["From"] = s.from_
        not_before = _aware(message.sent_at) - CLOCK_SKEW if message.sent_at else None
        url: str | None = _messages_url(s)
        found: Outcome | None = None
        pages = 0
        while url is not None:
            if pages == QUERY_MAX_PAGES:
                return found or Outcome(
                    "unknown", detail=f"more than {QUERY_MAX_PAGES} pages of messages to search"
                )
            # The first page from our filters; the next ones from Twilio's `next_page_uri`.
            page = await self._get_json(s, url, filters if pages == 0 else None)
            if isinstance(page, Outcome):
                return page
            if page is None:
                break
            for resource in _list(page.get("messages")):
                if not _matches(s, message, resource, not_before):
                    continue
                outcome = _status_outcome(resource)
                if outcome.kind == "sent":
                    return outcome
                found = found or outcome
            url = _next_page(s, page.get("next_page_uri"))
            pages += 1
        return found

    async def fetch(
        self, settings: TwilioSettings | Mapping[str, Any], provider_message_id: str
    ) -> Outcome | None:
        """The status of the message with this SID (`None` if Twilio does not know it)."""
        s = _settings(settings)
        if not _MESSAGE_SID.match(provider_message_id):
            raise ValueError("not a Twilio Message SID")
        url = f"{_messages_url(s).removesuffix('.json')}/{provider_message_id}.json"
        resource = await self._get_json(s, url, None, missing_ok=True)
        if resource is None or isinstance(resource, Outcome):
            return resource
        return _status_outcome(resource)

    async def _get_json(
        self,
        s: TwilioSettings,
        url: str,
        params: Mapping[str, str] | None,
        *,
        missing_ok: bool = False,
    ) -> dict[str, Any] | Outcome | None:
        """The JSON object at `url`, or an `unknown` outcome saying why Twilio could not
        be asked (`None` for a 404 when `missing_ok`)."""
        try:
            response = await self._http().get(
                url, params=params, auth=_auth(s), headers={"Accept": "application/json"}
            )
        except httpx.TransportError as exc:
            return Outcome("unknown", detail=f"status query failed: {type(exc).__name__}")
        if response.status_code == 404 and missing_ok:
            return None
        data = _json(response)
        if response.status_code != 200 or data is None:
            code, detail = _error(response, data)
            return Outcome("unknown", code=code, detail=f"status query failed: {detail}")
        return data

    # Callbacks

    def parse_callback(
        self,
        settings: TwilioSettings | Mapping[str, Any],
        headers: Mapping[str, str],
        url: str,
        body: bytes,
    ) -> list[Receipt]:
        s = _settings(settings)
        lowered = {name.lower(): value for name, value in headers.items()}
        if SIGNATURE_SETTINGS_HEADER.lower() in lowered:
            raise CallbackRejected("signed with a webhook shared key, which is not configured")
        signed = lowered.get(SIGNATURE_HEADER.lower())
        if not signed:
            raise CallbackRejected(f"no {SIGNATURE_HEADER} header")
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise CallbackRejected("not a form-encoded body") from None
        if not valid_signature(s.auth_token.get_secret_value(), url, pairs, signed):
            raise CallbackRejected(f"{SIGNATURE_HEADER} does not match")
        params = dict(pairs)
        if params.get("AccountSid", s.account_sid) != s.account_sid:
            raise CallbackRejected("callback of another account")
        status = (params.get("MessageStatus") or params.get("SmsStatus") or "").lower()
        if status in INBOUND_STATUSES or (not status and "Body" in params):
            return [_inbound_receipt(params)]
        if status:
            return _status_receipts(params, status)
        raise CallbackRejected("neither a status callback nor an inbound message")


ADAPTER = TwilioAdapter()


def signature(auth_token: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    """Twilio's `X-Twilio-Signature` of a form-encoded request to `url`: base64 of the
    HMAC-SHA1, keyed with the auth token, of the URL followed by every parameter name and
    value, sorted by name (the values of a repeated name sorted too, repeats once, as
    Twilio's own validators do)."""
    values: dict[str, set[str]] = {}
    for name, value in params:
        values.setdefault(name, set()).add(value)
    data = url + "".join(name + value for name in sorted(values) for value in sorted(values[name]))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def valid_signature(
    auth_token: str, url: str, params: Sequence[tuple[str, str]], header: str
) -> bool:
    """Whether `header` is the signature of the request, for the URL as given, with its
    default port or without its port (compared in constant time)."""
    expected = header.strip().encode()
    results = [
        hmac.compare_digest(signature(auth_token, variant, params).encode(), expected)
        for variant in _url_variants(url)
    ]
    return any(results)


def _url_variants(url: str) -> list[str]:
    parts = urlsplit(url)
    variants = [url]
    try:
        port = parts.port
    except ValueError:
        return variants
    host = parts.netloc.rpartition("@")
    userinfo = host[0] + host[1]
    hostport = host[2]
    if port is not None:
        without = hostport[: hostport.rfind(":")]
        variants.append(urlunsplit(parts._replace(netloc=userinfo + without)))
    elif parts.scheme in ("http", "https"):
        default = 443 if parts.scheme == "https" else 80
        variants.append(urlunsplit(parts._replace(netloc=f"{userinfo}{hostport}:{default}")))
    return variants


def _settings(settings: TwilioSettings | Mapping[str, Any]) -> TwilioSettings:
    if isinstance(settings, TwilioSettings):
        return settings
    return TwilioSettings.model_validate(settings)


def _messages_url(s: TwilioSettings) -> str:
    return f"{s.endpoint}/{API_VERSION}/Accounts/{s.account_sid}/Messages.json"


def _auth(s: TwilioSettings) -> httpx.BasicAuth:
    return httpx.BasicAuth(s.account_sid, s.auth_token.get_secret_value())


def _json(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _error(response: httpx.Response, data: dict[str, Any] | None) -> tuple[str, str]:
    """Twilio's error `code` (or `http_<status>`) and `message` from an error answer."""
    code = data.get("code") if data else None
    message = data.get("message") if data else None
    return (
        str(code) if isinstance(code, int | str) and str(code) else f"http_{response.status_code}",
        str(message) if message else f"HTTP {response.status_code} {response.reason_phrase}",
    )


def _send_outcome(response: httpx.Response) -> Outcome:
    status = response.status_code
    data = _json(response)
    if 200 <= status < 300:
        if data is None:
            return Outcome("sent", detail="accepted; the answer had no message resource")
        return _status_outcome(data)
    code, detail = _error(response, data)
    if status == 429 or code in {str(c) for c in THROTTLED_CODES}:
        return Outcome("retry", code=code, detail=detail, throttled=True)
    if status == 504:
        return Outcome("unknown", code=code, detail=detail)
    if status >= 500 or status == 408:
        return Outcome("retry", code=code, detail=detail)
    return Outcome("failed", code=code, detail=detail)


def _status_outcome(resource: Mapping[str, Any]) -> Outcome:
    sid = resource.get("sid")
    sid = sid if isinstance(sid, str) and sid else None
    status = str(resource.get("status") or "").lower()
    if status in FAILED_STATUSES:
        error_code = resource.get("error_code")
        return Outcome(
            "failed",
            provider_message_id=sid,
            code=str(error_code) if error_code not in (None, "") else status,
            detail=str(resource.get("error_message") or status),
        )
    if status in SENT_STATUSES or not status:
        return Outcome("sent", provider_message_id=sid)
    # An unknown status of a message Twilio holds: it has the message, so not "never seen".
    return Outcome("sent", provider_message_id=sid, detail=f"status {status}")


def _matches(
    s: TwilioSettings, message: Outgoing, resource: Mapping[str, Any], not_before: datetime | None
) -> bool:
    if not str(resource.get("direction") or "").startswith("outbound"):
        return False
    if resource.get("to") != message.to or resource.get("body") != message.text:
        return False
    if s.from_:
        if resource.get("from") != s.from_:
            return False
    elif resource.get("messaging_service_sid") != s.messaging_service_sid:
        return False
    if not_before is None:
        return True
    created = _rfc2822(resource.get("date_created"))
    return created is None or created >= not_before


def _rfc2822(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return _aware(parsedate_to_datetime(value))
    except (TypeError, ValueError):
        return None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _list(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _next_page(s: TwilioSettings, uri: Any) -> str | None:
    """The next page's URL: Twilio gives a path, resolved against our endpoint only (an
    absolute URL would carry our credentials elsewhere)."""
    if not isinstance(uri, str) or not uri.startswith(f"/{API_VERSION}/Accounts/{s.account_sid}/"):
        return None
    return s.endpoint + uri


def _status_receipts(params: Mapping[str, str], status: str) -> list[Receipt]:
    sid = params.get("MessageSid") or params.get("SmsSid") or None
    to = params.get("To") or None
    if status in DELIVERED_CALLBACK_STATUSES:
        return [Receipt("delivered", provider_message_id=sid, address=to)]
    if status in FAILED_CALLBACK_STATUSES:
        code = params.get("ErrorCode") or None
        return [Receipt("failed", provider_message_id=sid, address=to, code=code, detail=status)]
    return []


def _inbound_receipt(params: Mapping[str, str]) -> Receipt:
    sender = params.get("From") or None
    text = params.get("Body", "")
    sid = params.get("MessageSid") or params.get("SmsSid") or None
    keyword = params.get("OptOutType", "").strip().upper()
    if not keyword:
        word = text.strip().upper()
        if word in DEFAULT_OPT_OUT_KEYWORDS:
            keyword = "STOP"
        elif word in DEFAULT_OPT_IN_KEYWORDS:
            keyword = "START"
        elif word in DEFAULT_HELP_KEYWORDS:
            keyword = "HELP"
    kind: Literal["opt_out", "reply"] = "opt_out" if keyword == "STOP" else "reply"
    return Receipt(kind, provider_message_id=sid, address=sender, text=text, code=keyword or None)

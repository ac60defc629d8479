"""The `smtp` provider: email over SMTP (aiosmtplib), to the merchant's own mail server or
any relay that speaks SMTP.

A send is one SMTP transaction on a connection of its own: connect (implicit TLS when
`tls="implicit"`), EHLO, STARTTLS (`tls="starttls"`: required, never a silent fall back
to plaintext when the server does not offer it), AUTH when a username is set, MAIL, RCPT,
DATA, QUIT. A pooled connection per shop (several messages per connection, RSET between
them) is a later optimisation.

The message is a MIME message built with the standard library (`email.message`): From,
To, Subject (RFC 2047 encoded words when it is not ASCII), Date, a Message-ID derived
from Huitou's message id (`<{message_id}@{domain of From}>`: the same on every attempt, so
a receiver can recognise a repeat), the text part alone or text and html as
`multipart/alternative`, UTF-8, 7-bit clean (base64 or quoted-printable bodies, so no
server needs 8BITMIME), and the extra headers the notifier gives (`List-Unsubscribe`,
`List-Unsubscribe-Post`): written as given, on one line, after checking they are one.

Outcomes, by what the server answered and when:
- 250 to the end of DATA → `sent`, `provider_message_id` is the Message-ID (with its
  angle brackets, as bounces (DSNs) quote it).
- a 5xx reply → `failed` with the reply's code (`"550"`, `"553"`, `"554"`, `"535"` for
  bad credentials) and `detail` = the command it answered and the server's text
  (`"RCPT 550 5.1.1 …"`); a 5xx to RCPT is a hard bounce of the recipient, while one to
  MAIL or DATA is about the sender or the content (the detail says which).
- a 4xx reply (421, 450, 451, 452, 454) → `retry`: the server refused it for now and
  nothing was delivered.
- no connection, a TLS handshake that fails, a timeout or a dropped connection before
  the DATA command → `retry` (nothing was delivered); a server that does not offer
  STARTTLS when `tls="starttls"` → `retry` with code `starttls_unavailable` (nothing was
  sent, not even the credentials).
- a timeout or a dropped connection once the DATA command went out → `unknown`: the
  server may have accepted the message before its answer was lost.

SMTP cannot say whether such an attempt was delivered: there is no status to ask for
(`can_query = False`, `query` returns None), so the notifier does not send an `unknown`
email again (at most once) and records it so. Bounces arrive later as DSN mail to the
envelope sender, which is out of scope here; SMTP has no callbacks (`parse_callback`
rejects every request).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.policy import Policy
from email.utils import format_datetime
from typing import Any, Literal

import aiosmtplib
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from services.notifier.providers.base import CallbackRejected, Outcome, Outgoing, Receipt

POLICY = SMTP_POLICY.clone(cte_type="7bit")
"""CRLF line endings, encoded words in headers, and bodies that need no 8BITMIME."""

_DETAIL_MAX = 300
_QUIT_TIMEOUT_S = 1.0
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
"""RFC 5322 dot-atom-text: the left part of a Message-ID."""
_HEADER_NAME = re.compile(r"[!-9;-~]+")
"""RFC 5322 field name: printable ASCII but the colon."""
_RESERVED_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "return-path",
    }
)
"""Headers this adapter writes (or that would change who receives the message)."""


class SmtpSettings(BaseModel):
    """A shop's SMTP server: `{"host", "port", "username"?, "password"?, "tls", "from"}`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, hide_input_in_errors=True)

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    tls: Literal["none", "starttls", "implicit"]
    """`implicit`: TLS from the first byte (port 465); `starttls`: plaintext upgraded by
    STARTTLS, which the server must offer (port 587); `none`: plaintext (port 25)."""
    from_: str = Field(alias="from", min_length=3)
    """The sender: `news@shop.example` or `Shop name <news@shop.example>` (the name may be
    Chinese); its address is also the envelope sender, where bounces go."""
    verify_tls: bool = True
    """Check the server's certificate and name (turn off only for a server you trust by
    other means)."""
    ca_file: str | None = None
    """PEM file of the certificate authorities to trust instead of the system's."""
    timeout_s: float = Field(default=15, gt=0)
    """For connecting and for each reply of the server."""

    @field_validator("from_")
    @classmethod
    def _one_address(cls, value: str) -> str:
        _sender_address(value)
        return value

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> SmtpSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self


class InvalidMessage(ValueError):
    """A message this adapter will not send as it is (never retried: `failed`)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _one_mailbox(value: str, what: str) -> Address:
    if value.splitlines() != [value]:
        raise InvalidMessage(f"invalid_{what}", f"the {what} is not one line")
    header = POLICY.header_factory("to", value)
    addresses: tuple[Address, ...] = getattr(header, "addresses", ())
    if len(addresses) != 1 or header.defects or not addresses[0].domain:
        raise InvalidMessage(f"invalid_{what}", f"the {what} is not one email address")
    return addresses[0]


def _sender_address(value: str) -> Address:
    """The one mailbox of `from`: its address must be ASCII (it names the Message-ID's
    domain and the envelope sender); its display name need not be."""
    try:
        address = _one_mailbox(value, "sender")
    except InvalidMessage as exc:
        raise ValueError(str(exc)) from None
    if not address.addr_spec.isascii() or "." not in address.domain:
        raise ValueError("the sender's address must be ASCII, with a full domain")
    return address


def _recipient(to: str) -> Address:
    """The recipient, ASCII (an internationalised domain is written in its IDNA form; a
    non-ASCII local part would need SMTPUTF8, not supported), its display name kept."""
    address = _one_mailbox(to, "recipient")
    if not address.username.isascii():
        raise InvalidMessage("invalid_recipient", "a non-ASCII local part needs SMTPUTF8")
    try:
        domain = address.domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidMessage("invalid_recipient", "the recipient's domain is invalid") from None
    return Address(address.display_name, address.username, domain)


class _VerbatimHeader(str):
    """A header value written as given, on one line: the email package would fold a long
    URL of `List-Unsubscribe` into RFC 2047 encoded words, which receivers do not decode
    in that header. (A value with a `name` is a header object to `email.policy`: it is
    stored unchanged and written by its own `fold`.)"""

    name: str

    def __new__(cls, name: str, value: str) -> _VerbatimHeader:
        header = super().__new__(cls, value)
        header.name = name
        return header

    def fold(self, *, policy: Policy) -> str:
        return f"{self.name}: {self}{policy.linesep}"


def _add_header(mime: EmailMessage, name: str, value: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise InvalidMessage("invalid_header", f"{name!r} is not a header name")
    lowered = name.lower()
    if lowered in _RESERVED_HEADERS or lowered.startswith("content-"):
        raise InvalidMessage("invalid_header", f"{name} is set by the adapter")
    if value.splitlines() != [value] or any(ord(c) < 32 and c != "\t" for c in value):
        raise InvalidMessage("invalid_header", f"{name} is not one line")
    if value.isascii():
        if len(name) + 2 + len(value) > 998 or "\x7f" in value:
            raise InvalidMessage("invalid_header", f"{name} is too long or not printable")
        mime[name] = _VerbatimHeader(name, value)
    else:
        mime[name] = value  # RFC 2047 encoded words (a text header, not a URL list)


def message_id_header(settings: SmtpSettings, message: Outgoing) -> str:
    """`<{message_id}@{domain of From}>`: the same for every attempt of a message."""
    if not _ATEXT.fullmatch(message.message_id):
        raise InvalidMessage("invalid_message", "the message id cannot be a Message-ID")
    return f"<{message.message_id}@{_sender_address(settings.from_).domain.lower()}>"


def build_message(settings: SmtpSettings, message: Outgoing) -> EmailMessage:
    """The MIME message of `message` (raises `InvalidMessage`)."""
    mime = EmailMessage(policy=POLICY)
    mime["From"] = settings.from_
    mime["To"] = _recipient(message.to)
    if message.subject is not None:
        if message.subject.splitlines() != [message.subject]:
            raise InvalidMessage("invalid_header", "the subject is not one line")
        mime["Subject"] = message.subject
    sent_at = message.sent_at or datetime.now(UTC)
    if sent_at.tzinfo is None:
        sent_at = sent_at.replace(tzinfo=UTC)
    mime["Date"] = format_datetime(sent_at)
    mime["Message-ID"] = message_id_header(settings, message)
    for name, value in message.headers.items():
        _add_header(mime, name, value)
    mime.set_content(message.text, subtype="plain", charset="utf-8")
    if message.html is not None:
        mime.add_alternative(message.html, subtype="html", charset="utf-8")
        for part in mime.iter_parts():
            del part["MIME-Version"]  # once, at the top (add_alternative repeats it)
    return mime


_local_hostname: str | None = None


async def _ehlo_name() -> str:
    """This host's name for EHLO, looked up once (a slow resolver costs one send, not
    every send)."""
    global _local_hostname
    if _local_hostname is None:
        _local_hostname = await asyncio.to_thread(socket.getfqdn)
    return _local_hostname


def _tls_context(settings: SmtpSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


Phase = Literal["CONNECT", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA"]


def _detail(phase: Phase, text: str) -> str:
    return f"{phase} {text}"[:_DETAIL_MAX]


def _replied(phase: Phase, code: int, text: str) -> Outcome:
    """A server's refusal: 5xx for good, 4xx for now. Any other answer (a malformed one is
    -1 to aiosmtplib) is no refusal: unknown after DATA, where the server may have taken
    the message, and a retry before it."""
    detail = _detail(phase, f"{code} {text}")
    if 500 <= code < 600:
        return Outcome("failed", code=str(code), detail=detail)
    if 400 <= code < 500:
        return Outcome("retry", code=str(code), detail=detail)
    return Outcome("unknown" if phase == "DATA" else "retry", detail=detail)


class SmtpAdapter:
    """Email over SMTP for the notifier (see the module's docstring)."""

    name = "smtp"
    channel: Literal["sms", "email"] = "email"
    settings_model: type[BaseModel] = SmtpSettings
    can_query = False

    async def send(self, settings: Any, message: Outgoing) -> Outcome:
        config = (
            settings
            if isinstance(settings, SmtpSettings)
            else SmtpSettings.model_validate(settings)
        )
        try:
            mime = build_message(config, message)
            recipient = _recipient(message.to).addr_spec
            sender = _sender_address(config.from_).addr_spec
        except InvalidMessage as exc:
            return Outcome("failed", code=exc.code, detail=str(exc))
        try:
            context = _tls_context(config) if config.tls != "none" else None
        except (OSError, ssl.SSLError) as exc:
            return Outcome("failed", code="tls_config", detail=f"ca_file: {exc}"[:_DETAIL_MAX])
        payload = mime.as_bytes()
        client = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            use_tls=config.tls == "implicit",
            start_tls=False,  # done below, where its absence is an answer of its own
            tls_context=context,
            timeout=config.timeout_s,
            local_hostname=await _ehlo_name(),
        )
        phase: Phase = "CONNECT"
        accepted = False
        try:
            await client.connect()
            phase = "EHLO"
            await client.ehlo()
            if config.tls == "starttls":
                if not client.supports_extension("starttls"):
                    return Outcome(
                        "retry",
                        code="starttls_unavailable",
                        detail=_detail(phase, "the server does not offer STARTTLS"),
                    )
                phase = "STARTTLS"
                await client.starttls()
                phase = "EHLO"
                await client.ehlo()
            if config.username is not None and config.password is not None:
                phase = "AUTH"
                if not client.supports_extension("auth"):
                    return Outcome(
                        "failed",
                        code="auth_unavailable",
                        detail=_detail(phase, "the server does not offer AUTH"),
                    )
                await client.login(config.username, config.password.get_secret_value())
            phase = "MAIL"
            options = [f"SIZE={len(payload)}"] if client.supports_extension("size") else []
            await client.mail(sender, options=options)
            phase = "RCPT"
            await client.rcpt(recipient)
            phase = "DATA"
            await client.data(payload)
            accepted = True
        except aiosmtplib.SMTPResponseException as exc:
            # A 4xx or 5xx is definite, even to DATA: the server says it did not take it.
            return _replied(phase, exc.code, exc.message)
        except (OSError, aiosmtplib.SMTPException) as exc:
            # No answer: refused or dropped connections, timeouts and TLS handshakes (all
            # OSError, as are aiosmtplib's timeouts and disconnections), or AUTH offered
            # with no mechanism aiosmtplib knows.
            what = _detail(phase, f"{type(exc).__name__}: {exc}")
            if phase == "DATA":
                return Outcome("unknown", detail=what)
            if phase == "AUTH" and not isinstance(exc, OSError):
                return Outcome("failed", code="auth_unavailable", detail=what)
            return Outcome("retry", detail=what)
        finally:
            if not accepted:
                client.close()
        try:
            # Briefly: the message is accepted, and a server slow to say goodbye must not
            # hold that answer back.
            await client.quit(timeout=min(config.timeout_s, _QUIT_TIMEOUT_S))
        except (OSError, aiosmtplib.SMTPException):
            pass  # how the session ends does not matter any more
        finally:
            client.close()
        return Outcome("sent", provider_message_id=str(mime["Message-ID"]))

    async def query(self, settings: Any, message: Outgoing) -> Outcome | None:
        # SMTP keeps no status to ask for: an attempt whose answer was lost stays unknown.
        return None

    def parse_callback(
        self, settings: Any, headers: Mapping[str, str], url: str, body: bytes
    ) -> list[Receipt]:
        raise CallbackRejected("smtp has no callbacks")


ADAPTER = SmtpAdapter()

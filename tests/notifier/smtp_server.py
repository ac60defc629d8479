"""A real SMTP server for the tests of the `smtp` provider: aiosmtpd's SMTP protocol on
127.0.0.1, served on the test's own event loop.

It speaks plaintext, STARTTLS (offered, and required before MAIL) or implicit TLS, with a
self-signed certificate made here (`self_signed_certificate`, the `cryptography`
package); AUTH PLAIN/LOGIN for one user; and it records every message it accepted
(`received`) and every AUTH attempt (`auth_attempts`). `script` makes it misbehave:
refuse a sender or recipient, answer the next DATA with a code, or drop (or hang up on)
the connection once the message's content arrived.
"""

from __future__ import annotations

import asyncio
import datetime
import email
import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Mode = Literal["plain", "starttls", "implicit"]


class _NoLoginDataWarning(logging.Filter):
    """aiosmtpd 1.4 warns of its own deprecated `Session.login_data` on every AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_NoLoginDataWarning())


@dataclass(frozen=True)
class Certificate:
    cert_file: Path
    """PEM certificate: the server's, and the CA file a client trusts it by."""
    key_file: Path


def self_signed_certificate(folder: Path) -> Certificate:
    """A certificate for `localhost` and 127.0.0.1, signed by its own key, valid a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert_file, key_file)


@dataclass(frozen=True)
class Received:
    """One message the server accepted (or took in before it dropped the connection)."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    """As it came over the wire (CRLF line endings)."""
    message: EmailMessage
    """`content` parsed with `email.policy.default`."""
    tls: bool
    """Whether the connection was encrypted when the content arrived."""
    login: str | None
    """The user the session authenticated as."""


@dataclass
class Script:
    """How the server misbehaves; each DATA takes the first of `data_answers`, then of
    `after_data`."""

    refuse_senders: dict[str, str] = field(default_factory=dict)
    """Sender address → the reply to its MAIL (`"550 5.7.1 not allowed"`)."""
    refuse_recipients: dict[str, str] = field(default_factory=dict)
    """Recipient address → the reply to its RCPT (`"550 5.1.1 mailbox unavailable"`)."""
    data_answers: list[str] = field(default_factory=list)
    """Replies for the next DATAs in place of 250 (`"451 4.3.0 try again later"`); the
    message is not recorded."""
    after_data: list[Literal["drop", "hang"]] = field(default_factory=list)
    """For the next DATAs: record the message, then close the connection without a reply
    (`drop`) or never reply (`hang`)."""


@dataclass(frozen=True)
class AuthAttempt:
    mechanism: str
    login: str
    success: bool
    tls: bool


def _encrypted(server: SMTP) -> bool:
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


def _abort(server: SMTP) -> None:
    if isinstance(server.transport, asyncio.Transport):
        server.transport.abort()


class SmtpServer:
    """`async with SmtpServer(mode, certificate, users={"user": "password"}) as server:`
    then send to 127.0.0.1:`server.port`.

    `mode="plain"`: no TLS at all (STARTTLS not offered); AUTH is offered only with
    `auth_over_plaintext=True`. `mode="starttls"`: STARTTLS offered and required before
    anything else (AUTH offered once encrypted). `mode="implicit"`: TLS from the first
    byte."""

    def __init__(
        self,
        mode: Mode,
        certificate: Certificate | None = None,
        *,
        users: dict[str, str] | None = None,
        auth_over_plaintext: bool = False,
        script: Script | None = None,
    ) -> None:
        if mode != "plain" and certificate is None:
            raise ValueError(f"a {mode} server needs a certificate")
        self.mode = mode
        self.users = dict(users or {})
        self.auth_over_plaintext = auth_over_plaintext
        self.script = script or Script()
        self.received: list[Received] = []
        self.auth_attempts: list[AuthAttempt] = []
        self.connections = 0
        self.port = 0
        self._tls: ssl.SSLContext | None = None
        if certificate is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(certificate.cert_file, certificate.key_file)
        self._server: asyncio.Server | None = None
        self._sessions: list[SMTP] = []
        self._hanging: list[asyncio.Event] = []
        self._handler = _Handler(self)

    def _protocol(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {}
        if self.users:
            kwargs["authenticator"] = self._handler.authenticate
            # aiosmtpd sees only STARTTLS as encryption; implicit TLS is encrypted too.
            kwargs["auth_require_tls"] = self.mode == "starttls" or (
                self.mode == "plain" and not self.auth_over_plaintext
            )
        if self.mode == "starttls":
            kwargs["tls_context"] = self._tls
            kwargs["require_starttls"] = True
        session = SMTP(
            self._handler,
            hostname="smtp.test",
            loop=asyncio.get_running_loop(),
            **kwargs,
        )
        self._sessions.append(session)
        return session

    async def start(self) -> SmtpServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            "127.0.0.1",
            0,
            ssl=self._tls if self.mode == "implicit" else None,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        for event in self._hanging:
            event.set()
        if self._server is not None:
            self._server.close()
        for session in self._sessions:
            _abort(session)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> SmtpServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class _Handler:
    """aiosmtpd's handler: its `handle_*` hooks (a separate object, as aiosmtpd takes
    every `auth_*` attribute of its handler for an AUTH mechanism)."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    def authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login = auth_data.login.decode()
        success = self.server.users.get(login) == auth_data.password.decode()
        self.server.auth_attempts.append(AuthAttempt(mechanism, login, success, _encrypted(server)))
        # handled=False: aiosmtpd answers a failure itself (535).
        return AuthResult(success=success, handled=False, auth_data=auth_data if success else None)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if refusal := self.server.script.refuse_senders.get(address):
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if refusal := self.server.script.refuse_recipients.get(address):
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.server.script.data_answers:
            return self.server.script.data_answers.pop(0)
        content = envelope.original_content or b""
        self.server.received.append(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                content=content,
                message=email.message_from_bytes(content, policy=policy.default),
                tls=_encrypted(server),
                login=(
                    session.auth_data.login.decode()
                    if isinstance(session.auth_data, LoginPassword)
                    else None
                ),
            )
        )
        if self.server.script.after_data:
            what = self.server.script.after_data.pop(0)
            if what == "hang":
                hanging = asyncio.Event()
                self.server._hanging.append(hanging)
                await hanging.wait()
            _abort(server)
            return "250 OK (never written: the connection is closed)"
        return "250 2.0.0 OK queued"

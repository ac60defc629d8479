"""The SMTP adapter against a real SMTP server (aiosmtpd, `tests/notifier/smtp_server.py`):
each TLS mode with AUTH, the MIME message as a receiver parses it (and as it went over
the wire), and the outcome of each way a server refuses, fails or goes silent."""

from __future__ import annotations

import email.utils
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from services.notifier.providers.base import Adapter, CallbackRejected, Outgoing
from services.notifier.providers.smtp import ADAPTER, SmtpAdapter, SmtpSettings
from tests.notifier.smtp_server import (
    Certificate,
    Mode,
    Script,
    SmtpServer,
    self_signed_certificate,
)
from tests.servers import free_port

USER = "mailer@shop.example.com"
SMTP_SECRET = "correct-horse-battery-staple"
"""The mailbox's password (a `*SECRET` constant: the log hygiene scan looks for it)."""
SENDER = "惠投商城 <news@shop.example.com>"
RECIPIENT = "buyer@example.org"
SUBJECT = "双十一大促：全场五折起，仅限今天！Émilie 的专属优惠 🎁"
TEXT = "您好，\n您的专属优惠已到账：满 200 减 50。\n" + "退订请点击邮件底部的链接。" * 8 + "\n"
HTML = "<html><body><p>您好，</p><p>您的专属优惠已到账：<b>满 200 减 50</b>。</p></body></html>"
UNSUBSCRIBE = (
    "<https://huitou.example.com/v1/unsubscribe/shop-42/"
    "0f4c2a9be1d34c7f8a6b5e4d3c2b1a09?token=eyJhbGciOiJIUzI1NiJ9.c2hvcC00Mg.abcdefghijklmnop>"
)
"""Longer than a folded line: written as is, never as RFC 2047 encoded words."""
SENT_AT = datetime(2025, 11, 11, 0, 0, 7, tzinfo=UTC)

_conformance: Adapter = ADAPTER  # mypy checks the adapter against the protocol


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return self_signed_certificate(tmp_path_factory.mktemp("smtp-tls"))


def outgoing(**changes: Any) -> Outgoing:
    fields: dict[str, Any] = {
        "message_id": uuid.uuid4().hex,
        "shop_id": "shop-42",
        "channel": "email",
        "to": RECIPIENT,
        "text": TEXT,
        "subject": SUBJECT,
        "html": HTML,
        "headers": {
            "List-Unsubscribe": UNSUBSCRIBE,
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
        "sent_at": SENT_AT,
    }
    fields.update(changes)
    return Outgoing(**fields)


def settings_for(
    server: SmtpServer | int,
    tls: str,
    certificate: Certificate | None,
    **changes: Any,
) -> SmtpSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server if isinstance(server, int) else server.port,
        "username": USER,
        "password": SMTP_SECRET,
        "tls": tls,
        "from": SENDER,
        "ca_file": str(certificate.cert_file) if certificate else None,
        "timeout_s": 5,
    }
    values.update(changes)
    return SmtpSettings.model_validate(values)


TLS_OF_MODE = {"plain": "none", "starttls": "starttls", "implicit": "implicit"}


def server_for(mode: Mode, certificate: Certificate, script: Script | None = None) -> SmtpServer:
    return SmtpServer(
        mode,
        None if mode == "plain" else certificate,
        users={USER: SMTP_SECRET},
        auth_over_plaintext=mode == "plain",
        script=script,
    )


def raw_headers(content: bytes) -> list[bytes]:
    """The header lines of the top level as sent (folded lines joined back)."""
    head = content.split(b"\r\n\r\n", 1)[0]
    return head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t").split(b"\r\n")


@pytest.mark.parametrize("mode", ["plain", "starttls", "implicit"])
async def test_sends_over_each_tls_mode_with_auth(mode: Mode, certificate: Certificate) -> None:
    message = outgoing()
    async with server_for(mode, certificate) as server:
        outcome = await ADAPTER.send(settings_for(server, TLS_OF_MODE[mode], certificate), message)

    expected_id = f"<{message.message_id}@shop.example.com>"
    assert outcome.kind == "sent", outcome
    assert outcome.provider_message_id == expected_id
    [received] = server.received
    assert received.tls is (mode != "plain")
    assert received.login == USER
    assert [a.success for a in server.auth_attempts] == [True]
    assert received.mail_from == "news@shop.example.com"
    assert received.rcpt_tos == [RECIPIENT]

    mime = received.message
    assert mime["From"] == SENDER
    assert mime["From"].addresses[0].display_name == "惠投商城"
    assert mime["To"] == RECIPIENT
    assert mime["Subject"] == SUBJECT
    assert mime["Date"].datetime == SENT_AT
    assert mime["Message-ID"] == expected_id
    assert mime["MIME-Version"] == "1.0"
    assert mime["List-Unsubscribe"] == UNSUBSCRIBE
    assert mime["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert not mime.defects

    assert mime.get_content_type() == "multipart/alternative"
    parts = list(mime.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert [p.get_content_charset() for p in parts] == ["utf-8", "utf-8"]
    assert [p.get("MIME-Version") for p in parts] == [None, None]
    assert parts[0].get_content().replace("\r\n", "\n") == TEXT
    assert parts[1].get_content().replace("\r\n", "\n").rstrip("\n") == HTML

    # On the wire: 7-bit clean, the subject in encoded words, the unsubscribe headers
    # exactly as given (RFC 2369 angle brackets, never encoded words), CRLF line ends.
    content = received.content
    assert content.isascii()
    headers = raw_headers(content)
    subject_line = next(h for h in headers if h.startswith(b"Subject: "))
    assert b"=?utf-8?" in subject_line
    assert f"List-Unsubscribe: {UNSUBSCRIBE}".encode() in headers
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in headers
    assert email.utils.parsedate_to_datetime(mime["Date"]) == SENT_AT


async def test_text_only_is_a_single_text_part(certificate: Certificate) -> None:
    async with server_for("starttls", certificate) as server:
        outcome = await ADAPTER.send(
            settings_for(server, "starttls", certificate), outgoing(html=None, headers={})
        )
    assert outcome.kind == "sent", outcome
    mime = server.received[0].message
    assert not mime.is_multipart()
    assert mime.get_content_type() == "text/plain"
    assert mime.get_content_charset() == "utf-8"
    assert mime.get_content().replace("\r\n", "\n") == TEXT
    assert "List-Unsubscribe" not in mime


async def test_the_message_id_is_the_same_on_every_attempt(certificate: Certificate) -> None:
    message = outgoing()
    async with server_for("implicit", certificate) as server:
        settings = settings_for(server, "implicit", certificate)
        first = await ADAPTER.send(settings, message)
        second = await ADAPTER.send(settings, message)
    assert first == second
    assert first.provider_message_id == f"<{message.message_id}@shop.example.com>"
    ids = [r.message["Message-ID"] for r in server.received]
    assert ids == [first.provider_message_id] * 2


@pytest.mark.parametrize(
    ("answer", "kind", "code"),
    [
        ("550 5.1.1 Mailbox unavailable", "failed", "550"),
        ("553 5.1.3 Bad destination mailbox address syntax", "failed", "553"),
        ("450 4.2.0 Greylisted, try again in 5 minutes", "retry", "450"),
    ],
)
async def test_a_refused_recipient_is_answered_by_its_code(
    answer: str, kind: str, code: str, certificate: Certificate
) -> None:
    script = Script(refuse_recipients={RECIPIENT: answer})
    async with server_for("starttls", certificate, script) as server:
        outcome = await ADAPTER.send(settings_for(server, "starttls", certificate), outgoing())
    assert (outcome.kind, outcome.code) == (kind, code)
    assert outcome.detail == f"RCPT {answer}"
    assert server.received == []


async def test_a_refused_sender_fails_and_names_the_command(certificate: Certificate) -> None:
    script = Script(refuse_senders={"news@shop.example.com": "553 5.7.1 Sender not allowed"})
    async with server_for("starttls", certificate, script) as server:
        outcome = await ADAPTER.send(settings_for(server, "starttls", certificate), outgoing())
    assert (outcome.kind, outcome.code) == ("failed", "553")
    assert outcome.detail is not None and outcome.detail.startswith("MAIL 553")
    assert server.received == []


@pytest.mark.parametrize(
    ("answer", "kind", "code"),
    [
        ("451 4.3.0 Try again later", "retry", "451"),
        ("452 4.3.1 Insufficient system storage", "retry", "452"),
        ("421 4.7.0 Too many messages, closing", "retry", "421"),
        ("554 5.7.1 Message rejected as spam", "failed", "554"),
    ],
)
async def test_an_answer_to_data_is_definite(
    answer: str, kind: str, code: str, certificate: Certificate
) -> None:
    async with server_for("starttls", certificate, Script(data_answers=[answer])) as server:
        settings = settings_for(server, "starttls", certificate)
        outcome = await ADAPTER.send(settings, outgoing())
        assert (outcome.kind, outcome.code) == (kind, code)
        assert outcome.detail == f"DATA {answer}"
        assert server.received == []
        # The server is fine again: the next attempt goes through.
        assert (await ADAPTER.send(settings, outgoing())).kind == "sent"
    assert len(server.received) == 1


async def test_a_malformed_answer_to_data_is_unknown(certificate: Certificate) -> None:
    script = Script(data_answers=["Thanks, got it"])
    async with server_for("starttls", certificate, script) as server:
        outcome = await ADAPTER.send(settings_for(server, "starttls", certificate), outgoing())
    assert (outcome.kind, outcome.code) == ("unknown", None)
    assert outcome.detail is not None and outcome.detail.startswith("DATA -1")


async def test_a_wrong_password_fails_with_535(certificate: Certificate) -> None:
    async with server_for("implicit", certificate) as server:
        settings = settings_for(server, "implicit", certificate, password="wrong-password")
        outcome = await ADAPTER.send(settings, outgoing())
    assert (outcome.kind, outcome.code) == ("failed", "535")
    assert outcome.detail is not None and outcome.detail.startswith("AUTH 535")
    assert server.auth_attempts and not any(a.success for a in server.auth_attempts)
    assert server.received == []


async def test_starttls_never_falls_back_to_plaintext(certificate: Certificate) -> None:
    # The server would take the message, and the password, in clear: nothing is sent.
    async with server_for("plain", certificate) as server:
        outcome = await ADAPTER.send(settings_for(server, "starttls", certificate), outgoing())
    assert (outcome.kind, outcome.code) == ("retry", "starttls_unavailable")
    assert server.connections == 1
    assert server.auth_attempts == []
    assert server.received == []


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_an_untrusted_certificate_is_a_retry(mode: Mode, certificate: Certificate) -> None:
    async with server_for(mode, certificate) as server:
        settings = settings_for(server, TLS_OF_MODE[mode], None)  # the system's CAs only
        outcome = await ADAPTER.send(settings, outgoing())
        assert outcome.kind == "retry", outcome
        assert outcome.detail is not None and "certificate" in outcome.detail.lower()
        assert server.auth_attempts == []
        assert server.received == []
        # Trusting it by other means (verify_tls off) sends it.
        unchecked = settings.model_copy(update={"verify_tls": False})
        assert (await ADAPTER.send(unchecked, outgoing())).kind == "sent"


async def test_no_server_is_a_retry() -> None:
    outcome = await ADAPTER.send(settings_for(free_port(), "none", None), outgoing())
    assert outcome.kind == "retry"
    assert outcome.detail is not None and outcome.detail.startswith("CONNECT")


async def test_a_connection_dropped_after_data_is_unknown(certificate: Certificate) -> None:
    async with server_for("starttls", certificate, Script(after_data=["drop"])) as server:
        outcome = await ADAPTER.send(settings_for(server, "starttls", certificate), outgoing())
    assert outcome.kind == "unknown", outcome
    assert outcome.detail is not None and outcome.detail.startswith("DATA")
    assert len(server.received) == 1  # why it is unknown: the server has the message


async def test_no_answer_to_data_is_unknown(certificate: Certificate) -> None:
    async with server_for("implicit", certificate, Script(after_data=["hang"])) as server:
        settings = settings_for(server, "implicit", certificate, timeout_s=0.5)
        outcome = await ADAPTER.send(settings, outgoing())
    assert outcome.kind == "unknown", outcome
    assert len(server.received) == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"List-Unsubscribe": "<https://x.example/u>\r\nBcc: victim@example.net"},
        {"List-Unsubscribe": "<https://x.example/u>\n"},
        {"Bcc": "victim@example.net"},
        {"Content-Type": "text/html"},
        {"Bad Name": "x"},
    ],
)
async def test_bad_headers_are_refused_before_connecting(
    headers: dict[str, str], certificate: Certificate
) -> None:
    async with server_for("starttls", certificate) as server:
        settings = settings_for(server, "starttls", certificate)
        outcome = await ADAPTER.send(settings, outgoing(headers=headers))
    assert (outcome.kind, outcome.code) == ("failed", "invalid_header")
    assert server.connections == 0


@pytest.mark.parametrize(
    "to", ["not an address", "a@example.org, b@example.org", "x@example.org\r\nBcc: y@z.org"]
)
async def test_a_bad_recipient_is_refused_before_connecting(
    to: str, certificate: Certificate
) -> None:
    async with server_for("starttls", certificate) as server:
        outcome = await ADAPTER.send(settings_for(server, "starttls", certificate), outgoing(to=to))
    assert (outcome.kind, outcome.code) == ("failed", "invalid_recipient")
    assert server.connections == 0


def test_settings() -> None:
    by_alias = SmtpSettings.model_validate(
        {"host": "smtp.example.com", "port": 465, "tls": "implicit", "from": SENDER}
    )
    by_name = SmtpSettings(host="smtp.example.com", port=465, tls="implicit", from_=SENDER)
    assert by_alias == by_name
    assert (by_alias.verify_tls, by_alias.ca_file, by_alias.timeout_s) == (True, None, 15)
    assert by_alias.model_dump(by_alias=True)["from"] == SENDER
    with_auth = by_name.model_copy(update={"username": USER, "password": SecretStr(SMTP_SECRET)})
    assert SMTP_SECRET not in repr(with_auth)
    base = {"host": "h", "port": 25, "tls": "none", "from": "a@b.example"}
    for bad in (
        {"tls": "ssl"},
        {"port": 0},
        {"from": "no address"},
        {"from": "a@b.example, c@d.example"},
        {"username": USER},  # without its password
        {"password": SMTP_SECRET},  # without its user
        {"api_key": "x"},
    ):
        with pytest.raises(ValidationError) as caught:
            SmtpSettings.model_validate(base | bad)
        assert SMTP_SECRET not in str(caught.value)


async def test_no_status_query_and_no_callbacks() -> None:
    adapter = SmtpAdapter()
    assert (adapter.name, adapter.channel, adapter.can_query) == ("smtp", "email", False)
    assert adapter.settings_model is SmtpSettings
    settings = settings_for(25, "none", None)
    assert await adapter.query(settings, outgoing()) is None
    with pytest.raises(CallbackRejected):
        adapter.parse_callback(settings, {}, "https://huitou.example.com/v1/callbacks", b"")

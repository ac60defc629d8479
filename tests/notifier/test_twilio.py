"""The Twilio SMS adapter against a local server that checks requests as Twilio does (basic
auth, account, form fields, numbers) and answers with Twilio's documented bodies; its
callbacks signed by the official SDK's `RequestValidator`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from services.notifier.providers.base import Adapter, CallbackRejected, Outgoing, Receipt
from services.notifier.providers.twilio import (
    ADAPTER,
    CALLBACK_ANSWER,
    CALLBACK_CONTENT_TYPE,
    UNSUBSCRIBED_CODE,
    TwilioAdapter,
    TwilioSettings,
    signature,
)
from tests.notifier.twilio_server import MAGIC_RECIPIENTS, TwilioServer
from tests.servers import free_port

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
SECRET = "twilio-auth-token-for-tests-0001"
"""The account's auth token (a `SECRET*` name: the log hygiene scan looks for it)."""
OTHER_SECRET = "twilio-auth-token-of-someone-else"
NUMBER = "+15017122661"
SERVICE_SID = "MG" + "fedcba9876543210" * 2
TO = "+15558675310"
CALLBACK_URL = "https://hooks.example.com/v1/callbacks/twilio/shop-1?t=tok"
TEXT = "Spring sale: 20% off & free shipping today! Reply STOP to opt out"

_conformance: Adapter = ADAPTER  # mypy checks the adapter against the protocol


def settings_for(
    server: TwilioServer, *, token: str = SECRET, service: bool = False, number: bool = True
) -> TwilioSettings:
    return TwilioSettings(
        account_sid=ACCOUNT_SID,
        auth_token=SecretStr(token),
        from_=NUMBER if number else None,
        messaging_service_sid=SERVICE_SID if service else None,
        endpoint=server.url,
    )


def outgoing(
    text: str = TEXT,
    *,
    to: str = TO,
    callback: str | None = None,
    sent_at: datetime | None = None,
    message_id: str = "msg-1",
) -> Outgoing:
    return Outgoing(
        message_id=message_id,
        shop_id="shop-1",
        channel="sms",
        to=to,
        text=text,
        status_callback=callback,
        sent_at=sent_at or datetime.now(UTC),
    )


@pytest.fixture
async def server() -> AsyncIterator[TwilioServer]:
    async with TwilioServer(
        ACCOUNT_SID, SECRET, numbers={NUMBER}, messaging_services={SERVICE_SID}
    ) as s:
        yield s


@pytest.fixture
async def adapter() -> AsyncIterator[TwilioAdapter]:
    async with httpx.AsyncClient(timeout=1.0) as client:
        yield TwilioAdapter(client)


# Sending


async def test_send_is_accepted_with_basic_auth_and_the_exact_form(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    outcome = await adapter.send(settings_for(server), outgoing(callback=CALLBACK_URL))

    assert outcome.kind == "sent"
    [resource] = server.sent
    assert outcome.provider_message_id == resource["sid"]
    assert resource["status"] == "queued" and resource["body"] == TEXT
    [request] = server.requests
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert request.auth == (ACCOUNT_SID, SECRET)
    assert request.content_type.startswith("application/x-www-form-urlencoded")
    assert request.form == [
        ("To", TO),
        ("From", NUMBER),
        ("Body", TEXT),
        ("StatusCallback", CALLBACK_URL),
    ]


async def test_send_without_callback_through_a_messaging_service(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    settings = settings_for(server, service=True, number=False)
    outcome = await adapter.send(settings, outgoing())

    assert outcome.kind == "sent"
    assert server.sent[0]["status"] == "accepted" and server.sent[0]["from"] is None
    assert server.requests[0].form == [
        ("To", TO),
        ("MessagingServiceSid", SERVICE_SID),
        ("Body", TEXT),
    ]


async def test_send_with_both_a_number_and_a_service_gives_both(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    outcome = await adapter.send(settings_for(server, service=True), outgoing())
    assert outcome.kind == "sent"
    assert dict(server.requests[0].form) == {
        "To": TO,
        "From": NUMBER,
        "MessagingServiceSid": SERVICE_SID,
        "Body": TEXT,
    }


async def test_wrong_token_fails_with_20003(server: TwilioServer, adapter: TwilioAdapter) -> None:
    outcome = await adapter.send(settings_for(server, token=OTHER_SECRET), outgoing())
    assert (outcome.kind, outcome.code, outcome.detail) == ("failed", "20003", "Authenticate")
    assert server.sent == []


async def test_throttled_is_retry(server: TwilioServer, adapter: TwilioAdapter) -> None:
    server.throttle_next()
    outcome = await adapter.send(settings_for(server), outgoing())
    assert (outcome.kind, outcome.code, outcome.throttled) == ("retry", "20429", True)
    assert server.sent == []


@pytest.mark.parametrize(
    ("to", "code"),
    [
        ("+15005550001", "21211"),  # invalid number
        ("+15005550003", "21408"),  # no permission for the region
        ("+15005550009", "21614"),  # not a mobile number
        ("0155586753", "21211"),  # not E.164
    ],
)
async def test_refused_recipient_fails_with_twilios_code(
    server: TwilioServer, adapter: TwilioAdapter, to: str, code: str
) -> None:
    outcome = await adapter.send(settings_for(server), outgoing(to=to))
    assert (outcome.kind, outcome.code) == ("failed", code)
    _, message = MAGIC_RECIPIENTS.get(
        to, (21211, "The 'To' number {to} is not a valid phone number.")
    )
    assert outcome.detail == message.format(to=to)
    assert not outcome.throttled
    assert server.sent == []


async def test_unsubscribed_recipient_fails_with_21610(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    server.unsubscribe(TO)
    outcome = await adapter.send(settings_for(server), outgoing())
    assert outcome.kind == "failed"
    assert outcome.code == UNSUBSCRIBED_CODE == "21610"
    assert outcome.detail == "Attempt to send to unsubscribed recipient"


@pytest.mark.parametrize("status", [500, 503])
async def test_server_error_is_retry_and_the_next_send_goes_through(
    server: TwilioServer, adapter: TwilioAdapter, status: int
) -> None:
    server.fail_next(1, status=status)
    first = await adapter.send(settings_for(server), outgoing())
    assert (first.kind, first.code, first.throttled) == ("retry", str(20000 + status), False)
    assert server.sent == []

    second = await adapter.send(settings_for(server), outgoing())
    assert second.kind == "sent" and len(server.sent) == 1


async def test_gateway_timeout_is_unknown(server: TwilioServer, adapter: TwilioAdapter) -> None:
    """A 504 is a gateway that gave up waiting for Twilio, which may have taken the message."""
    server.fail_next(1, status=504)
    outcome = await adapter.send(settings_for(server), outgoing())
    assert (outcome.kind, outcome.code) == ("unknown", "20504")


async def test_full_sender_queue_is_throttled(adapter: TwilioAdapter) -> None:
    async with TwilioServer(ACCOUNT_SID, SECRET, numbers={"+15005550008"}) as server:
        settings = settings_for(server).model_copy(update={"from_": "+15005550008"})
        outcome = await adapter.send(settings, outgoing())
        assert (outcome.kind, outcome.code, outcome.throttled) == ("retry", "21611", True)


async def test_nothing_listening_is_retry(adapter: TwilioAdapter) -> None:
    settings = TwilioSettings(
        account_sid=ACCOUNT_SID,
        auth_token=SecretStr(SECRET),
        from_=NUMBER,
        endpoint=f"http://127.0.0.1:{free_port()}",
    )
    outcome = await adapter.send(settings, outgoing())
    assert outcome.kind == "retry"
    assert outcome.detail == "not sent: ConnectError"


async def test_read_timeout_after_acceptance_is_unknown_then_query_finds_it_sent(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    settings = settings_for(server)
    message = outgoing()
    server.delay_next(1, seconds=5)

    outcome = await adapter.send(settings, message)
    assert outcome.kind == "unknown"
    assert outcome.detail == "no answer: ReadTimeout"

    [resource] = server.sent  # Twilio has it, still queued (no date_sent yet)
    assert resource["date_sent"] is None
    found = await adapter.query(settings, message)
    assert found is not None
    assert (found.kind, found.provider_message_id) == ("sent", resource["sid"])
    listing = server.requests[-1]
    assert listing.method == "GET" and listing.auth == (ACCOUNT_SID, SECRET)
    assert dict(listing.query) == {"To": TO, "From": NUMBER, "PageSize": "1000"}


async def test_dropped_connection_after_acceptance_is_unknown_then_query_finds_it(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    settings = settings_for(server, service=True, number=False)
    message = outgoing()
    server.drop_next()

    outcome = await adapter.send(settings, message)
    assert outcome.kind == "unknown"
    assert outcome.detail == "no answer: RemoteProtocolError"

    found = await adapter.query(settings, message)
    assert found is not None and found.kind == "sent"
    assert found.provider_message_id == server.sent[0]["sid"]
    assert dict(server.requests[-1].query) == {"To": TO, "PageSize": "1000"}


# Reconciliation


async def test_query_for_a_message_never_sent_is_none(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    settings = settings_for(server)
    assert await adapter.query(settings, outgoing()) is None

    # Other messages to the number, or this text to another number, are not it.
    assert (await adapter.send(settings, outgoing("Another text"))).kind == "sent"
    assert (await adapter.send(settings, outgoing(to="+15558675311"))).kind == "sent"
    assert await adapter.query(settings, outgoing()) is None


async def test_query_ignores_an_identical_message_sent_before_the_attempt(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    settings = settings_for(server)
    assert (await adapter.send(settings, outgoing())).kind == "sent"

    later = outgoing(sent_at=datetime.now(UTC) + timedelta(minutes=10), message_id="msg-2")
    assert await adapter.query(settings, later) is None
    # Within the clock-skew allowance, it is the attempt.
    close = outgoing(sent_at=datetime.now(UTC) + timedelta(seconds=30), message_id="msg-2")
    found = await adapter.query(settings, close)
    assert found is not None and found.kind == "sent"


async def test_query_reports_a_failed_message_with_its_error_code(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    settings = settings_for(server)
    message = outgoing()
    sent = await adapter.send(settings, message)
    assert sent.provider_message_id is not None
    server.set_status(
        sent.provider_message_id,
        "undelivered",
        error_code=30003,
        error_message="Unreachable destination handset",
    )

    found = await adapter.query(settings, message)
    assert found is not None
    assert (found.kind, found.code, found.detail) == (
        "failed",
        "30003",
        "Unreachable destination handset",
    )
    assert found.provider_message_id == sent.provider_message_id

    fetched = await adapter.fetch(settings, sent.provider_message_id)
    assert fetched == found


async def test_query_follows_pages(adapter: TwilioAdapter) -> None:
    async with TwilioServer(ACCOUNT_SID, SECRET, numbers={NUMBER}, max_page_size=2) as server:
        settings = settings_for(server)
        first = outgoing("The first one")
        sent = await adapter.send(settings, first)
        for n in range(4):
            assert (await adapter.send(settings, outgoing(f"Number {n}"))).kind == "sent"
        for resource in server.sent:
            server.set_status(resource["sid"], "delivered")

        found = await adapter.query(settings, first)
        assert found is not None
        assert (found.kind, found.provider_message_id) == ("sent", sent.provider_message_id)
        pages = [dict(r.query).get("Page", "0") for r in server.requests if r.method == "GET"]
        assert pages == ["0", "1", "2"]


async def test_query_when_twilio_cannot_be_asked_is_still_unknown(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    wrong = settings_for(server, token=OTHER_SECRET)
    outcome = await adapter.query(wrong, outgoing())
    assert outcome is not None
    assert (outcome.kind, outcome.code) == ("unknown", "20003")


async def test_fetch_by_sid(server: TwilioServer, adapter: TwilioAdapter) -> None:
    settings = settings_for(server)
    sent = await adapter.send(settings, outgoing())
    assert sent.provider_message_id is not None
    fetched = await adapter.fetch(settings, sent.provider_message_id)
    assert fetched is not None and fetched.kind == "sent"
    assert await adapter.fetch(settings, "SM" + "0" * 32) is None


# Callbacks


async def test_status_callbacks_signed_by_the_official_validator(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    settings = settings_for(server)
    sent = await adapter.send(settings, outgoing(callback=CALLBACK_URL))
    sid = sent.provider_message_id
    assert sid is not None

    headers, url, body = server.status_callback(sid, "delivered")
    assert url == CALLBACK_URL
    assert adapter.parse_callback(settings, headers, url, body) == [
        Receipt("delivered", provider_message_id=sid, address=TO)
    ]

    headers, url, body = server.status_callback(sid, "undelivered", error_code=30003)
    assert adapter.parse_callback(settings, headers, url, body) == [
        Receipt("failed", provider_message_id=sid, address=TO, code="30003", detail="undelivered")
    ]

    for intermediate in ("queued", "sending", "sent"):
        headers, url, body = server.status_callback(sid, intermediate)
        assert adapter.parse_callback(settings, headers, url, body) == []


async def test_inbound_stop_is_an_opt_out_and_other_texts_replies(
    server: TwilioServer, adapter: TwilioAdapter
) -> None:
    settings = settings_for(server)
    sender = "+15558675399"

    headers, url, body = server.inbound(CALLBACK_URL, sender, "Stop", opt_out_type="STOP")
    [receipt] = adapter.parse_callback(settings, headers, url, body)
    assert (receipt.kind, receipt.address, receipt.text, receipt.code) == (
        "opt_out",
        sender,
        "Stop",
        "STOP",
    )
    assert receipt.provider_message_id and receipt.provider_message_id.startswith("SM")

    headers, url, body = server.inbound(CALLBACK_URL, sender, "Is the sale on Sunday too?")
    [receipt] = adapter.parse_callback(settings, headers, url, body)
    assert (receipt.kind, receipt.address, receipt.text, receipt.code) == (
        "reply",
        sender,
        "Is the sale on Sunday too?",
        None,
    )

    headers, url, body = server.inbound(CALLBACK_URL, sender, "start", opt_out_type="START")
    [receipt] = adapter.parse_callback(settings, headers, url, body)
    assert (receipt.kind, receipt.code) == ("reply", "START")

    # Without Advanced Opt-Out, Twilio's default keywords still opt the number out.
    headers, url, body = server.inbound(CALLBACK_URL, sender, " unsubscribe ")
    [receipt] = adapter.parse_callback(settings, headers, url, body)
    assert (receipt.kind, receipt.code) == ("opt_out", "STOP")


async def test_tampered_or_unsigned_callbacks_are_rejected(server: TwilioServer) -> None:
    settings = settings_for(server)
    params = server.inbound_params("+15558675399", "STOP", opt_out_type="STOP")
    headers, body = server.callback_request(CALLBACK_URL, params)
    assert ADAPTER.parse_callback(settings, headers, CALLBACK_URL, body)  # the genuine one

    forged = dict(params, From="+15558675398")
    cases = {
        "a changed parameter": (headers, CALLBACK_URL, urlencode(forged).encode()),
        "an added parameter": (headers, CALLBACK_URL, body + b"&Extra=1"),
        "another URL": (headers, CALLBACK_URL.replace("shop-1", "shop-2"), body),
        "no signature": (
            {k: v for k, v in headers.items() if k != "X-Twilio-Signature"},
            CALLBACK_URL,
            body,
        ),
        "another token": (
            {
                **headers,
                "X-Twilio-Signature": RequestValidator(OTHER_SECRET).compute_signature(
                    CALLBACK_URL, params
                ),
            },
            CALLBACK_URL,
            body,
        ),
        "a shared-key signature": (
            {**headers, "X-Twilio-Webhooks-Signature-Settings": "key=k,algorithm=HMAC_SHA256"},
            CALLBACK_URL,
            body,
        ),
        "not a form": (headers, CALLBACK_URL, b"\xff\xfe"),
    }
    for name, (h, url, raw) in cases.items():
        with pytest.raises(CallbackRejected):
            ADAPTER.parse_callback(settings, h, url, raw)
            pytest.fail(f"accepted {name}")


async def test_callback_of_another_account_is_rejected(server: TwilioServer) -> None:
    settings = settings_for(server)
    params = server.inbound_params("+15558675399", "hello")
    params["AccountSid"] = "AC" + "1" * 32
    headers, body = server.callback_request(CALLBACK_URL, params)  # signed with our token
    with pytest.raises(CallbackRejected):
        ADAPTER.parse_callback(settings, headers, CALLBACK_URL, body)


async def test_signature_with_or_without_the_default_port(server: TwilioServer) -> None:
    """Twilio's validators accept the URL with its default port added or its port removed
    (Twilio's signing is not consistent about it); so does the adapter."""
    settings = settings_for(server)
    params = server.inbound_params("+15558675399", "hello")
    headers, body = server.callback_request("https://hooks.example.com/cb", params)
    [receipt] = ADAPTER.parse_callback(settings, headers, "https://hooks.example.com:443/cb", body)
    assert receipt.kind == "reply"
    headers, body = server.callback_request("https://hooks.example.com:443/cb", params)
    [receipt] = ADAPTER.parse_callback(settings, headers, "https://hooks.example.com/cb", body)
    assert receipt.kind == "reply"


def test_callback_answer_is_empty_twiml() -> None:
    assert CALLBACK_ANSWER == '<?xml version="1.0" encoding="UTF-8"?><Response/>'
    assert CALLBACK_CONTENT_TYPE == "text/xml"


_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    extra=st.dictionaries(_names, st.text(max_size=30), max_size=8),
    query=st.text(st.characters(min_codepoint=0x30, max_codepoint=0x7A), max_size=10),
)
def test_signature_matches_the_official_validator(extra: dict[str, str], query: str) -> None:
    """Any parameters (blank values, unicode, `&`/`=`/`+` in names and values) and any URL
    query: the adapter accepts what the official SDK signs, and computes the same value."""
    params = {**extra, "MessageStatus": "sent", "AccountSid": ACCOUNT_SID}
    url = f"https://hooks.example.com/v1/callbacks/twilio/shop-1?t={query}"
    official = RequestValidator(SECRET).compute_signature(url, params)
    assert signature(SECRET, url, list(params.items())) == official
    body = urlencode(params).encode()
    assert parse_qsl(body.decode(), keep_blank_values=True) == list(params.items())
    settings_ = TwilioSettings(account_sid=ACCOUNT_SID, auth_token=SecretStr(SECRET), from_=NUMBER)
    headers = {"x-twilio-signature": official}
    assert ADAPTER.parse_callback(settings_, headers, url, body) == []


# Settings


def test_settings() -> None:
    s = TwilioSettings.model_validate(
        {
            "account_sid": ACCOUNT_SID,
            "auth_token": SECRET,
            "from": NUMBER,
            "endpoint": "https://api.twilio.com/",
        }
    )
    assert s.from_ == NUMBER and s.endpoint == "https://api.twilio.com"
    assert SECRET not in repr(s)
    base = {"account_sid": ACCOUNT_SID, "auth_token": SECRET}
    for bad in (
        base,  # neither a number nor a service
        {**base, "from": "15017122661"},  # not E.164
        {**base, "from": NUMBER, "extra": 1},
        {**base, "account_sid": "AC123", "from": NUMBER},
        {**base, "messaging_service_sid": "MG1"},
        {**base, "from": NUMBER, "endpoint": "ftp://api.twilio.com"},
    ):
        with pytest.raises(ValidationError):
            TwilioSettings.model_validate(bad)
    assert TwilioSettings.model_validate({**base, "messaging_service_sid": SERVICE_SID})

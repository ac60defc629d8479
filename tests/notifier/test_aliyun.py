"""The Aliyun SMS adapter against a local server that checks requests as Aliyun does
(signature by the official SDK's signer, common parameters, timestamp, nonce) and answers
with Aliyun's documented bodies."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from services.notifier.providers.aliyun import (
    ADAPTER,
    CALLBACK_ANSWER,
    AliyunAdapter,
    AliyunSettings,
    send_dates,
    sign,
    signed_form,
)
from services.notifier.providers.base import (
    Adapter,
    CallbackRejected,
    Outgoing,
    ProviderTemplate,
    Receipt,
)
from tests.notifier.aliyun_server import AliyunServer
from tests.servers import free_port

KEY_ID = "LTAI5tTestKeyId"
SECRET = "test-secret-of-the-key"
SIGN_NAME = "惠投"
TEMPLATES = {
    "SMS_200000001": "您好${name}，您的订单${order}已发货",
    "SMS_200000002": "欢迎回来",
}
PARAMS = {"name": "Li Lei*~+/", "order": "A&B=C 100%"}
"""Characters the signature's encoding must get right: space, `*`, `~`, `+`, `/`, `&`,
`=`, `%`, and the sign name's UTF-8."""

PUSH_SETTINGS = AliyunSettings(access_key_id="id", access_key_secret=SecretStr("s"), sign_name="x")

_conformance: Adapter = ADAPTER  # mypy checks the adapter against the protocol


def settings_for(
    server: AliyunServer, *, secret: str = SECRET, key_id: str = KEY_ID
) -> AliyunSettings:
    return AliyunSettings(
        access_key_id=key_id,
        access_key_secret=SecretStr(secret),
        sign_name=SIGN_NAME,
        endpoint=server.url,
    )


def message(
    to: str = "+8613800138000",
    *,
    template: str = "SMS_200000001",
    params: dict[str, str] | None = None,
) -> Outgoing:
    return Outgoing(
        message_id=f"msg-{uuid.uuid4()}",
        shop_id="shop-1",
        channel="sms",
        to=to,
        text="rendered text (unused by Aliyun)",
        template=ProviderTemplate(template, PARAMS if params is None else params),
        sent_at=datetime.now(UTC),
    )


@pytest.fixture
async def server() -> AsyncIterator[AliyunServer]:
    async with AliyunServer(KEY_ID, SECRET, templates=TEMPLATES, sign_names=[SIGN_NAME]) as s:
        yield s


@pytest.fixture
async def adapter() -> AsyncIterator[AliyunAdapter]:
    async with httpx.AsyncClient(timeout=2.0) as client:
        yield AliyunAdapter(client)


# --- Signing ---------------------------------------------------------------------------


def test_signature_of_aliyuns_documented_example() -> None:
    """The worked example of Aliyun's "请求签名" document (a GET), to the byte."""
    params = {
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
        "AccessKeyId": "testId",
        "SignatureVersion": "1.0",
        "Timestamp": "2017-07-12T02:42:19Z",
        "Format": "XML",
        "Action": "SendSms",
        "Version": "2017-05-25",
        "RegionId": "cn-hangzhou",
        "PhoneNumbers": "15300000001",
        "SignName": "阿里云短信测试专用",
        "TemplateParam": '{"customer":"test"}',
        "TemplateCode": "SMS_71390007",
        "OutId": "123",
    }
    assert sign("GET", params, "testSecret") == "zJDF+Lrzhj/ThnlvIToysFRq6t4="


# --- Send ------------------------------------------------------------------------------


async def test_send_is_accepted_with_aliyuns_fields(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    msg = message()
    outcome = await adapter.send(settings_for(server), msg)

    assert outcome.kind == "sent", outcome
    [record] = server.sent
    assert outcome.provider_message_id == record.biz_id
    p = record.params
    assert p["Action"] == "SendSms"
    assert p["Version"] == "2017-05-25"
    assert p["Format"] == "JSON"
    assert p["RegionId"] == "cn-hangzhou"
    assert p["SignatureMethod"] == "HMAC-SHA1"
    assert p["SignatureVersion"] == "1.0"
    assert p["PhoneNumbers"] == "13800138000"  # mainland: the national number
    assert p["SignName"] == SIGN_NAME
    assert p["TemplateCode"] == "SMS_200000001"
    assert json.loads(p["TemplateParam"]) == PARAMS
    assert p["OutId"] == msg.message_id
    assert record.content == f"【{SIGN_NAME}】您好Li Lei*~+/，您的订单A&B=C 100%已发货"


async def test_international_numbers_are_sent_without_plus(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    outcome = await adapter.send(settings_for(server), message("+85291234567"))
    assert outcome.kind == "sent", outcome
    assert server.sent[0].phone == "85291234567"


async def test_each_attempt_is_signed_with_a_new_nonce(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    msg = message(template="SMS_200000002", params={})
    first = await adapter.send(settings_for(server), msg)
    second = await adapter.send(settings_for(server), msg)
    assert (first.kind, second.kind) == ("sent", "sent")
    assert "TemplateParam" not in server.sent[0].params
    assert server.sent[0].params["SignatureNonce"] != server.sent[1].params["SignatureNonce"]


async def test_a_wrong_secret_fails_with_signature_does_not_match(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    outcome = await adapter.send(settings_for(server, secret="not-the-secret"), message())
    assert outcome.kind == "failed"
    assert outcome.code == "SignatureDoesNotMatch"
    assert outcome.detail and outcome.detail.startswith("Specified signature is not matched")
    assert server.sent == []


async def test_an_unknown_access_key_fails(server: AliyunServer, adapter: AliyunAdapter) -> None:
    outcome = await adapter.send(settings_for(server, key_id="LTAI-unknown"), message())
    assert (outcome.kind, outcome.code) == ("failed", "InvalidAccessKeyId.NotFound")


async def test_throttling_is_a_throttled_retry(adapter: AliyunAdapter) -> None:
    async with AliyunServer(KEY_ID, SECRET, templates=TEMPLATES, per_minute_limit=1) as server:
        first = await adapter.send(settings_for(server), message())
        second = await adapter.send(settings_for(server), message())
    assert first.kind == "sent"
    assert second.kind == "retry"
    assert second.throttled
    assert second.code == "isv.BUSINESS_LIMIT_CONTROL"


@pytest.mark.parametrize(
    ("to", "template", "params", "code"),
    [
        ("+8613800138000", "SMS_404", PARAMS, "isv.SMS_TEMPLATE_ILLEGAL"),
        ("+8613800138000", "SMS_200000001", {"name": "x"}, "isv.TEMPLATE_MISSING_PARAMETERS"),
        ("+861380013", "SMS_200000001", PARAMS, "isv.MOBILE_NUMBER_ILLEGAL"),
    ],
)
async def test_refusals_fail_with_aliyuns_code(
    server: AliyunServer,
    adapter: AliyunAdapter,
    to: str,
    template: str,
    params: dict[str, str],
    code: str,
) -> None:
    outcome = await adapter.send(
        settings_for(server), message(to, template=template, params=params)
    )
    assert outcome.kind == "failed"
    assert outcome.code == code
    assert outcome.detail  # Aliyun's Message
    assert server.sent == []


async def test_a_wrong_sign_name_fails(server: AliyunServer, adapter: AliyunAdapter) -> None:
    settings = settings_for(server).model_copy(update={"sign_name": "别人的签名"})
    outcome = await adapter.send(settings, message())
    assert (outcome.kind, outcome.code) == ("failed", "isv.SMS_SIGNATURE_ILLEGAL")


async def test_without_a_named_template_nothing_is_sent(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    bare = Outgoing("m1", "shop-1", "sms", "+8613800138000", "hello")
    listed = Outgoing(
        "m2",
        "shop-1",
        "sms",
        "+8613800138000",
        "hello",
        template=ProviderTemplate("SMS_200000001", ["a", "b"]),
    )
    assert (await adapter.send(settings_for(server), bare)).kind == "failed"
    assert (await adapter.send(settings_for(server), listed)).kind == "failed"
    assert server.requests == []


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_retries(
    server: AliyunServer, adapter: AliyunAdapter, status: int
) -> None:
    server.fail_next(1, status=status)
    outcome = await adapter.send(settings_for(server), message())
    assert outcome.kind == "retry"
    assert not outcome.throttled
    assert server.sent == []
    assert (await adapter.send(settings_for(server), message())).kind == "sent"


async def test_no_connection_is_a_retry(adapter: AliyunAdapter) -> None:
    settings = AliyunSettings(
        access_key_id=KEY_ID,
        access_key_secret=SecretStr(SECRET),
        sign_name=SIGN_NAME,
        endpoint=f"http://127.0.0.1:{free_port()}",
    )
    outcome = await adapter.send(settings, message())
    assert (outcome.kind, outcome.code) == ("retry", "ConnectError")


async def test_a_late_answer_is_unknown_and_query_finds_the_send(server: AliyunServer) -> None:
    msg = message()
    async with httpx.AsyncClient(timeout=0.5) as client:
        adapter = AliyunAdapter(client)
        server.delay_next(3.0)
        outcome = await adapter.send(settings_for(server), msg)
        assert (outcome.kind, outcome.code) == ("unknown", "ReadTimeout")
        assert len(server.sent) == 1  # Aliyun has it

        found = await adapter.query(settings_for(server), msg)
    assert found is not None
    assert found.kind == "sent"


async def test_a_dropped_connection_is_unknown_and_query_finds_the_send(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    msg = message()
    server.drop_next()
    outcome = await adapter.send(settings_for(server), msg)
    assert (outcome.kind, outcome.code) == ("unknown", "RemoteProtocolError")
    found = await adapter.query(settings_for(server), msg, biz_id=server.sent[0].biz_id)
    assert found is not None
    assert (found.kind, found.provider_message_id) == ("sent", server.sent[0].biz_id)


async def test_query_of_a_message_aliyun_never_saw_is_none(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    await adapter.send(settings_for(server), message())  # another message to the same number
    assert await adapter.query(settings_for(server), message()) is None
    assert server.requests[-1]["Action"] == "QuerySendDetails"


async def test_query_reports_a_failed_delivery(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    msg = message()
    sent = await adapter.send(settings_for(server), msg)
    assert sent.provider_message_id is not None
    server.report(sent.provider_message_id, success=False, err_code="MK:0001")
    found = await adapter.query(settings_for(server), msg)
    assert found is not None
    assert (found.kind, found.code) == ("failed", "MK:0001")

    server.report(sent.provider_message_id, success=True)
    delivered = await adapter.query(settings_for(server), msg)
    assert delivered is not None and delivered.kind == "sent"


async def test_query_pages_through_a_busy_number(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    first = message(template="SMS_200000002", params={})
    await adapter.send(settings_for(server), first)
    for _ in range(60):  # newer sends to the same number push it to the second page
        await adapter.send(settings_for(server), message(template="SMS_200000002", params={}))
    found = await adapter.query(settings_for(server), first)
    assert found is not None and found.kind == "sent"
    # Its day's second page was asked for (in the quarter hour before midnight in China the
    # next day is asked about too, after it: hence not simply the last request).
    pages = [
        (r["SendDate"], r["CurrentPage"])
        for r in server.requests
        if r.get("Action") == "QuerySendDetails"
    ]
    assert first.sent_at is not None
    sent_day = first.sent_at.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y%m%d")
    assert (sent_day, "2") in pages, pages


async def test_a_failed_query_is_unknown_not_none(
    server: AliyunServer, adapter: AliyunAdapter
) -> None:
    """None would let the notifier send again; a status API that cannot answer is no proof
    that Aliyun never had the message."""
    msg = message()
    await adapter.send(settings_for(server), msg)
    server.fail_next(1, status=503)
    outcome = await adapter.query(settings_for(server), msg)
    assert outcome is not None
    assert (outcome.kind, outcome.code) == ("unknown", "ServiceUnavailable")


def test_send_dates_are_china_days() -> None:
    assert send_dates(datetime(2024, 5, 1, 17, 0, tzinfo=UTC)) == [date(2024, 5, 2)]
    # 23:55 in China: the request may land after midnight
    assert send_dates(datetime(2024, 5, 1, 15, 55, tzinfo=UTC)) == [
        date(2024, 5, 1),
        date(2024, 5, 2),
    ]


# --- The test server's own checks ------------------------------------------------------


async def test_the_server_refuses_replays_and_stale_timestamps(server: AliyunServer) -> None:
    settings = settings_for(server)
    params = {"PhoneNumbers": "13800138000", "SignName": SIGN_NAME, "TemplateCode": "SMS_200000002"}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with httpx.AsyncClient(base_url=server.url) as client:
        body = signed_form(settings, "SendSms", params)
        assert (await client.post("/", content=body, headers=headers)).json()["Code"] == "OK"
        replay = (await client.post("/", content=body, headers=headers)).json()
        assert replay["Code"] == "SignatureNonceUsed"

        stale = signed_form(settings, "SendSms", params, now=datetime(2020, 1, 1, tzinfo=UTC))
        answer = await client.post("/", content=stale, headers=headers)
        assert (answer.status_code, answer.json()["Code"]) == (400, "InvalidTimeStamp.Expired")
    assert len(server.sent) == 1


# --- Callbacks -------------------------------------------------------------------------


def test_a_delivery_report_push() -> None:
    """Aliyun's published SmsReport sample, plus a failed one."""
    body = json.dumps(
        [
            {
                "phone_number": "13900000001",
                "send_time": "2017-01-01 00:00:00",
                "report_time": "2017-01-01 00:00:00",
                "success": True,
                "err_code": "DELIVERED",
                "err_msg": "用户接收成功",
                "sms_size": "1",
                "biz_id": "12345",
                "out_id": "67890",
            },
            {
                "phone_number": "13900000002",
                "send_time": "2017-01-01 00:00:00",
                "report_time": "2017-01-01 00:00:05",
                "success": False,
                "err_code": "MK:0001",
                "err_msg": "用户接收失败",
                "sms_size": "1",
                "biz_id": "12346",
                "out_id": "",
            },
        ],
        ensure_ascii=False,
    ).encode()
    delivered, failed = ADAPTER.parse_callback(PUSH_SETTINGS, {}, "https://h/cb", body)
    assert delivered == Receipt(
        "delivered",
        provider_message_id="12345",
        message_id="67890",
        address="+8613900000001",
        code="DELIVERED",
        detail="用户接收成功",
        at=datetime(2016, 12, 31, 16, 0, tzinfo=UTC),
    )
    assert (failed.kind, failed.code, failed.message_id) == ("failed", "MK:0001", None)


def test_a_reply_push() -> None:
    """Aliyun's published SmsUp sample."""
    body = json.dumps(
        [
            {
                "phone_number": "18612345678",
                "send_time": "2017-09-01 00:00:00",
                "content": "内容",
                "sign_name": "签名",
                "dest_code": "1234",
                "sequence_id": 1234567890,
            }
        ],
        ensure_ascii=False,
    ).encode()
    [reply] = ADAPTER.parse_callback(PUSH_SETTINGS, {}, "https://h/cb", body)
    assert (reply.kind, reply.address, reply.text) == ("reply", "+8618612345678", "内容")
    assert CALLBACK_ANSWER == {"code": 0, "msg": "成功"}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"phone_number": "13900000001"}',
        b"[1]",
        b'[{"phone_number": "13900000001"}]',
        b'[{"phone_number": "13900000001", "success": "true", "biz_id": "1"}]',
        b'[{"success": true, "biz_id": "1"}]',
        b'[{"phone_number": "18612345678", "content": 5}]',
    ],
)
def test_pushes_of_the_wrong_shape_are_rejected(body: bytes) -> None:
    with pytest.raises(CallbackRejected):
        ADAPTER.parse_callback(PUSH_SETTINGS, {}, "https://h/cb", body)


def test_an_empty_push_has_no_receipts() -> None:
    assert ADAPTER.parse_callback(PUSH_SETTINGS, {}, "https://h/cb", b"[]") == []


# --- Settings --------------------------------------------------------------------------


def test_settings_forbid_unknown_fields_and_hide_the_secret() -> None:
    settings = AliyunSettings(access_key_id="id", access_key_secret=SecretStr("s3"), sign_name="x")
    assert settings.endpoint == "https://dysmsapi.aliyuncs.com"
    assert settings.region == "cn-hangzhou"
    assert "s3" not in repr(settings)
    with pytest.raises(ValidationError):
        AliyunSettings.model_validate(
            {"access_key_id": "id", "access_key_secret": "s", "sign_name": "x", "extra": 1}
        )

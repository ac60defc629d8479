"""The Tencent Cloud SMS adapter against a local Tencent (`tencent_server.TencentServer`),
which checks each request's TC3 signature with the official SDK's signer."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from tencentcloud.common.abstract_client_async import (  # type: ignore[import-untyped]
    AbstractClient,
)

from services.notifier.providers.base import (
    CallbackRejected,
    Outcome,
    OutcomeKind,
    Outgoing,
    ProviderTemplate,
    Receipt,
)
from services.notifier.providers.tencent import (
    ADAPTER,
    CALLBACK_ANSWER,
    TencentAdapter,
    TencentSettings,
    tc3_authorization,
)
from tests.notifier.tencent_server import TencentServer
from tests.servers import free_port

SECRET_ID = "AKIDhuitouTEST0000000000000000000000"
SECRET_KEY = "huitouTESTsecretKEY0000000000000"
APP_ID = "1400006666"
SIGN_NAME = "惠投科技"
PHONE = "+8613800138000"


@pytest.fixture
async def server() -> AsyncIterator[TencentServer]:
    async with TencentServer(SECRET_ID, SECRET_KEY, APP_ID, sign_names=(SIGN_NAME,)) as s:
        yield s


@pytest.fixture
async def adapter() -> AsyncIterator[TencentAdapter]:
    async with httpx.AsyncClient(timeout=2.0) as client:
        yield TencentAdapter(client)


def settings_for(server: TencentServer, **changes: Any) -> TencentSettings:
    values: dict[str, Any] = {
        "secret_id": SECRET_ID,
        "secret_key": SECRET_KEY,
        "sdk_app_id": APP_ID,
        "sign_name": SIGN_NAME,
        "endpoint": server.url,
    }
    return TencentSettings(**(values | changes))


def outgoing(to: str = PHONE, template: str = "1110", params: Any = ("4370", "5分钟")) -> Outgoing:
    return Outgoing(
        message_id=f"msg-{uuid.uuid4().hex}",
        shop_id="shop-1",
        channel="sms",
        to=to,
        text="您的验证码是4370，5分钟内有效。",
        template=ProviderTemplate(template, params),
        sent_at=datetime.now(UTC),
    )


# --- the signer ---------------------------------------------------------------------------

# Tencent's worked example in "签名方法 v3" (CVM DescribeInstances, its example keys).
EXAMPLE_PAYLOAD = (
    b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
)
EXAMPLE_AUTHORIZATION = (
    "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/cvm/"
    "tc3_request, SignedHeaders=content-type;host, "
    "Signature=72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
)


def test_signer_reproduces_tencents_worked_example() -> None:
    authorization = tc3_authorization(
        "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE",
        "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
        host="cvm.tencentcloudapi.com",
        timestamp=1551113065,
        payload=EXAMPLE_PAYLOAD,
        service="cvm",
    )
    assert authorization == EXAMPLE_AUTHORIZATION


def test_the_servers_oracle_reproduces_the_worked_example_too() -> None:
    signature = AbstractClient._get_tc3_signature(
        "POST",
        "/",
        "",
        EXAMPLE_PAYLOAD,
        {
            "Content-Type": "application/json; charset=utf-8",
            "Host": "cvm.tencentcloudapi.com",
            "X-TC-Timestamp": "1551113065",
        },
        "2019-02-25",
        "cvm",
        "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
        {},
    )
    assert EXAMPLE_AUTHORIZATION.endswith(f"Signature={signature}")


# --- sending ------------------------------------------------------------------------------


async def test_send_is_signed_and_carries_the_message(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    message = outgoing()
    before = int(time.time())

    outcome = await adapter.send(settings_for(server), message)

    assert len(server.sent) == 1
    assert outcome == Outcome("sent", provider_message_id=server.sent[0].serial_no)
    [call] = server.calls
    assert call.answer == "Ok"
    assert call.json() == {
        "PhoneNumberSet": [PHONE],
        "SmsSdkAppId": APP_ID,
        "SignName": SIGN_NAME,
        "TemplateId": "1110",
        "TemplateParamSet": ["4370", "5分钟"],
        "SessionContext": message.message_id,
    }
    headers = call.headers
    timestamp = int(headers["x-tc-timestamp"])
    assert before <= timestamp <= time.time()
    date = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
    assert headers["authorization"].startswith(
        f"TC3-HMAC-SHA256 Credential={SECRET_ID}/{date}/sms/tc3_request, "
        "SignedHeaders=content-type;host, Signature="
    )
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["host"] == server.host
    assert headers["x-tc-action"] == "SendSms"
    assert headers["x-tc-version"] == "2021-01-11"
    assert headers["x-tc-region"] == "ap-guangzhou"


async def test_template_parameters_keep_their_order(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    outcome = await adapter.send(settings_for(server), outgoing(params=["5分钟", "4370"]))
    assert outcome.kind == "sent"
    assert server.sent[0].params == ["5分钟", "4370"]


async def test_a_template_without_parameters(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    outcome = await adapter.send(settings_for(server), outgoing(template="2220", params=[]))
    assert outcome.kind == "sent"
    assert server.calls[0].json()["TemplateParamSet"] == []


async def test_wrong_secret_key_fails_on_the_signature(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    settings = settings_for(server, secret_key="not-the-key")
    outcome = await adapter.send(settings, outgoing())
    assert outcome.kind == "failed"
    assert outcome.code == "AuthFailure.SignatureFailure"
    assert outcome.detail and "credentials could not be validated" in outcome.detail
    assert server.sent == []


async def test_unknown_secret_id_fails(server: TencentServer, adapter: TencentAdapter) -> None:
    outcome = await adapter.send(settings_for(server, secret_id="AKIDunknown"), outgoing())
    assert (outcome.kind, outcome.code) == ("failed", "AuthFailure.SecretIdNotFound")


async def test_a_clock_off_by_ten_minutes_is_retried(server: TencentServer) -> None:
    async with httpx.AsyncClient(timeout=2.0) as client:
        late = TencentAdapter(client, clock=lambda: time.time() - 600)
        outcome = await late.send(settings_for(server), outgoing())
    assert (outcome.kind, outcome.code) == ("retry", "AuthFailure.SignatureExpire")
    assert server.sent == []


@pytest.mark.parametrize(
    ("code", "kind", "throttled"),
    [
        ("RequestLimitExceeded", "retry", True),
        ("RequestLimitExceeded.UinLimitExceeded", "retry", True),
        ("LimitExceeded.AppDailyLimit", "retry", True),
        ("InternalError.Timeout", "retry", False),
        ("InternalError", "retry", False),
        ("FailedOperation.InsufficientBalanceInSmsPackage", "failed", False),
        ("UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber", "failed", False),
        ("LimitExceeded.PhoneNumberCountLimit", "failed", False),
    ],
)
async def test_request_level_errors(
    server: TencentServer, adapter: TencentAdapter, code: str, kind: OutcomeKind, throttled: bool
) -> None:
    server.error_next(code, "from the test")
    outcome = await adapter.send(settings_for(server), outgoing())
    assert outcome == Outcome(kind, code=code, detail="from the test", throttled=throttled)
    assert server.sent == []


async def test_same_content_to_a_number_within_30s_is_throttled(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    settings = settings_for(server)
    first = await adapter.send(settings, outgoing())
    second = await adapter.send(settings, outgoing())
    assert first.kind == "sent"
    assert second.kind == "retry" and second.throttled
    assert second.code == "LimitExceeded.PhoneNumberThirtySecondLimit"
    assert len(server.sent) == 1


@pytest.mark.parametrize(
    ("message", "sign_name", "code"),
    [
        (outgoing(template="9999"), SIGN_NAME, "FailedOperation.TemplateIncorrectOrUnapproved"),
        (
            outgoing(params=["4370"]),
            SIGN_NAME,
            "FailedOperation.TemplateParamSetNotMatchApprovedTemplate",
        ),
        (outgoing(to="+86138001380"), SIGN_NAME, "InvalidParameterValue.IncorrectPhoneNumber"),
        (outgoing(to="13800138000"), SIGN_NAME, "InvalidParameterValue.IncorrectPhoneNumber"),
        (outgoing(), "未审核签名", "FailedOperation.SignatureIncorrectOrUnapproved"),
    ],
)
async def test_refusals_for_one_number_fail_with_tencents_code(
    server: TencentServer,
    adapter: TencentAdapter,
    message: Outgoing,
    sign_name: str,
    code: str,
) -> None:
    outcome = await adapter.send(settings_for(server, sign_name=sign_name), message)
    assert (outcome.kind, outcome.code) == ("failed", code)
    assert outcome.detail
    assert server.sent == []


@pytest.mark.parametrize(
    ("status", "kind", "throttled"),
    [(500, "retry", False), (502, "retry", False), (503, "retry", False), (429, "retry", True)],
)
async def test_http_errors_are_retried(
    server: TencentServer, adapter: TencentAdapter, status: int, kind: OutcomeKind, throttled: bool
) -> None:
    server.fail_next(1, status=status)
    settings = settings_for(server)
    outcome = await adapter.send(settings, outgoing())
    assert outcome == Outcome(kind, code=f"HTTP {status}", throttled=throttled)
    assert server.sent == []
    assert (await adapter.send(settings, outgoing())).kind == "sent"


async def test_a_gateway_timeout_is_unknown(server: TencentServer, adapter: TencentAdapter) -> None:
    server.fail_next(1, status=504)
    outcome = await adapter.send(settings_for(server), outgoing())
    assert outcome == Outcome("unknown", code="HTTP 504")


async def test_nothing_listening_is_retried(adapter: TencentAdapter) -> None:
    settings = TencentSettings(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        sdk_app_id=APP_ID,
        sign_name=SIGN_NAME,
        endpoint=f"http://127.0.0.1:{free_port()}",
    )
    outcome = await adapter.send(settings, outgoing())
    assert (outcome.kind, outcome.code) == ("retry", "ConnectError")


async def test_read_timeout_after_acceptance_is_unknown_then_query_finds_it(
    server: TencentServer,
) -> None:
    message = outgoing()
    server.stall_next(10)
    async with httpx.AsyncClient(timeout=0.5) as client:
        impatient = TencentAdapter(client)
        outcome = await impatient.send(settings_for(server), message)
        assert (outcome.kind, outcome.code) == ("unknown", "ReadTimeout")
        assert len(server.sent) == 1

        found = await impatient.query(settings_for(server), message)

    assert found == Outcome("sent", provider_message_id=server.sent[0].serial_no)
    pull = server.calls[-1].json()
    assert server.calls[-1].answer == "Ok"
    assert pull["Offset"] == 0 and pull["Limit"] == 100
    assert pull["PhoneNumber"] == PHONE and pull["SmsSdkAppId"] == APP_ID
    assert message.sent_at is not None
    assert pull["BeginTime"] <= message.sent_at.timestamp() <= pull["BeginTime"] + 120


async def test_a_dropped_answer_is_unknown_then_query_finds_it(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    message = outgoing()
    server.drop_next()
    outcome = await adapter.send(settings_for(server), message)
    assert outcome.kind == "unknown"
    assert outcome.code in ("RemoteProtocolError", "ReadError")
    found = await adapter.query(settings_for(server), message)
    assert found == Outcome("sent", provider_message_id=server.sent[0].serial_no)


async def test_query_for_a_message_never_sent_is_none(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    settings = settings_for(server)
    other = outgoing()
    assert (await adapter.send(settings, other)).kind == "sent"  # another message, same number
    assert await adapter.query(settings, outgoing(params=["1111", "1分钟"])) is None


async def test_query_reports_a_failed_delivery(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    message = outgoing()
    settings = settings_for(server)
    sent = await adapter.send(settings, message)
    assert sent.provider_message_id
    server.set_report(sent.provider_message_id, "FAIL", "MK:0005", "空号")
    found = await adapter.query(settings, message)
    assert found == Outcome(
        "failed", provider_message_id=sent.provider_message_id, code="FAIL", detail="空号"
    )


async def test_query_cannot_see_an_accepted_send_before_its_report(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    """The documented caveat: the pull API lists delivery reports, so an accepted send
    whose report has not come back looks like one that never arrived."""
    server.report_lag_s = 60
    message = outgoing()
    assert (await adapter.send(settings_for(server), message)).kind == "sent"
    assert await adapter.query(settings_for(server), message) is None


async def test_a_failed_query_is_unknown_not_none(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    server.error_next("InternalError", "backend busy")
    found = await adapter.query(settings_for(server), outgoing())
    assert found == Outcome("unknown", code="InternalError", detail="backend busy")
    server.fail_next(1, status=503)
    found = await adapter.query(settings_for(server), outgoing())
    assert found == Outcome("unknown", code="HTTP 503")


async def test_mapping_parameters_are_refused_without_a_call(
    server: TencentServer, adapter: TencentAdapter
) -> None:
    outcome = await adapter.send(settings_for(server), outgoing(params={"code": "4370"}))
    assert (outcome.kind, outcome.code) == ("failed", "huitou.TemplateParamsNotOrdered")
    no_template = Outgoing("m", "s", "sms", PHONE, "text")
    assert (await adapter.send(settings_for(server), no_template)).kind == "failed"
    assert server.calls == []


# --- callbacks ----------------------------------------------------------------------------

# The samples of Tencent's "短信下发状态通知" and "短信回复" pages.
REPORT_SAMPLE = [
    {
        "user_receive_time": "2015-10-17 08:03:04",
        "nationcode": "86",
        "mobile": "13xxxxxxxxx",
        "report_status": "SUCCESS",
        "errmsg": "DELIVRD",
        "description": "用户短信送达成功",
        "sid": "xxxxxxx",
    }
]
REPLY_SAMPLE = {
    "extend": "扩展码",
    "mobile": "13xxxxxxxxx",
    "nationcode": "86",
    "sign": "短信签名",
    "text": "用户回复的内容",
    "time": 1457336869,
}


CALLBACK_SETTINGS = TencentSettings(
    secret_id=SECRET_ID, secret_key=SECRET_KEY, sdk_app_id=APP_ID, sign_name=SIGN_NAME
)


def parse(body: Any) -> list[Receipt]:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    url = "https://huitou.example/v1/callbacks/tencent/shop-1?token=t"
    return ADAPTER.parse_callback(CALLBACK_SETTINGS, {}, url, raw)


def test_delivery_report_sample() -> None:
    assert parse(REPORT_SAMPLE) == [
        Receipt(
            "delivered",
            provider_message_id="xxxxxxx",
            address="+8613xxxxxxxxx",
            code="DELIVRD",
            detail="用户短信送达成功",
            at=datetime(2015, 10, 17, 8, 3, 4, tzinfo=timezone(timedelta(hours=8))),
        )
    ]


def test_failed_report_with_session_context() -> None:
    report = REPORT_SAMPLE[0] | {
        "report_status": "FAIL",
        "errmsg": "MK:0005",
        "description": "空号",
        "ext": "msg-1",
    }
    receipt, other = parse([report, REPORT_SAMPLE[0]])
    assert other.kind == "delivered" and other.message_id is None
    assert (receipt.kind, receipt.code, receipt.detail) == ("failed", "MK:0005", "空号")
    assert receipt.message_id == "msg-1"


def test_reply_sample() -> None:
    assert parse(REPLY_SAMPLE) == [
        Receipt(
            "reply",
            address="+8613xxxxxxxxx",
            text="用户回复的内容",
            at=datetime.fromtimestamp(1457336869, UTC),
        )
    ]


async def test_report_push_of_a_real_send(server: TencentServer, adapter: TencentAdapter) -> None:
    sent = await adapter.send(settings_for(server), outgoing())
    assert sent.provider_message_id
    [receipt] = parse(server.report_push(sent.provider_message_id))
    assert receipt.kind == "delivered"
    assert (receipt.provider_message_id, receipt.address) == (sent.provider_message_id, PHONE)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"result": 0}',
        b"[1]",
        json.dumps([REPORT_SAMPLE[0] | {"report_status": "DONE"}]).encode(),
        json.dumps([{k: v for k, v in REPORT_SAMPLE[0].items() if k != "sid"}]).encode(),
        json.dumps(REPLY_SAMPLE | {"mobile": None}).encode(),
    ],
)
def test_wrong_shapes_are_rejected(body: bytes) -> None:
    with pytest.raises(CallbackRejected):
        parse(body)


def test_an_empty_push_and_the_answer() -> None:
    assert parse([]) == []
    assert CALLBACK_ANSWER == {"result": 0, "errmsg": "OK"}


# --- settings -----------------------------------------------------------------------------


def test_settings() -> None:
    settings = TencentSettings(
        secret_id="id",
        secret_key="s3cr3t-value",
        sdk_app_id=APP_ID,
        sign_name=SIGN_NAME,
    )
    assert (settings.region, settings.endpoint) == (
        "ap-guangzhou",
        "https://sms.tencentcloudapi.com",
    )
    assert "s3cr3t" not in repr(settings)
    with pytest.raises(ValidationError):
        TencentSettings.model_validate(settings.model_dump() | {"extra": 1})
    with pytest.raises(ValidationError):
        TencentSettings(**(settings.model_dump() | {"endpoint": "sms.tencentcloudapi.com"}))
    assert ADAPTER.name == "tencent" and ADAPTER.channel == "sms" and ADAPTER.can_query
    assert ADAPTER.settings_model is TencentSettings

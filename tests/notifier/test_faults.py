"""Provider faults, in both modes, against local servers that play Aliyun and Tencent as
their documentation says: 500s then recovery send the message once; a provider that keeps
failing hands the message to the channel's fallback; an answer lost after the provider
took the message is reconciled through its status query, never sent twice. The number of
sends each server accepted is the effect counted: a second send would be a second SMS."""

from __future__ import annotations

from typing import Any

from tests.notifier.aliyun_server import AliyunServer
from tests.notifier.harness import Notifier
from tests.notifier.tencent_server import TencentServer

ALIYUN = {"access_key_id": "LTAI5tTestKeyId", "access_key_secret": "test-secret-of-the-key"}
TENCENT = {
    "secret_id": "AKIDhuitouTEST0000000000000000000000",
    "secret_key": "huitouTESTsecretKEY0000000000000",
    "sdk_app_id": "1400006666",
}
PHONE = "+8613800138000"


def aliyun_server() -> AliyunServer:
    return AliyunServer(
        ALIYUN["access_key_id"], ALIYUN["access_key_secret"], templates={"SMS_1": "欢迎回来"}
    )


def aliyun_channel(server: AliyunServer) -> dict[str, Any]:
    return {
        "provider": "aliyun",
        "settings": {**ALIYUN, "sign_name": "惠投", "endpoint": server.url},
    }


async def welcome_template(n: Notifier) -> None:
    await n.template(
        "welcome",
        "sms",
        "欢迎回来",
        provider_templates={
            "aliyun": {"code": "SMS_1", "params": {}},
            "tencent": {"id": "2220", "params": []},
        },
    )


async def test_provider_500s_then_recovery_send_once(n: Notifier) -> None:
    async with aliyun_server() as aliyun:
        await n.channel("sms", aliyun_channel(aliyun))
        await welcome_template(n)
        aliyun.fail_next(2, status=500)
        message = await n.request("r1", channel="sms", template="welcome", to=PHONE)
        sent = await n.settled(message, "sent")
        assert len(aliyun.sent) == 1
        assert len(aliyun.requests) == 1, "the two 500s were not handled; the third was"
        assert n.history(sent) == [
            "queued",
            "sending",
            "deferred",
            "sending",
            "deferred",
            "sending",
            "sent",
        ]
        assert sent["provider_message_id"] == aliyun.sent[0].biz_id


async def test_a_failing_provider_fails_over_to_the_fallback(n: Notifier) -> None:
    async with (
        aliyun_server() as aliyun,
        TencentServer(
            TENCENT["secret_id"], TENCENT["secret_key"], TENCENT["sdk_app_id"], sign_names=("惠投",)
        ) as tencent,
    ):
        await n.channel(
            "sms",
            {
                **aliyun_channel(aliyun),
                "fallback": {
                    "provider": "tencent",
                    "settings": {**TENCENT, "sign_name": "惠投", "endpoint": tencent.url},
                },
            },
        )
        await welcome_template(n)
        aliyun.fail_next(3, status=503)
        message = await n.request("f1", channel="sms", template="welcome", to=PHONE)
        sent = await n.settled(message, "sent")
        assert sent["provider"] == "tencent"
        assert (len(aliyun.sent), len(tencent.sent)) == (0, 1)
        assert "queued" in n.history(sent)[1:], "handed over as a new send on the fallback"


async def test_a_lost_answer_is_reconciled_not_sent_again(n: Notifier) -> None:
    async with aliyun_server() as aliyun:
        await n.channel("sms", aliyun_channel(aliyun))
        await welcome_template(n)
        aliyun.drop_next(1)  # Aliyun takes the message, the answer never arrives
        message = await n.request("l1", channel="sms", template="welcome", to=PHONE)
        sent = await n.settled(message, "sent")
        assert len(aliyun.sent) == 1, "asked, not sent again"
        actions = [r.get("Action") for r in aliyun.requests]
        assert actions[0] == "SendSms" and "QuerySendDetails" in actions[1:], actions
        assert actions.count("SendSms") == 1
        assert n.history(sent) == ["queued", "sending", "sent"]


async def test_a_burst_with_failures_among_it_sends_each_once(n: Notifier) -> None:
    """Outcomes are recorded many per transaction: sent, retried and their history
    side by side in one batch, each message still sent exactly once."""
    async with aliyun_server() as aliyun:
        await n.channel("sms", aliyun_channel(aliyun))
        await welcome_template(n)
        aliyun.fail_next(5, status=500)
        burst = [f"+86138001{i:05d}" for i in range(60)]
        ids = [
            await n.request(f"b{i}", channel="sms", template="welcome", to=phone)
            for i, phone in enumerate(burst)
        ]
        for message_id in ids:
            await n.settled(message_id, "sent")
        assert sorted(f"+86{s.phone}" for s in aliyun.sent) == sorted(burst)
        histories = [n.history(await n.message(i) or {}) for i in ids]
        assert sum(h.count("sending") for h in histories) == 60 + 5, "one call per 500"
        assert all(h[-1] == "sent" and h.count("sent") == 1 for h in histories)


async def test_the_shops_rate_limit_spaces_its_sends(n: Notifier) -> None:
    """A token bucket of burst 2 refilled at 4 a second: ten messages requested at once
    reach the provider over at least two seconds (the first two at once, then one every
    quarter second), each once. Only a lower bound: a slower machine spaces them more."""
    async with aliyun_server() as aliyun:
        await n.channel("sms", aliyun_channel(aliyun))
        await welcome_template(n)
        policy = {"rate_limits": {"aliyun": {"per_second": 4, "burst": 2}}}
        r = await n.call("PUT", "/v1/notifier/policy", json=policy)
        assert r.status_code == 200, r.text
        ids = [
            await n.request(f"rl{i}", channel="sms", template="welcome", to=f"+861380000{i:04d}")
            for i in range(10)
        ]
        for message_id in ids:
            await n.settled(message_id, "sent")
        times = sorted(s.received_at for s in aliyun.sent)
        assert len(times) == 10
        assert (times[-1] - times[0]).total_seconds() >= 1.9, times

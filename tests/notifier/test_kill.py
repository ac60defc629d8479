"""The notifier SIGKILLed between the provider's answer and its record, on the platform as
a user starts it (both modes): Aliyun took the SMS but its answer is held back, the
process dies, and the one that starts after it asks Aliyun (`QuerySendDetails`) instead
of sending again: one SMS, the message `sent`. The SMS count at the provider is the
effect: a blind retry would make it two."""

from __future__ import annotations

from tests.campaigns.test_journeys import from_playbook, new_shop, order_event, post
from tests.notifier.aliyun_server import AliyunServer
from tests.notifier.test_faults import ALIYUN, PHONE, aliyun_channel
from tests.notifier.test_messages import messages_of
from tests.platform import Platform, until


async def test_a_kill_before_the_answer_is_recorded_sends_one_sms(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    templates = {"SMS_2": "您的订单${order}还未付款"}
    async with AliyunServer(ALIYUN["access_key_id"], ALIYUN["access_key_secret"], templates) as s:
        r = await platform.request("PUT", "/v1/channels/sms", key=key, json=aliyun_channel(s))
        assert r.status_code == 200, r.text
        template = {
            "name": "unpaid_reminder",
            "channel": "sms",
            "locales": {"zh-CN": {"text": "您的订单{{ order.id }}还未付款"}},
            "provider_templates": {
                "aliyun": {"code": "SMS_2", "params": {"order": "{{ order.id }}"}}
            },
        }
        r = await platform.request("POST", "/v1/templates", key=key, json=template)
        assert r.status_code == 201, r.text
        await from_playbook(platform, key, "unpaid_reminder", delay="PT1S")
        s.delay_next(120)  # taken (the SMS goes out), answered two minutes later
        await post(platform, key, order_event(shop, f"{shop}-o1", "c-1", "created"))

        async def taken() -> bool:
            return len(s.sent) == 1

        await until(taken, within=60)
        assert len(s.sent) == 1
        (message,) = await messages_of(platform, key)
        assert message["status"] == "sending", "the answer is not recorded yet"
        service = "platform" if platform.embedded else "notifier"
        platform.kill(service)
        await platform.start(service)

        async def recorded() -> bool:
            found = await messages_of(platform, key)
            return bool(found) and found[0]["status"] == "sent"

        await until(recorded, within=90)
        (message,) = await messages_of(platform, key)
        r = await platform.request("GET", f"/v1/messages/{message['message_id']}", key=key)
        history = [h["status"] for h in r.json()["status_history"]]
        assert history == ["queued", "sending", "sent"], "one attempt, settled by the query"
        actions = [r.get("Action") for r in s.requests]
        assert actions.count("SendSms") == 1 and "QuerySendDetails" in actions, actions
        assert len(s.sent) == 1
        assert message["to"] == PHONE

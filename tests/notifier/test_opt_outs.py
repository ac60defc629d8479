"""Opting out, in both modes, through real parts: the one-click unsubscribe link of a
marketing email received by a real SMTP server, a hard bounce at RCPT, an Aliyun reply
退订 and delivery report pushed to the shop's callback URL, Twilio's signed status
callback and STOP. Each stops what it should (marketing, or everything for a bounce) and
nothing else; a callback or link that is not genuine changes nothing."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.notifier.aliyun_server import AliyunServer
from tests.notifier.harness import SHARED, Notifier
from tests.notifier.smtp_server import Script, SmtpServer
from tests.notifier.twilio_server import TwilioServer

PUBLIC = SHARED["public_url"]
"""`HUITOU_PUBLIC_URL`: where recipients and providers reach the platform."""


def local(url: str) -> str:
    """The path and query of a public URL (the test's client talks to the app itself)."""
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == PUBLIC, url
    return parts.path + (f"?{parts.query}" if parts.query else "")


@pytest.fixture(autouse=True)
async def no_quiet_hours(n: Notifier) -> None:
    """These tests send marketing messages now: the shop's quiet hours (by default 21:00 to
    08:00 in its time zone) would hold them whenever the suite runs in that window."""
    r = await n.call("GET", "/v1/notifier/policy")
    assert r.status_code == 200, r.text
    r = await n.call("PUT", "/v1/notifier/policy", json={**r.json(), "quiet_hours": None})
    assert r.status_code == 200, r.text


def smtp_channel(server: SmtpServer, sender: str) -> dict[str, Any]:
    settings = {"host": "127.0.0.1", "port": server.port, "tls": "none", "from": sender}
    return {"provider": "smtp", "settings": settings}


async def post_raw(n: Notifier, url: str, body: bytes, headers: dict[str, str]) -> Any:
    return await n.client.post(local(url), content=body, headers=headers)


async def test_one_click_unsubscribe_stops_marketing_email_and_nothing_else(n: Notifier) -> None:
    async with SmtpServer("plain") as smtp:
        await n.channel("email", smtp_channel(smtp, "惠投小店 <news@shop.example>"))
        await n.template("promo", "email", "新品上市。不想再收到？{{ unsubscribe_url }}")
        await n.template("shipped", "email", "您的订单{{ order.id }}已发货")
        r = await n.call("PUT", "/v1/consent/c-1", json={"email": True})
        assert r.status_code == 200, r.text
        to = "buyer@example.com"
        first = await n.request(
            "m1", channel="email", template="promo", to=to, category="marketing"
        )
        await n.settled(first, "sent")
        (mail,) = smtp.received
        header = mail.message["List-Unsubscribe"]
        assert mail.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert header.startswith(f"<{PUBLIC}/v1/unsubscribe/") and header.endswith(">")
        link = header[1:-1]
        text = mail.message.get_body(("plain",))
        assert text is not None and link in text.get_content(), "the text names the same link"
        assert mail.message.get_body(("html",)) is not None

        # A link that is not genuine, and the confirmation page, change nothing.
        forged = link[:-1] + ("0" if link[-1] != "0" else "1")
        r = await post_raw(n, forged, b"List-Unsubscribe=One-Click", FORM)
        assert r.status_code == 404, r.text
        r = await n.client.get(local(link))
        assert r.status_code == 200 and "<form" in r.text
        assert (await n.call("GET", "/v1/consent/c-1")).json()["email"] is True

        for _ in range(2):  # a repeated click is the same unsubscription
            r = await post_raw(n, link, b"List-Unsubscribe=One-Click", FORM)
            assert r.status_code == 200, r.text

        second = await n.request(
            "m2", channel="email", template="promo", to=to, category="marketing"
        )
        held = await n.settled(second, "suppressed")
        assert held["reason"] == "suppressed:unsubscribe"
        notice = await n.request("m3", channel="email", template="shipped", to=to)
        await n.settled(notice, "sent")
        assert len(smtp.received) == 2, "the order notice still goes out; the promotion not"
        # The link promised no more marketing; the consent the shop recorded stays.
        assert (await n.call("GET", "/v1/consent/c-1")).json()["email"] is True


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def test_a_hard_bounce_stops_every_message_to_the_address(n: Notifier) -> None:
    gone = "gone@example.com"
    script = Script(refuse_recipients={gone: "550 5.1.1 mailbox unavailable"})
    async with SmtpServer("plain", script=script) as smtp:
        await n.channel("email", smtp_channel(smtp, "news@shop.example"))
        await n.template("shipped", "email", "您的订单{{ order.id }}已发货")
        first = await n.request("b1", channel="email", template="shipped", to=gone)
        failed = await n.settled(first, "failed")
        assert failed["reason"] and failed["reason"].startswith("bounce"), failed
        second = await n.request("b2", channel="email", template="shipped", to=gone)
        held = await n.settled(second, "suppressed")
        assert held["reason"] == "suppressed:bounce"
        other = await n.request("b3", channel="email", template="shipped", to="ok@example.com")
        await n.settled(other, "sent")
        assert [m.rcpt_tos for m in smtp.received] == [["ok@example.com"]]


ALIYUN_KEY_ID = "LTAI5tTestKeyId"
ALIYUN_SECRET = "test-secret-of-the-key"


async def test_aliyun_receipts_and_a_reply_of_td(n: Notifier) -> None:
    templates = {"SMS_200000002": "欢迎回来"}
    async with AliyunServer(ALIYUN_KEY_ID, ALIYUN_SECRET, templates=templates) as aliyun:
        channel = await n.channel(
            "sms",
            {
                "provider": "aliyun",
                "settings": {
                    "access_key_id": ALIYUN_KEY_ID,
                    "access_key_secret": ALIYUN_SECRET,
                    "sign_name": "惠投",
                    "endpoint": aliyun.url,
                },
            },
        )
        callback = channel["callback_urls"]["aliyun"]
        assert callback.startswith(f"{PUBLIC}/v1/callbacks/aliyun/{n.shop}?token=")
        mapping = {"provider_templates": {"aliyun": {"code": "SMS_200000002", "params": {}}}}
        await n.template("welcome", "sms", "欢迎回来", **mapping)
        r = await n.call("PUT", "/v1/consent/c-1", json={"sms": True})
        assert r.status_code == 200
        phone = "+8613800138000"
        first = await n.request(
            "a1", channel="sms", template="welcome", to=phone, category="marketing"
        )
        sent = await n.settled(first, "sent")
        (record,) = aliyun.sent
        assert sent["provider_message_id"] == record.biz_id
        report = [
            {
                "phone_number": "13800138000",
                "send_time": "2026-12-04 10:00:00",
                "report_time": "2026-12-04 10:00:05",
                "success": True,
                "err_code": "DELIVERED",
                "err_msg": "用户接收成功",
                "sms_size": "1",
                "biz_id": record.biz_id,
                "out_id": first,
            }
        ]
        body = json.dumps(report, ensure_ascii=False).encode()
        json_headers = {"Content-Type": "application/json"}
        # Without the token, or with another one, nothing is read into the shop.
        bare = callback.split("?")[0]
        for url in (bare, f"{bare}?token={'0' * 32}"):
            r = await post_raw(n, url, body, json_headers)
            assert r.status_code == 401, r.text
        assert (await n.message(first) or {})["status"] == "sent"

        for _ in range(2):  # Aliyun pushes again when it missed the answer
            r = await post_raw(n, callback, body, json_headers)
            assert r.status_code == 200 and r.json() == {"code": 0, "msg": "成功"}, r.text
        delivered = await n.settled(first, "delivered")
        assert n.history(delivered) == ["queued", "sending", "sent", "delivered"]

        reply = [
            {
                "phone_number": "13800138000",
                "send_time": "2026-12-04 10:01:00",
                "content": " 退订 ",
                "sign_name": "惠投",
                "dest_code": "1234",
                "sequence_id": 1234567890,
            }
        ]
        r = await post_raw(n, callback, json.dumps(reply).encode(), json_headers)
        assert r.status_code == 200, r.text
        second = await n.request(
            "a2", channel="sms", template="welcome", to=phone, category="marketing"
        )
        held = await n.settled(second, "suppressed")
        assert held["reason"] == "suppressed:opt_out"
        notice = await n.request("a3", channel="sms", template="welcome", to=phone)
        await n.settled(notice, "sent")
        assert len(aliyun.sent) == 2, "transactional messages still go to who replied TD"


TWILIO_SID = "AC" + "0123456789abcdef" * 2
TWILIO_TOKEN = "0f" * 16
TWILIO_FROM = "+15017122661"


async def test_twilio_signed_status_callback_and_stop(n: Notifier) -> None:
    async with TwilioServer(TWILIO_SID, TWILIO_TOKEN, numbers={TWILIO_FROM}) as twilio:
        await n.channel(
            "sms",
            {
                "provider": "twilio",
                "settings": {
                    "account_sid": TWILIO_SID,
                    "auth_token": TWILIO_TOKEN,
                    "from": TWILIO_FROM,
                    "endpoint": twilio.url,
                },
            },
        )
        await n.template("hello", "sms", "Your order {{ order.id }} has shipped")
        phone = "+14155550100"
        first = await n.request("t1", channel="sms", template="hello", to=phone)
        await n.settled(first, "sent")
        (resource,) = twilio.sent
        assert resource["_status_callback"] == f"{PUBLIC}/v1/callbacks/twilio/{n.shop}"
        headers, url, body = twilio.status_callback(resource["sid"], "delivered")
        forged = {**headers, "X-Twilio-Signature": "AAAA" + headers["X-Twilio-Signature"][4:]}
        r = await post_raw(n, url, body, forged)
        assert r.status_code == 401, r.text
        assert (await n.message(first) or {})["status"] == "sent"
        r = await post_raw(n, url, body, headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/xml")
        await n.settled(first, "delivered")

        headers, url, body = twilio.inbound(url, phone, "STOP")
        r = await post_raw(n, url, body, headers)
        assert r.status_code == 200, r.text
        r = await n.call("PUT", "/v1/consent/c-1", json={"sms": True})
        assert r.status_code == 200
        second = await n.request(
            "t2", channel="sms", template="hello", to=phone, category="marketing"
        )
        held = await n.settled(second, "suppressed")
        assert held["reason"] == "suppressed:opt_out"
        assert len(twilio.sent) == 1

"""The platform's default email channel (`HUITOU_NOTIFIER_DEFAULT_SMTP`, which Docker
Compose points at Mailpit): a shop that configured no email channel sends through it over
real SMTP; a shop's own channel wins; invalid settings stop the service from starting."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.settings import Settings
from services.notifier.config import default_channels
from tests.conftest import eventually, make_settings
from tests.notifier.harness import SHARED, serving_notifier
from tests.notifier.smtp_server import SmtpServer

SENDER = "Huitou <noreply@huitou.local>"


async def test_shops_without_an_email_channel_send_through_the_default(tmp_path: Path) -> None:
    async with SmtpServer("plain") as smtp:
        default = {"host": "127.0.0.1", "port": smtp.port, "tls": "none", "from": SENDER}
        settings = make_settings("embedded", tmp_path, **SHARED, notifier_default_smtp=default)
        async with serving_notifier(settings) as app:
            plain, own = await app.new_shop(), await app.new_shop()
            for shop in (plain, own):
                await shop.template("shipped", "email", "您的订单{{ order.id }}已发货")
            await own.channel("email", {"provider": "outbox", "settings": {}})
            r = await plain.call("GET", "/v1/channels/email")
            assert r.status_code == 200 and r.json()["provider"] == "smtp", r.text

            sent = await plain.request("d1", channel="email", template="shipped", to="a@x.cn")
            kept = await own.request("d2", channel="email", template="shipped", to="b@x.cn")
            message = await plain.settled(sent, "sent")
            assert message["provider"] == "smtp"
            other = await own.settled(kept, "sent")
            assert other["provider"] == "outbox"

            async def arrived() -> bool:
                return len(smtp.received) >= 1

            await eventually(arrived)
            (mail,) = smtp.received
            assert mail.rcpt_tos == ["a@x.cn"] and mail.mail_from == "noreply@huitou.local"
            assert "o-d1" in mail.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]


def test_invalid_default_settings_are_refused() -> None:
    assert default_channels(Settings()) == {}
    for bad in ({"host": "mail", "port": 0, "tls": "none", "from": SENDER}, {"host": "mail"}):
        with pytest.raises(ValueError, match="HUITOU_NOTIFIER_DEFAULT_SMTP is invalid"):
            default_channels(Settings(notifier_default_smtp=bad))

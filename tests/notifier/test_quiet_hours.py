"""Quiet hours on a clock the test moves, in both modes: a marketing message requested at
22:30 in the shop's timezone (Asia/Shanghai) waits, deferred on its durable timer, until
08:00 there — not a minute earlier, and then it goes; a transactional one goes at once;
so does a marketing one whose recipient's own timezone is in daytime. The intake and the
timer worker are the service's own, on its database, with the clock handed to them. The
test's day is a year ahead of the real one: the running service's own timer worker, on the
real clock, must never find these timers due (a fixed date once became "now" and it raced)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from libs.common.db import Database
from libs.common.timers import TimerWorker
from services.notifier.intake import SEND_TIMER, accept
from services.notifier.registry import adapters
from services.notifier.sending import RECONCILE_TIMER, Sending
from tests.notifier.harness import Notifier


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_marketing_waits_for_the_end_of_quiet_hours_and_then_goes(n: Notifier) -> None:
    settings = n.settings
    await n.template("promo", "sms", "上新啦，全场八折")
    r = await n.call("PUT", "/v1/consent/c-1", json={"sms": True})
    assert r.status_code == 200
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=366)
    clock = Clock(day + timedelta(hours=14, minutes=30))  # 22:30 in Shanghai
    db = Database(settings.database_url_for("notifier"), "notifier")
    sending = Sending(
        db,
        adapters(),
        namespace=settings.topic_namespace,
        public_base="https://crm.example.com",
        clock=clock,
    )
    worker = TimerWorker(
        db,
        "notifier",
        {SEND_TIMER: sending.fire_sends, RECONCILE_TIMER: sending.fire_reconciles},
        clock=clock,
        lanes=[[SEND_TIMER, RECONCILE_TIMER]],  # the service's other timers are not ours
    )
    phone = "+8613800138000"
    requests = {
        "promo": n.requested("q1", channel="sms", template="promo", to=phone, category="marketing"),
        "notice": n.requested("q2", channel="sms", template="promo", to=phone),
        "london": n.requested(
            "q3",
            channel="sms",
            template="promo",
            to="+447700900123",
            category="marketing",
            timezone="Europe/London",  # 14:30 there
        ),
    }
    ids = {name: n.message_id(f"q{i}") for i, name in enumerate(requests, 1)}

    async def status(name: str) -> tuple[str, str | None]:
        found = await n.message(ids[name])
        assert found is not None
        return found["status"], found["reason"]

    async def fire_at(moment: datetime) -> int:
        clock.now = moment
        fired = await worker.fire_due()
        await sending.stop()  # the provider calls it started have finished
        return fired

    try:
        async with db.begin() as conn:
            await accept(
                conn,
                list(requests.values()),
                namespace=settings.topic_namespace,
                now=clock(),
                public_base="https://crm.example.com",
            )
        assert await status("promo") == ("deferred", "quiet_hours")
        assert await fire_at(clock.now) == 2
        assert (await status("notice"))[0] == "sent"
        assert (await status("london"))[0] == "sent"
        assert await status("promo") == ("deferred", "quiet_hours")

        eight = day + timedelta(days=1)  # 08:00 in Shanghai
        assert await fire_at(eight - timedelta(seconds=1)) == 0
        assert await status("promo") == ("deferred", "quiet_hours")
        assert await fire_at(eight) == 1
        assert (await status("promo"))[0] == "sent"
        promo = await n.message(ids["promo"])
        assert promo is not None
        assert n.history(promo) == ["deferred", "sending", "sent"]
    finally:
        await db.dispose()

"""Pure parts of the engine: the envelope the send step builds by hand, daily windows,
durations and offsets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest

from libs.common.events import NotificationRequestedData, decode_event, parse_event
from services.campaigns.definitions import Window, parse_duration, parse_offset
from services.campaigns.engine import next_window, requested_event

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_the_hand_built_request_is_a_valid_envelope() -> None:
    at = datetime(2026, 11, 11, 2, 3, 4, 567891, tzinfo=UTC)
    data = {
        "idempotency_key": "acme:j_1:v1:remind:e1",
        "channel": "sms",
        "customer_id": "c-1",
        "template": "unpaid_reminder",
        "to": "+8613800138000",
        "variables": {"order": {"id": "1001"}, "customer": {"name": "王芳"}},
        "journey_id": "j_1",
    }
    raw = requested_event("acme", "c-1", "abc123", at, data)
    event = decode_event(raw)
    assert parse_event(orjson.loads(raw)) == event  # passes the full validation too
    assert (event.type, event.shop_id, event.subject, event.time) == (
        "notification.requested",
        "acme",
        "c-1",
        at,
    )
    typed = event.typed_data()
    assert isinstance(typed, NotificationRequestedData)
    assert typed.idempotency_key == "acme:j_1:v1:remind:e1"
    assert orjson.loads(raw)["time"] == "2026-11-11T02:03:04.567891Z"


def window(at: str, until: str | None = None, weekdays: list[int] | None = None) -> Window:
    body: dict[str, object] = {"at": at}
    if until:
        body["until"] = until
    if weekdays:
        body["weekdays"] = weekdays
    return Window.model_validate(body)


@pytest.mark.parametrize(
    ("local", "rule", "expected"),
    [
        # before the window: its start today
        ("2026-12-03T07:30", window("10:00", "21:00"), "2026-12-03T10:00"),
        # inside it: at once
        ("2026-12-03T12:00", window("10:00", "21:00"), "2026-12-03T12:00"),
        # after it: tomorrow's start
        ("2026-12-03T21:30", window("10:00", "21:00"), "2026-12-04T10:00"),
        # no end: from its start on
        ("2026-12-03T23:00", window("10:00"), "2026-12-03T23:00"),
        # Thursday 2026-12-03; weekends only: Saturday
        ("2026-12-03T12:00", window("10:00", "21:00", [6, 7]), "2026-12-05T10:00"),
    ],
)
def test_next_window(local: str, rule: Window, expected: str) -> None:
    anchor = datetime.fromisoformat(local).replace(tzinfo=SHANGHAI).astimezone(UTC)
    found = next_window(anchor, SHANGHAI, rule)
    assert found.astimezone(SHANGHAI).replace(tzinfo=None) == datetime.fromisoformat(expected)


def test_durations_and_offsets() -> None:
    assert parse_duration("PT1H") == timedelta(hours=1)
    assert parse_duration("P1DT12H") == timedelta(days=1, hours=12)
    assert parse_duration("P2W") == timedelta(weeks=2)
    assert parse_offset("-P7D") == -timedelta(days=7)
    assert parse_offset("P1D") == timedelta(days=1)
    for bad in ("1h", "P1M", "P1Y", "P", "PT", "", "P9999D", "-PT"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        window("21:00", "10:00")

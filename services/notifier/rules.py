"""The rules a message passes before it is sent: the shop's policy (quiet hours, consent
for transactional messages, rate limits), consent and suppressions.

Each rule that stops a message names itself as the message's `reason`; quiet hours never
drop a message, they defer it to the next allowed minute (on a durable timer).
Suppressions: `MARKETING_ONLY` reasons hold back marketing, the others every message.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator

Category = Literal["transactional", "marketing"]

MARKETING_ONLY: frozenset[str] = frozenset({"opt_out", "unsubscribe"})
"""Suppression reasons that stop marketing only: a recipient who replied 退订 to a promotion
or clicked its unsubscribe link still gets the order and parcel notices (the markets'
opt-out rules cover marketing); a bounced or complaining address gets nothing."""


_MARKETING: list[Category] = ["marketing"]


class QuietHours(BaseModel):
    """No message of `categories` between `start` and `end` (local time; `start` after
    `end` spans midnight)."""

    model_config = ConfigDict(extra="forbid")
    start: time = time(21, 0)
    end: time = time(8, 0)
    categories: list[Category] = Field(default_factory=lambda: _MARKETING[:], max_length=2)

    @field_validator("start", "end")
    @classmethod
    def _whole_minutes(cls, value: time) -> time:
        if value.second or value.microsecond or value.tzinfo is not None:
            raise ValueError("give a local time of day as HH:MM")
        return value


class RateLimit(BaseModel):
    """A token bucket per shop and provider: `per_second` on average, `burst` at once."""

    model_config = ConfigDict(extra="forbid")
    per_second: float = Field(gt=0, le=10_000)
    burst: int = Field(ge=1, le=100_000)


DEFAULT_RATE = RateLimit(per_second=50, burst=100)
"""What a provider gets unless the policy says otherwise (well under what Aliyun, Tencent
and Twilio accept per account by default)."""


class Policy(BaseModel):
    """`GET|PUT /v1/notifier/policy`."""

    model_config = ConfigDict(extra="forbid")
    quiet_hours: QuietHours | None = Field(default_factory=QuietHours)
    transactional_needs_consent: bool = False
    rate_limits: dict[Literal["smtp", "aliyun", "tencent", "twilio"], RateLimit] = Field(
        default_factory=dict
    )
    locale: Literal["zh-CN", "en"] = "zh-CN"
    """The locale of a template used when the request names none."""

    def rate(self, provider: str) -> RateLimit | None:
        """The bucket of `provider` (none for the outbox, which sends nothing)."""
        if provider == "outbox":
            return None
        for name, rate in self.rate_limits.items():
            if name == provider:
                return rate
        return DEFAULT_RATE


def quiet_until(policy: Policy, category: str, zone: ZoneInfo, now: datetime) -> datetime | None:
    """The next allowed minute if `now` falls in the quiet hours for `category`, else None."""
    quiet = policy.quiet_hours
    if quiet is None or category not in quiet.categories or quiet.start == quiet.end:
        return None
    local = now.astimezone(zone)
    at = local.time().replace(tzinfo=None)
    spans_midnight = quiet.start > quiet.end
    inside = (
        (at >= quiet.start or at < quiet.end) if spans_midnight else quiet.start <= at < quiet.end
    )
    if not inside:
        return None
    day = local.date()
    if spans_midnight and at >= quiet.start:
        day += timedelta(days=1)
    # The wall-clock end on that day, in the zone (fold 0 on a repeated hour).
    end = datetime.combine(day, quiet.end, tzinfo=zone)
    return end.astimezone(now.tzinfo)


def consent_reason(policy: Policy, category: str, consent: bool | None) -> str | None:
    """Why consent stops the message (None: it may go). Marketing needs an explicit yes;
    transactional needs one only if the shop's policy says so, and is stopped by an
    explicit no either way."""
    if consent is False:
        return "no_consent"
    if consent is None and (category == "marketing" or policy.transactional_needs_consent):
        return "no_consent"
    return None


def take_tokens(
    tokens: float, refilled_at: float, rate: RateLimit, now: float, wanted: int
) -> tuple[int, float, float]:
    """A token bucket step: how many of `wanted` may go now, and the bucket after."""
    tokens = min(float(rate.burst), tokens + (now - refilled_at) * rate.per_second)
    granted = min(wanted, int(tokens))
    return granted, tokens - granted, now


def wait_for_tokens(tokens: float, rate: RateLimit, wanted: int) -> float:
    """Seconds until `wanted` tokens are in a bucket holding `tokens`."""
    return max(0.0, (wanted - tokens) / rate.per_second)

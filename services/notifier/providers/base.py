"""What every provider adapter offers the notifier, and what it answers.

An adapter turns one rendered message into one provider call and the provider's answer
into an `Outcome`; it never retries, sleeps or decides policy (the notifier does:
retries on durable timers, failover, rate limits). Adapters are plain async code over
httpx (or aiosmtplib), one module each, with their settings validated by a pydantic
model named in `Adapter.settings_model`.

Outcome kinds:
- `sent`: the provider accepted the message (`provider_message_id` when it gives one).
- `retry`: not sent, try again later (timeouts before the request was written, 5xx,
  throttling: `throttled=True`); the notifier backs off, then fails over.
- `failed`: the provider refused it for good (invalid number, unapproved template, bad
  credentials): `code` and `detail` are the provider's own.
- `unknown`: the request may have reached the provider and its answer was lost (a read
  timeout, a dropped connection after the body went out). The notifier then asks
  `query` (the provider's status API) before it ever sends again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel

OutcomeKind = Literal["sent", "retry", "failed", "unknown"]


@dataclass(frozen=True)
class ProviderTemplate:
    """A pre-approved provider template (Aliyun `TemplateCode`, Tencent `TemplateId`) with
    its rendered parameters: a name → value mapping (Aliyun `TemplateParam`) or an ordered
    list (Tencent `TemplateParamSet`)."""

    id: str
    params: Mapping[str, str] | Sequence[str]


@dataclass(frozen=True)
class Outgoing:
    """One rendered message, ready for a provider."""

    message_id: str
    """Huitou's id of the message: stable across attempts; adapters pass it where the
    provider keeps a caller reference (Aliyun `OutId`, Tencent `SessionContext`, the
    email `Message-ID`), so `query` can find the attempt."""
    shop_id: str
    channel: Literal["sms", "email"]
    to: str
    """E.164 phone (`+8613800138000`) or email address."""
    text: str
    """SMS body, or the email's text part (what an outbox or Twilio sends)."""
    subject: str | None = None
    html: str | None = None
    template: ProviderTemplate | None = None
    """Set for providers that send only approved templates (Aliyun, Tencent)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra email headers (`List-Unsubscribe`, `List-Unsubscribe-Post`)."""
    status_callback: str | None = None
    """Where the provider should post delivery receipts (Twilio `StatusCallback`)."""
    sent_at: datetime | None = None
    """When the attempt started (providers' status queries take a send date)."""


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    provider_message_id: str | None = None
    code: str | None = None
    """The provider's own code (`isv.MOBILE_NUMBER_ILLEGAL`, `LimitExceeded…`, `21211`)."""
    detail: str | None = None
    throttled: bool = False


@dataclass(frozen=True)
class Receipt:
    """What a callback reported: a delivery status for one message, or an inbound reply."""

    kind: Literal["delivered", "failed", "reply", "opt_out", "bounce", "complaint"]
    provider_message_id: str | None = None
    message_id: str | None = None
    """Huitou's id when the provider echoes it (Aliyun `out_id`, Tencent `ext`/session)."""
    address: str | None = None
    """The phone or email concerned (the sender of a reply, the bounced address)."""
    text: str | None = None
    code: str | None = None
    detail: str | None = None
    at: datetime | None = None


class CallbackRejected(Exception):
    """A callback whose signature or shape is wrong (answered 401/400, nothing recorded)."""


class Adapter(Protocol):
    name: str
    channel: Literal["sms", "email"]
    settings_model: type[BaseModel]

    async def send(self, settings: Any, message: Outgoing) -> Outcome: ...

    async def query(self, settings: Any, message: Outgoing) -> Outcome | None:
        """The provider's status of an earlier attempt of `message` (found by its
        `message_id`/`provider_message_id` and date): `sent` if the provider has it, a
        `failed` one if the provider reports it failed, `None` if the provider never saw
        it (safe to send again) or cannot tell (see `can_query`)."""
        ...

    can_query: bool
    """False where the protocol cannot tell whether an attempt arrived (SMTP)."""

    def parse_callback(
        self, settings: Any, headers: Mapping[str, str], url: str, body: bytes
    ) -> list[Receipt]:
        """The receipts in one callback request the provider sent to
        `POST /v1/callbacks/{provider}/{shop_id}` (`url` is the full URL it was sent to).
        Raises `CallbackRejected` when it is not the provider's (bad signature, wrong
        shape); providers that do not sign their pushes are verified by the secret token
        the callback URL carries (checked by the notifier before this is called)."""
        ...

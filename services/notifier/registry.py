"""The provider adapters by name (one instance each per process; they share nothing but
their httpx clients)."""

from __future__ import annotations

from services.notifier.providers import aliyun, smtp, tencent, twilio
from services.notifier.providers.base import Adapter
from services.notifier.providers.outbox import OutboxAdapter


def adapters() -> dict[str, Adapter]:
    found: dict[str, Adapter] = {
        "smtp": smtp.ADAPTER,
        "aliyun": aliyun.ADAPTER,
        "tencent": tencent.ADAPTER,
        "twilio": twilio.ADAPTER,
    }
    # One outbox serves both channels (it sends nothing).
    found["outbox"] = OutboxAdapter("sms")
    return found

"""The `outbox` provider (the default on every channel): sends nothing. The rendered
message stays in the notifier's own table, readable through `GET /v1/messages`, so the
platform works end to end without an account anywhere (`make run`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from services.notifier.providers.base import CallbackRejected, Outcome, Outgoing, Receipt


class OutboxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutboxAdapter:
    name = "outbox"
    can_query = True
    settings_model: type[BaseModel] = OutboxSettings

    def __init__(self, channel: Literal["sms", "email"]) -> None:
        self.channel = channel

    async def send(self, settings: Any, message: Outgoing) -> Outcome:
        return Outcome("sent", provider_message_id=message.message_id)

    async def query(self, settings: Any, message: Outgoing) -> Outcome | None:
        # Nothing left the building: an attempt whose end was not recorded never "sent"
        # anything, so sending it again is safe.
        return None

    def parse_callback(
        self, settings: Any, headers: Mapping[str, str], url: str, body: bytes
    ) -> list[Receipt]:
        raise CallbackRejected("the outbox provider has no callbacks")

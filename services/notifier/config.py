"""A shop's sending configuration as the notifier reads it: its channels (provider,
settings, fallback) and its policy, read for a set of shops with one statement each."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.settings import Settings
from services.notifier import rules
from services.notifier.models import channels, policies
from services.notifier.providers.smtp import SmtpSettings


@dataclass(frozen=True)
class Channel:
    provider: str
    settings: Mapping[str, Any]
    fallback_provider: str | None = None
    fallback_settings: Mapping[str, Any] | None = None

    def settings_of(self, provider: str) -> Mapping[str, Any]:
        """The settings of `provider` on this channel (the fallback's, after a failover)."""
        if provider == self.fallback_provider and self.fallback_settings is not None:
            return self.fallback_settings
        return self.settings if provider == self.provider else {}


OUTBOX = Channel("outbox", {})
"""Every channel a shop has not configured."""


def default_channels(settings: Settings) -> dict[str, Channel]:
    """The platform's channel for shops that configured none, by channel name (only
    email, when `HUITOU_NOTIFIER_DEFAULT_SMTP` is set); refuses invalid SMTP settings."""
    if settings.notifier_default_smtp is None:
        return {}
    try:
        SmtpSettings.model_validate(settings.notifier_default_smtp)
    except ValidationError as exc:
        raise ValueError(f"HUITOU_NOTIFIER_DEFAULT_SMTP is invalid: {exc}") from None
    return {"email": Channel("smtp", dict(settings.notifier_default_smtp))}


async def load_channels(
    conn: AsyncConnection,
    shop_ids: Iterable[str],
    defaults: Mapping[str, Channel] | None = None,
) -> dict[tuple[str, str], Channel]:
    """(shop, channel) → its configuration, for the channels the shops configured, and
    for each shop the platform's `defaults` of the channels it did not configure."""
    wanted = sorted(set(shop_ids))
    if not wanted:
        return {}
    found = {
        (r.shop_id, r.channel): Channel(
            r.provider,
            orjson.loads(r.settings),
            r.fallback_provider,
            orjson.loads(r.fallback_settings) if r.fallback_settings else None,
        )
        for r in await conn.execute(select(channels).where(channels.c.shop_id.in_(wanted)))
    }
    for shop in wanted:
        for name, channel in (defaults or {}).items():
            found.setdefault((shop, name), channel)
    return found


async def load_policies(conn: AsyncConnection, shop_ids: Iterable[str]) -> dict[str, rules.Policy]:
    """Each shop's policy (the default one where it set none)."""
    wanted = sorted(set(shop_ids))
    found = {
        shop: rules.Policy.model_validate_json(text)
        for shop, text in await conn.execute(
            select(policies.c.shop_id, policies.c.definition).where(policies.c.shop_id.in_(wanted))
        )
    }
    return {shop: found.get(shop) or rules.Policy() for shop in wanted}

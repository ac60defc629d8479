"""The consumer path: `notification.requested` events become messages, in the batch's
transaction, with no provider called.

A request whose message exists already (a duplicate, a redelivered batch) changes
nothing. A new one is checked against the rules (an address, suppressions, consent, a
template that renders) and either stops there with its reason (`suppressed`, `failed`),
waits for the end of the quiet hours (`deferred`), or is `queued`; deferred and queued
messages get a `notify.send` timer, which the sending path fires (`sending.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from jinja2 import TemplateError
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.keysets import by_shop
from libs.common.db.tables import shops
from libs.common.events import Envelope, NotificationRequestedData
from libs.common.timers import Timer, schedule, timer_key
from services.notifier import links, rules, templates
from services.notifier.config import OUTBOX, Channel, load_channels, load_policies
from services.notifier.models import consents, message_id_of, messages, suppressions
from services.notifier.models import templates as template_rows
from services.notifier.statuses import Change, record

SEND_TIMER = "notify.send"


@dataclass
class Context:
    """What a batch of requests is checked against, read with one statement per table."""

    zones: dict[str, ZoneInfo]
    names: dict[str, str]
    """Shop names, for a request that does not give `shop.name` itself."""
    policies: dict[str, rules.Policy]
    channels: dict[tuple[str, str], Channel]
    templates: dict[tuple[str, str], templates.Template]
    consents: dict[tuple[str, str], dict[str, bool | None]]
    suppressed: dict[tuple[str, str, str], str]
    secrets: dict[str, str]
    """Link-signing secrets of the shops with marketing requests in the batch."""
    public_base: str

    def channel(self, shop: str, channel: str) -> Channel:
        return self.channels.get((shop, channel), OUTBOX)


def send_timer(shop: str, message_id: str, due: datetime) -> Timer:
    return Timer(timer_key(shop, "msg", message_id), SEND_TIMER, shop, due, {"m": message_id})


async def load_context(
    conn: AsyncConnection,
    wanted: list[tuple[str, NotificationRequestedData]],
    *,
    public_base: str,
    now: datetime,
    defaults: Mapping[str, Channel] | None = None,
) -> Context:
    shop_ids = sorted({shop for shop, _ in wanted})
    zones: dict[str, ZoneInfo] = {}
    shop_names: dict[str, str] = {}
    for shop, zone, name in await conn.execute(
        select(shops.c.shop_id, shops.c.timezone, shops.c.name).where(shops.c.shop_id.in_(shop_ids))
    ):
        zones[shop] = ZoneInfo(zone) if zone else ZoneInfo("UTC")
        shop_names[shop] = name
    found_policies = await load_policies(conn, shop_ids)
    found_channels = await load_channels(conn, shop_ids, defaults)
    names = {(shop, d.template) for shop, d in wanted}
    found_templates = {}
    for where in by_shop(template_rows, "name", names):
        for shop, name, text in await conn.execute(
            select(template_rows.c.shop_id, template_rows.c.name, template_rows.c.definition).where(
                where
            )
        ):
            found_templates[(shop, name)] = templates.Template.model_validate_json(text)
    people = {(shop, d.customer_id) for shop, d in wanted}
    found_consents: dict[tuple[str, str], dict[str, bool | None]] = {}
    for where in by_shop(consents, "customer_id", people):
        for row in await conn.execute(select(consents).where(where)):
            found_consents[(row.shop_id, row.customer_id)] = {"sms": row.sms, "email": row.email}
    addresses = {(shop, d.to) for shop, d in wanted if d.to}
    found_suppressed = {}
    for where in by_shop(suppressions, "address", addresses):
        for row in await conn.execute(select(suppressions).where(where)):
            found_suppressed[(row.shop_id, row.channel, row.address)] = row.reason
    marketing = {shop for shop, d in wanted if _category(d) == "marketing"}
    return Context(
        zones,
        shop_names,
        found_policies,
        found_channels,
        found_templates,
        found_consents,
        found_suppressed,
        await links.shop_secrets(conn, marketing, now=now),
        public_base,
    )


def _category(data: NotificationRequestedData) -> rules.Category:
    return (
        "marketing" if (data.model_extra or {}).get("category") == "marketing" else "transactional"
    )


async def accept(
    conn: AsyncConnection,
    events: list[Envelope],
    *,
    namespace: str,
    now: datetime,
    public_base: str,
    defaults: Mapping[str, Channel] | None = None,
) -> None:
    """Turn a batch of requests into messages (see the module docstring); `defaults` are
    the platform's channels for shops that configured none (`config.default_channels`)."""
    wanted: dict[tuple[str, str], tuple[Envelope, NotificationRequestedData]] = {}
    for event in events:
        if event.type != "notification.requested":
            continue
        data = NotificationRequestedData.model_validate(event.data)
        wanted.setdefault(
            (event.shop_id, message_id_of(event.shop_id, data.idempotency_key)), (event, data)
        )
    if not wanted:
        return
    for where in by_shop(messages, "message_id", wanted):
        for shop, message_id in await conn.execute(
            select(messages.c.shop_id, messages.c.message_id).where(where)
        ):
            wanted.pop((shop, message_id), None)  # requested before: nothing to do
    if not wanted:
        return
    context = await load_context(
        conn,
        [(e.shop_id, d) for e, d in wanted.values()],
        public_base=public_base,
        now=now,
        defaults=defaults,
    )
    rows: list[dict[str, Any]] = []
    changes: list[Change] = []
    due: list[Timer] = []
    for (shop, message_id), (event, data) in sorted(wanted.items()):
        row, reason, status, at = _decide(context, shop, message_id, event, data, now)
        rows.append(row)
        changes.append(Change(shop, message_id, status, reason, now, row))
        if at is not None:
            due.append(send_timer(shop, message_id, at))
    await conn.execute(insert(messages), rows)
    await record(conn, changes, namespace=namespace, first=True)
    await schedule(conn, due)


def _decide(
    context: Context,
    shop: str,
    message_id: str,
    event: Envelope,
    data: NotificationRequestedData,
    now: datetime,
) -> tuple[dict[str, Any], str | None, str, datetime | None]:
    """The new message's row, and its first status: (row, reason, status, send at)."""
    extra = data.model_extra or {}
    category = _category(data)
    channel = context.channel(shop, data.channel)
    policy = context.policies[shop]
    row: dict[str, Any] = {
        "shop_id": shop,
        "message_id": message_id,
        "idempotency_key": data.idempotency_key,
        "customer_id": data.customer_id,
        "journey_id": extra.get("journey_id"),
        "channel": data.channel,
        "category": category,
        "template": data.template,
        "locale": None,
        "provider": channel.provider,
        "fallback_used": False,
        "recipient": data.to,
        "subject": None,
        "body": None,
        "html": None,
        "provider_template": None,
        "status": "queued",
        "reason": None,
        "provider_message_id": None,
        "attempts": 0,
        "sending_since": None,
        "created_at": now,
        "updated_at": now,
    }

    def stop(status: str, reason: str) -> tuple[dict[str, Any], str | None, str, None]:
        row["status"], row["reason"] = status, reason
        return row, reason, status, None

    if not data.to:
        return stop("suppressed", "no_address")
    held = context.suppressed.get((shop, data.channel, data.to))
    if held is not None and (category == "marketing" or held not in rules.MARKETING_ONLY):
        return stop("suppressed", f"suppressed:{held}")
    consent = context.consents.get((shop, data.customer_id), {}).get(data.channel)
    refused = rules.consent_reason(policy, category, consent)
    if refused is not None:
        return stop("suppressed", refused)
    template = context.templates.get((shop, data.template))
    if template is None:
        return stop("failed", "template_missing")
    if template.channel != data.channel:
        return stop("failed", "template_channel_mismatch")
    locale = str(extra.get("locale") or policy.locale)
    variables = dict(data.variables)
    given_shop = variables.get("shop")
    if not (isinstance(given_shop, dict) and given_shop.get("name")) and shop in context.names:
        variables["shop"] = {"name": context.names[shop]}
    if category == "marketing":
        secret = context.secrets[shop]
        variables["unsubscribe_url"] = links.unsubscribe_url(
            context.public_base, secret, shop, message_id
        )
    try:
        rendered = templates.render(template, locale, variables, category=category)
    except TemplateError as exc:
        return stop("failed", f"template_error: {exc}"[:300])
    row["locale"] = rendered.locale
    row["subject"] = rendered.subject
    row["body"] = rendered.text
    row["html"] = rendered.html
    if rendered.provider:
        # Every provider's, so a failover to the fallback sends its own approved template.
        row["provider_template"] = orjson.dumps(
            {name: {"id": t.id, "params": t.params} for name, t in rendered.provider.items()}
        ).decode()
    zone = _recipient_zone(extra.get("timezone")) or context.zones.get(shop, ZoneInfo("UTC"))
    until = rules.quiet_until(policy, category, zone, now)
    if until is not None:
        row["status"], row["reason"] = "deferred", "quiet_hours"
        return row, "quiet_hours", "deferred", until
    return row, None, "queued", now


def _recipient_zone(name: object) -> ZoneInfo | None:
    """The recipient's own timezone where the request names a valid one (quiet hours are
    theirs); None sends the caller to the shop's."""
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        return None
    try:
        return ZoneInfo(name)
    except (ValueError, OSError, ZoneInfoNotFoundError):
        return None

"""The events lifecycle emits when a customer changes: stage, level, tags, merges."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson

from libs.common.bus import Message
from libs.common.events import SCHEMA_VERSION, topic_for

SOURCE = "huitou/lifecycle"
MAX_ID = 200
"""The envelope's bound on `id` (`libs.common.events.NonEmpty`)."""

CustomerKey = tuple[str, str]


def change_event(
    type_: str,
    key: CustomerKey,
    now: datetime,
    namespace: str,
    data: dict[str, Any],
    *,
    discriminator: str,
) -> Message:
    """The event as `new_event(…).to_bytes()` would serialise it (same fields, order and
    formats; `data` without its None fields), written directly: these are built by the
    thousand per batch, from values the database already holds."""
    id_ = f"{type_}:{key[0]}:{key[1]}:{discriminator}:{now.isoformat()}"
    if len(id_) > MAX_ID:
        # Long customer ids or tag names: keep the id within the envelope's bound, unique.
        id_ = f"{type_}:{key[0]}:{hashlib.sha256(id_.encode()).hexdigest()}"
    value = orjson.dumps(
        {
            "specversion": "1.0",
            "id": id_,
            "source": SOURCE,
            "type": type_,
            "time": now.astimezone(UTC),
            "shop_id": key[0],
            "subject": key[1],
            "schema_version": SCHEMA_VERSION,
            "data": {name: v for name, v in data.items() if v is not None},
        },
        option=orjson.OPT_UTC_Z,
    )
    return Message(
        topic_for(type_, namespace),
        f"{key[0]}:{key[1]}",
        value,
        {"ce_id": id_, "ce_type": type_},
    )


def tag_event(type_: str, key: CustomerKey, tag: str, now: datetime, namespace: str) -> Message:
    """`customer.tag_added` / `customer.tag_removed` for one customer and tag."""
    return change_event(
        type_, key, now, namespace, {"customer_id": key[1], "tag": tag}, discriminator=tag
    )

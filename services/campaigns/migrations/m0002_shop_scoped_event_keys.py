"""Processed-event ids carry the shop (`shop_id|source|id`)."""

from alembic.operations import Operations

from libs.common.db.tables import widen_event_keys


def upgrade(op: Operations) -> None:
    widen_event_keys(op)

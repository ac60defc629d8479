"""Event dedupe keys carry the shop (`shop_id|source|id`), in the inbox and the ledger."""

from alembic.operations import Operations
from sqlalchemy import String

from libs.common.db.tables import EVENT_KEY_LENGTH, widen_event_keys


def upgrade(op: Operations) -> None:
    widen_event_keys(op)
    with op.batch_alter_table("ingest_ledger") as batch:
        batch.alter_column("dedupe_key", type_=String(EVENT_KEY_LENGTH))

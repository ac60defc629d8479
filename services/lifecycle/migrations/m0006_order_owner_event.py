"""The event that named an order's owner (`orders.owner_event`): among events of the same
identity strength and the same time, the smaller event id owns the order, whatever order
they arrive in."""

from alembic.operations import Operations
from sqlalchemy import Column, String


def upgrade(op: Operations) -> None:
    with op.batch_alter_table("orders") as batch:
        batch.add_column(Column("owner_event", String(200)))

"""Customers' repurchase figures, as lifecycle announces them (`customer.prediction_changed`),
for journey conditions.

m0003 creates campaigns' tables from the current models, so a database made after this
change has the columns already; one made before gets them here."""

from alembic.operations import Operations
from sqlalchemy import Column, Float, inspect

from libs.common.db.types import UtcDateTime


def upgrade(op: Operations) -> None:
    present = {c["name"] for c in inspect(op.get_bind()).get_columns("campaign_customers")}
    wanted = [
        Column("p_alive", Float),
        Column("expected_purchases_90d", Float),
        Column("next_purchase_at", UtcDateTime()),
    ]
    missing = [column for column in wanted if column.name not in present]
    if missing:
        with op.batch_alter_table("campaign_customers") as batch:
            for column in missing:
                batch.add_column(column)

"""Repurchase predictions: each customer's purchase-day summary and figures, and each
shop's fitted model (or the reason it could not be fitted), and forecasts kept to be
shown beside what happened."""

from alembic.operations import Operations
from sqlalchemy import Column, Float, Integer, String, Text

from libs.common.db.types import UtcDateTime


def upgrade(op: Operations) -> None:
    with op.batch_alter_table("customers") as batch:
        batch.add_column(Column("purchase_days", Integer, nullable=False, server_default="0"))
        batch.add_column(Column("first_purchase_day", Integer))
        batch.add_column(Column("last_purchase_day", Integer))
        batch.add_column(Column("p_alive", Float))
        batch.add_column(Column("expected_purchases_90d", Float))
        batch.add_column(Column("next_purchase_at", UtcDateTime()))
    op.create_index("ix_customers_shop_p_alive", "customers", ["shop_id", "p_alive"])
    op.create_index(
        "ix_customers_shop_expected", "customers", ["shop_id", "expected_purchases_90d"]
    )
    op.create_table(
        "repurchase_models",
        Column("shop_id", String(64), primary_key=True),
        Column("status", String(16), nullable=False),
        Column("reason", Text),
        Column("params", Text),
        Column("spend", Text),
        Column("customers", Integer, nullable=False, server_default="0"),
        Column("repeat_buyers", Integer, nullable=False, server_default="0"),
        Column("log_likelihood", Float),
        Column("calibration_end", UtcDateTime(), nullable=False),
        Column("fitted_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "returning_forecasts",
        Column("shop_id", String(64), primary_key=True),
        Column("window_from", UtcDateTime(), primary_key=True),
        Column("window_to", UtcDateTime(), primary_key=True),
        Column("forecast", Text, nullable=False),
    )

"""Customers and orders projection, plus the shared plumbing tables."""

from alembic.operations import Operations
from sqlalchemy import BigInteger, Boolean, Column, Integer, String

from libs.common.db.tables import create_common_tables
from libs.common.db.types import UtcDateTime


def upgrade(op: Operations) -> None:
    create_common_tables(op)
    op.create_table(
        "customers",
        Column("shop_id", String(64), primary_key=True),
        Column("customer_id", String(200), primary_key=True),
        Column("name", String(200)),
        Column("phone", String(32)),
        Column("email", String(320)),
        Column("first_seen_at", UtcDateTime(), nullable=False),
        Column("last_interest_at", UtcDateTime()),
        Column("first_order_at", UtcDateTime()),
        Column("last_order_at", UtcDateTime()),
        Column("frequency", Integer, nullable=False, server_default="0"),
        Column("monetary_minor", BigInteger, nullable=False, server_default="0"),
        Column("currency", String(3)),
        Column("stage", String(32), nullable=False, server_default="prospect"),
        Column("stage_changed_at", UtcDateTime()),
        Column("is_returning", Boolean, nullable=False, server_default="0"),
        Column("member_level", String(16)),
    )
    op.create_index("ix_customers_shop_stage", "customers", ["shop_id", "stage"])
    op.create_index("ix_customers_shop_last_order", "customers", ["shop_id", "last_order_at"])
    op.create_table(
        "orders",
        Column("shop_id", String(64), primary_key=True),
        Column("order_id", String(200), primary_key=True),
        Column("customer_id", String(200), nullable=False),
        Column("status", String(16), nullable=False),
        Column("total_minor", BigInteger),
        Column("currency", String(3)),
        Column("refunded_minor", BigInteger, nullable=False, server_default="0"),
        Column("item_count", Integer, nullable=False, server_default="0"),
        Column("shipping_province", String(100)),
        Column("shipping_city", String(100)),
        Column("created_at", UtcDateTime()),
        Column("paid_at", UtcDateTime()),
        Column("shipped_at", UtcDateTime()),
        Column("completed_at", UtcDateTime()),
        Column("cancelled_at", UtcDateTime()),
        Column("refunded_at", UtcDateTime()),
        Column("data_time", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_orders_shop_customer", "orders", ["shop_id", "customer_id"])

"""Tables the lifecycle service owns: customers with their RFM and stage, and orders."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

from libs.common.db.types import UtcDateTime

metadata = MetaData()

customers = Table(
    "customers",
    metadata,
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
    Index("ix_customers_shop_stage", "shop_id", "stage"),
    Index("ix_customers_shop_last_order", "shop_id", "last_order_at"),
)

orders = Table(
    "orders",
    metadata,
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
    Index("ix_orders_shop_customer", "shop_id", "customer_id"),
)
"""One row per order whatever the order its events arrive in: per-status times keep the
earliest time seen, descriptive fields come from the newest event, refunds add up."""

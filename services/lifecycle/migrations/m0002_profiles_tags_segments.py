"""Profiles (identities, place, source, merges), tags, segments, notes, stage history,
per-shop policies and tracking numbers."""

from alembic.operations import Operations
from sqlalchemy import BigInteger, Column, Integer, String, Text

from libs.common.db.tables import BigId
from libs.common.db.types import UtcDateTime


def upgrade(op: Operations) -> None:
    with op.batch_alter_table("customers") as batch:
        batch.add_column(Column("item_count", Integer, nullable=False, server_default="0"))
        batch.add_column(Column("aov_minor", BigInteger, nullable=False, server_default="0"))
        batch.add_column(Column("province", String(100)))
        batch.add_column(Column("city", String(100)))
        batch.add_column(Column("source", String(64)))
        batch.add_column(Column("merged_into", String(200)))
    op.create_index("ix_customers_shop_city", "customers", ["shop_id", "city"])
    op.create_index("ix_customers_shop_level", "customers", ["shop_id", "member_level"])

    op.create_table(
        "customer_identities",
        Column("shop_id", String(64), primary_key=True),
        Column("kind", String(8), primary_key=True),
        Column("value", String(320), primary_key=True),
        Column("customer_id", String(200), nullable=False),
    )
    op.create_table(
        "order_tracking",
        Column("shop_id", String(64), primary_key=True),
        Column("order_id", String(200), primary_key=True),
        Column("tracking_number", String(100), primary_key=True),
        Column("carrier", String(64)),
        Column("status", String(32)),
        Column("updated_at", UtcDateTime()),
    )
    op.create_table(
        "stage_history",
        Column("id", BigId, primary_key=True, autoincrement=True),
        Column("shop_id", String(64), nullable=False),
        Column("customer_id", String(200), nullable=False),
        Column("at", UtcDateTime(), nullable=False),
        Column("previous", String(32)),
        Column("current", String(32), nullable=False),
    )
    op.create_index("ix_stage_history_customer", "stage_history", ["shop_id", "customer_id"])
    op.create_table(
        "customer_notes",
        Column("id", BigId, primary_key=True, autoincrement=True),
        Column("shop_id", String(64), nullable=False),
        Column("customer_id", String(200), nullable=False),
        Column("at", UtcDateTime(), nullable=False),
        Column("text", Text, nullable=False),
    )
    op.create_index("ix_customer_notes_customer", "customer_notes", ["shop_id", "customer_id"])
    op.create_table(
        "tags",
        Column("shop_id", String(64), primary_key=True),
        Column("name", String(64), primary_key=True),
        Column("kind", String(8), nullable=False),
        Column("rule", Text),
        Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "customer_tags",
        Column("shop_id", String(64), primary_key=True),
        Column("customer_id", String(200), primary_key=True),
        Column("tag", String(64), primary_key=True),
        Column("assigned_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_customer_tags_tag", "customer_tags", ["shop_id", "tag"])
    op.create_table(
        "segments",
        Column("shop_id", String(64), primary_key=True),
        Column("segment_id", String(64), primary_key=True),
        Column("name", String(200), nullable=False),
        Column("filter", Text, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "shop_policies",
        Column("shop_id", String(64), primary_key=True),
        Column("policy", Text, nullable=False),
        Column("updated_at", UtcDateTime(), nullable=False),
    )

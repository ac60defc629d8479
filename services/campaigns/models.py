"""Tables the campaigns service owns: journeys and their versions, enrollments, the
re-entry ledger, requested messages, report counters, consumer watermarks and the
projection of what journeys need from the domain topics (customers, orders, parcels).

Every table leads with `shop_id`; nothing here is read by another service."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from libs.common.db.types import UtcDateTime

metadata = MetaData()

journeys = Table(
    "journeys",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("journey_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("category", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    Column("playbook", String(64)),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("status_reason", String(200)),
)

journey_versions = Table(
    "journey_versions",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("journey_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("definition", Text, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    # When this version began admitting: only events at or after it enroll.
    Column("active_since", UtcDateTime()),
)

enrollments = Table(
    "enrollments",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("enrollment_id", String(40), primary_key=True),
    Column("journey_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("customer_id", String(200), nullable=False),
    Column("order_id", String(200)),
    # `waiting` (on a timer), `held` (came due while its journey was paused),
    # `completed` (ran out of steps) or `exited` (a goal, an exit step, archive).
    Column("status", String(16), nullable=False),
    Column("step_id", String(40)),
    Column("due_at", UtcDateTime()),
    Column("held_out", Boolean, nullable=False),
    Column("context", Text, nullable=False),
    Column("entered_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("exit_reason", String(100)),
    Column("converted_at", UtcDateTime()),
    Column("revenue_minor", BigInteger),
    Column("messaged", Boolean, nullable=False, server_default="0"),
    Index("ix_enrollments_journey_status", "shop_id", "journey_id", "status"),
    Index("ix_enrollments_order", "shop_id", "order_id"),
    Index("ix_enrollments_customer", "shop_id", "customer_id"),
)

entries = Table(
    "journey_entries",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("journey_id", String(64), primary_key=True),
    Column("entry_key", String(220), primary_key=True),  # `c:<customer>` or `o:<order>`
    Column("last_entered_at", UtcDateTime(), nullable=False),
)

counters = Table(
    "journey_counters",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("journey_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("name", String(120), primary_key=True),
    Column("n", BigInteger, nullable=False),
)

sends = Table(
    "journey_sends",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("idempotency_key", String(200), primary_key=True),
    Column("journey_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("enrollment_id", String(40), nullable=False),
    Column("customer_id", String(200), nullable=False),
    Column("category", String(16), nullable=False),
    Column("channel", String(8), nullable=False),
    Column("requested_at", UtcDateTime(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", String(200)),
    Index("ix_journey_sends_customer", "shop_id", "customer_id", "requested_at"),
)

watermarks = Table(
    "consumer_watermarks",
    metadata,
    Column("consumer", String(100), primary_key=True),
    Column("topic", String(200), primary_key=True),
    Column("partition", Integer, primary_key=True),
    # Every message appended to the partition before this instant (epoch seconds) has
    # been handled by the consumer group.
    Column("through", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

customers = Table(
    "campaign_customers",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("customer_id", String(200), primary_key=True),
    Column("name", String(200)),
    Column("phone", String(32)),
    Column("email", String(320)),
    Column("stage", String(32)),
    Column("level", String(16)),
    Column("tags", Text, nullable=False, server_default="[]"),
    Column("is_returning", Boolean),
    Column("city", String(100)),
    Column("province", String(100)),
    Column("merged_into", String(200)),
    Column("updated_at", UtcDateTime(), nullable=False),
    # What campaigns itself saw: paid orders (count, sum), last purchase, last cart.
    Column("purchases", Integer, nullable=False, server_default="0"),
    Column("spent_minor", BigInteger, nullable=False, server_default="0"),
    Column("last_purchase_at", UtcDateTime()),
    Column("last_cart_at", UtcDateTime()),
    # Lifecycle's repurchase figures (`customer.prediction_changed`).
    Column("p_alive", Float),
    Column("expected_purchases_90d", Float),
    Column("next_purchase_at", UtcDateTime()),
)

promotions = Table(
    "promotions",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("promotion_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("starts_at", UtcDateTime(), nullable=False),
    Column("ends_at", UtcDateTime(), nullable=False),
    Column("skus", Text, nullable=False, server_default="[]"),
    Column("created_at", UtcDateTime(), nullable=False),
)

orders = Table(
    "campaign_orders",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("order_id", String(200), primary_key=True),
    Column("customer_id", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    # Every status the order has reached (a goal met before an enrollment starts).
    Column("statuses", Text, nullable=False, server_default="[]"),
    Column("total_minor", BigInteger),
    Column("currency", String(3)),
    Column("city", String(100)),
    Column("province", String(100)),
    Column("skus", Text, nullable=False, server_default="[]"),
    Column("item_count", Integer),
    Column("paid_at", UtcDateTime()),
    Column("updated_at", UtcDateTime(), nullable=False),
)

parked = Table(
    "parked_parcel_events",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("tracking_number", String(100), primary_key=True),
    Column("event_key", String(600), primary_key=True),
    Column("event", Text, nullable=False),
    Column("parked_at", UtcDateTime(), nullable=False),
)
"""Carrier updates that named a waybill no order had named yet, until one does."""

parcels = Table(
    "campaign_parcels",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("tracking_number", String(100), primary_key=True),
    Column("order_id", String(200), nullable=False),
    Column("carrier", String(64)),
)

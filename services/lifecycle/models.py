"""Tables the lifecycle service owns: customers with their RFM and stage, and orders."""

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

from libs.common.db.tables import BigId
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
    Column("item_count", BigInteger, nullable=False, server_default="0"),
    Column("aov_minor", BigInteger, nullable=False, server_default="0"),
    Column("province", String(100)),
    Column("city", String(100)),
    Column("source", String(200)),
    Column("merged_into", String(200)),
    Column("name_at", UtcDateTime()),
    Column("phone_at", UtcDateTime()),
    Column("email_at", UtcDateTime()),
    Column("purchase_days", Integer, nullable=False, server_default="0"),
    Column("first_purchase_day", Integer),
    Column("last_purchase_day", Integer),
    Column("p_alive", Float),
    Column("expected_purchases_90d", Float),
    Column("next_purchase_at", UtcDateTime()),
    Index("ix_customers_shop_stage", "shop_id", "stage"),
    Index("ix_customers_shop_last_order", "shop_id", "last_order_at"),
    Index("ix_customers_shop_city", "shop_id", "city"),
    Index("ix_customers_shop_level", "shop_id", "member_level"),
    Index("ix_customers_shop_p_alive", "shop_id", "p_alive"),
    Index("ix_customers_shop_expected", "shop_id", "expected_purchases_90d"),
)
"""One row per customer; `merged_into` marks a profile folded into another (kept so its
identities resolve), and merged rows are left out of every list and figure.

`purchase_days`, `first_purchase_day` and `last_purchase_day` summarise its purchases for the
repurchase model (calendar days in the shop's time zone, counted from 1970-01-01; an order
refunded in full is no purchase); `p_alive`, `expected_purchases_90d` and
`next_purchase_at` are its figures under the shop's current model (null without one)."""

repurchase_models = Table(
    "repurchase_models",
    metadata,
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
"""Each shop's latest repurchase fit: `status` `fitted` with `params` (BG/NBD, JSON) and
`spend` (Gamma-Gamma, JSON, or its refusal), or `refused` with the `reason`."""

returning_forecasts = Table(
    "returning_forecasts",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("window_from", UtcDateTime(), primary_key=True),
    Column("window_to", UtcDateTime(), primary_key=True),
    Column("forecast", Text, nullable=False),
)
"""The latest forecast of returning customers' purchases made before each window began
(JSON), shown beside the actual count once it has."""

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
    Column("item_count", Integer),
    Column("shipping_province", String(100)),
    Column("shipping_city", String(100)),
    Column("created_at", UtcDateTime()),
    Column("paid_at", UtcDateTime()),
    Column("shipped_at", UtcDateTime()),
    Column("completed_at", UtcDateTime()),
    Column("cancelled_at", UtcDateTime()),
    Column("refunded_at", UtcDateTime()),
    Column("data_time", UtcDateTime(), nullable=False),
    Column("owner_rank", Integer, nullable=False, server_default="0"),
    Column("owner_at", UtcDateTime()),
    Column("owner_event", String(200)),
    Column("total_at", UtcDateTime()),
    Column("items_at", UtcDateTime()),
    Column("shipping_at", UtcDateTime()),
    Index("ix_orders_shop_customer", "shop_id", "customer_id"),
)
"""One row per order whatever the order its events arrive in (`orders.ORDER_MERGE`); each
`*_at` beside a group of columns is the time of the event the group came from, and
`owner_rank`/`owner_at`/`owner_event` say how strongly, when and by which event the owner
was named."""

customer_identities = Table(
    "customer_identities",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("kind", String(8), primary_key=True),
    Column("value", String(320), primary_key=True),
    Column("customer_id", String(200), nullable=False),
)
"""Which customer a platform id, phone or email belongs to (kind: id, phone, email)."""

order_tracking = Table(
    "order_tracking",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("order_id", String(200), primary_key=True),
    Column("tracking_number", String(100), primary_key=True),
    Column("carrier", String(64)),
    Column("status", String(32)),
    Column("updated_at", UtcDateTime()),
)

parcels = Table(
    "parcels",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("tracking_number", String(100), primary_key=True),
    Column("status", String(32), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
)
"""The newest carrier status of each parcel, known even before its order is."""

stage_history = Table(
    "stage_history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("shop_id", String(64), nullable=False),
    Column("customer_id", String(200), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("previous", String(32)),
    Column("current", String(32), nullable=False),
    Index("ix_stage_history_customer", "shop_id", "customer_id"),
)

customer_notes = Table(
    "customer_notes",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("shop_id", String(64), nullable=False),
    Column("customer_id", String(200), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("text", Text, nullable=False),
    Index("ix_customer_notes_customer", "shop_id", "customer_id"),
)

tags = Table(
    "tags",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("rule", Text),
    Column("created_at", UtcDateTime(), nullable=False),
)
"""kind `manual` (assigned by API) or `auto` (membership follows `rule`, a JSON rule)."""

customer_tags = Table(
    "customer_tags",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("customer_id", String(200), primary_key=True),
    Column("tag", String(64), primary_key=True),
    Column("assigned_at", UtcDateTime(), nullable=False),
    Index("ix_customer_tags_tag", "shop_id", "tag"),
)

segments = Table(
    "segments",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("segment_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("filter", Text, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

shop_policies = Table(
    "shop_policies",
    metadata,
    Column("shop_id", String(64), primary_key=True),
    Column("policy", Text, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

"""Order owners by identity strength, per-group event times (arrival-order free merges),
parcels parked before their order, shop-scoped processed-event ids."""

from alembic.operations import Operations
from sqlalchemy import BigInteger, Column, Integer, String, case, column, table

from libs.common.db.tables import widen_event_keys
from libs.common.db.types import UtcDateTime


def upgrade(op: Operations) -> None:
    widen_event_keys(op)
    with op.batch_alter_table("orders") as batch:
        batch.alter_column("item_count", existing_type=Integer, nullable=True)
        batch.add_column(Column("owner_rank", Integer, nullable=False, server_default="0"))
        batch.add_column(Column("owner_at", UtcDateTime()))
        batch.add_column(Column("total_at", UtcDateTime()))
        batch.add_column(Column("items_at", UtcDateTime()))
        batch.add_column(Column("shipping_at", UtcDateTime()))
    with op.batch_alter_table("customers") as batch:
        # A customer's items add up over orders of up to 5e7 items each: int32 is too small.
        batch.alter_column("item_count", existing_type=Integer, type_=BigInteger)
        batch.add_column(Column("name_at", UtcDateTime()))
        batch.add_column(Column("phone_at", UtcDateTime()))
        batch.add_column(Column("email_at", UtcDateTime()))
    # Rows written before: their owner counts as named by a platform id when the order
    # arrived, and each group as of the order's newest event.
    orders = table(
        "orders",
        *map(column, ("owner_rank", "owner_at", "total_at", "items_at", "shipping_at")),
        *map(column, ("data_time", "total_minor", "item_count", "shipping_city")),
        column("shipping_province"),
    )
    t = orders.c
    shipped_to = t.shipping_city.is_not(None) | t.shipping_province.is_not(None)
    op.execute(
        orders.update().values(
            owner_rank=3,
            owner_at=t.data_time,
            total_at=case((t.total_minor.is_not(None), t.data_time)),
            items_at=case((t.item_count > 0, t.data_time)),
            shipping_at=case((shipped_to, t.data_time)),
        )
    )
    customers = table(
        "customers",
        *map(column, ("name", "phone", "email", "name_at", "phone_at", "email_at")),
        column("first_seen_at"),
    )
    c = customers.c
    op.execute(
        customers.update().values(
            name_at=case((c.name.is_not(None), c.first_seen_at)),
            phone_at=case((c.phone.is_not(None), c.first_seen_at)),
            email_at=case((c.email.is_not(None), c.first_seen_at)),
        )
    )
    op.create_table(
        "parcels",
        Column("shop_id", String(64), primary_key=True),
        Column("tracking_number", String(100), primary_key=True),
        Column("status", String(32), nullable=False),
        Column("at", UtcDateTime(), nullable=False),
    )

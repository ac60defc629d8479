"""A service database with only the shared plumbing tables, for libs/common tests."""

from alembic.operations import Operations

from libs.common.db.tables import create_common_tables


def upgrade(op: Operations) -> None:
    create_common_tables(op)

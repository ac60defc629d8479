"""Journeys, versions, enrollments, the re-entry ledger, sends, report counters, consumer
watermarks and the projection of customers, orders and parcels (`services.campaigns.models`
as of this version). A later change to those tables comes with a migration of its own that
alters them; before changing `models.py`, freeze the affected tables' definitions here."""

from alembic.operations import Operations

from services.campaigns import models


def upgrade(op: Operations) -> None:
    models.metadata.create_all(op.get_bind())

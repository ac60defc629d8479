"""Each shop's secret for signing its unsubscribe links and provider callback URLs
(`services.notifier.models.secrets` as of this version)."""

from alembic.operations import Operations

from services.notifier import models


def upgrade(op: Operations) -> None:
    models.secrets.create(op.get_bind())

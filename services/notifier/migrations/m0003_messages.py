"""Channels, templates, consent, suppressions, policies, messages and their history, rate
buckets (`services.notifier.models` as of this version). A later change to those tables
comes with a migration of its own that alters them; before changing `models.py`, freeze
the affected tables' definitions here."""

from alembic.operations import Operations

from services.notifier import models


def upgrade(op: Operations) -> None:
    models.metadata.create_all(
        op.get_bind(),
        tables=[
            models.channels,
            models.templates,
            models.consents,
            models.suppressions,
            models.policies,
            models.messages,
            models.history,
            models.rate_buckets,
        ],
    )

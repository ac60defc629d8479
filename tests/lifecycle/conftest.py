"""Fixtures of the lifecycle tests that drive its handlers against its own database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.settings import Settings
from services.lifecycle import migrations


@pytest.fixture
async def lifecycle_db(settings: Settings) -> AsyncIterator[Database]:
    """Lifecycle's database, migrated, in each mode."""
    db = Database(settings.database_url_for("lifecycle"), "lifecycle")
    await migrate(db, migrations)
    yield db
    await db.dispose()

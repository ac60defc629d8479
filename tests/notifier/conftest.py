"""One notifier app per mode for each test module, a shop of its own per test (starting the app and
joining its consumer group is most of an in-process test's time)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import MODES, make_settings
from tests.notifier.harness import SHARED, Notifier, NotifierApp, serving_notifier
from tests.servers import Broker, fresh_database


@pytest.fixture(scope="module", params=MODES)
async def notifier_app(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NotifierApp]:
    workdir = tmp_path_factory.mktemp(f"notifier-{request.param}")
    if request.param == "embedded":
        settings = make_settings("embedded", workdir, **SHARED)
    else:
        pg = await fresh_database(request.getfixturevalue("pg_url"))
        broker: Broker = request.getfixturevalue("broker")
        settings = make_settings("distributed", workdir, pg=pg, bus=broker.url, **SHARED)
    async with serving_notifier(settings) as app:
        yield app


@pytest.fixture
async def n(notifier_app: NotifierApp) -> Notifier:
    return await notifier_app.new_shop()

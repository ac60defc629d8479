"""Against a broker that rejects the idempotent producer (the Tansu test broker does), the
bus refuses to start with one clear error naming `HUITOU_KAFKA_IDEMPOTENCE`, closes its
producer (no "Unclosed AIOKafkaProducer"), and a service exits non-zero with one line."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from libs.common.bus import BusConfigurationError, create_bus
from tests.conftest import make_settings
from tests.servers import Broker

pytestmark = pytest.mark.skipif(
    os.environ.get("HUITOU_TEST_KAFKA_IDEMPOTENCE") == "1",
    reason="the test broker accepts idempotent producers",
)


async def test_a_rejected_idempotent_producer_names_the_setting(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings("distributed", tmp_path, bus=broker.url, kafka_idempotence=True)
    bus = create_bus(settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with (
            caplog.at_level(logging.WARNING, logger="aiokafka"),
            pytest.raises(BusConfigurationError) as refused,
        ):
            await bus.start()
        del bus
        gc.collect()
    assert "HUITOU_KAFKA_IDEMPOTENCE=false" in str(refused.value)
    assert "idempotent" in str(refused.value)
    assert not [w for w in caught if "Unclosed" in str(w.message)]
    assert not [r for r in caplog.records if "Unexpected error" in r.getMessage()]


def test_a_service_exits_with_one_line_naming_the_setting(broker: Broker, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUITOU_")}
    env.update(
        HUITOU_DATA_DIR=str(tmp_path),
        HUITOU_ADMIN_KEY="test-admin-key",
        HUITOU_BUS_URL=broker.url,
        HUITOU_KAFKA_IDEMPOTENCE="true",
        PYTHONWARNINGS="always",
    )
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "notifier", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    mentions = [line for line in output.splitlines() if "HUITOU_KAFKA_IDEMPOTENCE" in line]
    assert len(mentions) == 1, output
    assert "Unclosed" not in output
    assert "Traceback" not in output
    assert "Unexpected error during InitProducerIdRequest" not in output

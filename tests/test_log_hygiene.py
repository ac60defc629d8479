"""The logs hold no personal data or secrets (see `tests/log_capture.py`).

The scanner is tested on planted leaks and on what the services' formatter writes; the
last test of the session scans every log written so far (the session's end scans again,
after the long-running processes have stopped, and fails the run on a leak)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from libs.common.logs import JsonFormatter
from tests.log_capture import known_secrets, scan_folder, scan_text


def test_the_scanner_finds_each_kind_of_leak() -> None:
    text = "\n".join(
        [
            "order for +8613800138000 placed",
            "guest 13912345678 again",
            "sent to fang.wang@example.com",
            "key hk_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_ab used",
            "rotated to shpss_planted_secret",
            "nothing here: 2026-11-11T00:00:05+08:00 order 1001 took 1731234567890 ms",
        ]
    )
    found = scan_text(text, ["shpss_planted_secret"])
    assert found == [
        (1, "phone number"),
        (2, "phone number"),
        (3, "email address"),
        (4, "API key"),
        (5, "secret or admin key"),
    ]


def test_what_the_services_log_is_masked() -> None:
    """A record carrying a phone and an email, in its message and its extra fields, comes
    out of the services' JSON formatter with neither in full."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.log_hygiene.sample")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning(
            "could not reach +8613800138000 or fang.wang@example.com",
            extra={"to": "13800138000", "customer": {"email": "li.lei@example.com"}},
        )
    finally:
        log.removeHandler(handler)
    assert scan_text(out.getvalue()) == [], out.getvalue()


def test_the_secrets_of_the_test_modules_are_known() -> None:
    from tests import test_fuzz, test_isolation

    secrets = known_secrets()
    assert set(test_fuzz.SECRETS.values()) <= secrets
    assert set(test_isolation.SECRETS_A.values()) <= secrets


def test_a_leak_fails_the_session() -> None:
    """A session whose logs leak ends with exit status 1 and names the file and line."""
    with tempfile.TemporaryDirectory() as folder:  # outside this session's folder
        _run_a_leaky_session(Path(folder))


def _run_a_leaky_session(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "from tests.log_capture import LogHygiene\n"
        "def pytest_configure(config):\n"
        "    config.pluginmanager.register(LogHygiene(config), 'huitou-log-hygiene')\n"
    )
    (tmp_path / "test_leaky.py").write_text(
        "def test_leaky(tmp_path):\n"
        "    (tmp_path / 'service.log').write_text('ok\\nsent to +8613800138000\\n')\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'session'}",
            str(tmp_path / "test_leaky.py"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "service.log:2: a full phone number" in done.stdout, done.stdout


@pytest.mark.log_hygiene_last
def test_no_log_written_so_far_holds_personal_data_or_secrets(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder: Path = tmp_path_factory.getbasetemp()
    leaks = scan_folder(folder, known_secrets())
    assert not leaks, "personal data or secrets in the logs:\n" + "\n".join(
        str(leak) for leak in leaks[:50]
    )

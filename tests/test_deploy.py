"""The distributed-mode descriptions, validated offline (no container engine runs here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.platform import SERVICES

ROOT = Path(__file__).resolve().parent.parent


def compose_is_valid(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_compose_file_follows_the_compose_spec() -> None:
    result = compose_is_valid(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  ingest:\n    ports: 8000\n    healthcheck: yes\n")
    assert compose_is_valid(broken).returncode != 0


def test_compose_runs_each_service_on_postgres_and_kafka() -> None:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    for name in SERVICES:
        service = services[name]
        assert service["command"] == ["huitou", "serve", name]
        env = service["environment"]
        assert env["HUITOU_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert env["HUITOU_BUS_URL"] == "kafka://kafka:9092"
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert {"postgres", "kafka"} <= set(services)

"""docker-compose.yml, checked offline: valid for Compose (its own loader, `docker-compose
config`, and the Compose specification's JSON schema), and in agreement with the code —
every `HUITOU_*` variable it sets is a setting and parses, every command is a real `huitou`
command, the services wait for the migration, Prometheus scrapes all four, Grafana's and
Prometheus's files exist, and the notifier's default email channel points at Mailpit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from libs.common.http import build_app
from libs.common.settings import Settings
from services.cli import build_parser
from services.platform import SERVICES
from tests.deploy.tools import ROOT, run, tool

HUITOU = set(SERVICES)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUITOU_", "GRAFANA_"))}
    out = run(
        tool("docker-compose"), "-f", "docker-compose.yml", "config", "--format", "json", env=env
    )
    config: dict[str, Any] = json.loads(out)
    return config


def spec_problems(path: Path) -> subprocess.CompletedProcess[str]:
    """The file against the Compose specification's JSON schema (check-jsonschema's copy),
    beside Compose's own loader above."""
    return subprocess.run(
        [
            sys.executable,
            *("-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"),
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_file_follows_the_compose_spec() -> None:
    result = spec_problems(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_spec_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  ingest:\n    ports: 8000\n    healthcheck: yes\n")
    assert spec_problems(broken).returncode != 0


def huitou_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == "huitou:local"}


def test_the_platform_is_all_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        *HUITOU,
        "migrate",
        "postgres",
        "kafka",
        "prometheus",
        "grafana",
        "mailpit",
    }
    assert set(huitou_services(compose)) == {*HUITOU, "migrate"}
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def test_every_command_is_a_real_huitou_command(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name, service in huitou_services(compose).items():
        command = service["command"]
        assert command[0] == "huitou", name
        args = parser.parse_args(command[1:])
        if name == "migrate":
            assert args.command == "migrate" and args.service is None  # every service
        else:
            assert (args.command, args.service) == ("serve", name)


def test_every_huitou_variable_is_a_setting_that_parses(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in huitou_services(compose).items():
        env = service["environment"]
        assert env, name
        for variable in env:
            assert variable.startswith("HUITOU_"), f"{name}: {variable}"
            field = variable.removeprefix("HUITOU_").lower()
            assert field in Settings.model_fields, f"{name}: {variable} is no setting"
        for key in [k for k in os.environ if k.startswith("HUITOU_")]:
            monkeypatch.delenv(key)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        settings = Settings()
        assert not settings.embedded_bus and settings.database_url
        assert settings.topic_partitions == Settings.model_fields["topic_partitions"].default
        # One broker: topics it can hold, as `migrate` creates them.
        assert settings.topic_replication_factor == settings.topic_min_insync_replicas == 1
        assert settings.admin_key


def test_services_wait_for_the_migration_and_are_checked_for_readiness(
    compose: dict[str, Any],
) -> None:
    services = huitou_services(compose)
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    paths = set(build_app(Settings(), [SERVICES["ingest"]]).openapi()["paths"])
    for name in HUITOU:
        service = services[name]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        check = " ".join(service["healthcheck"]["test"])
        assert "/readyz" in check and "/readyz" in paths
        (port,) = service["ports"]
        assert int(port["target"]) == Settings.model_fields["port"].default == 8000
    published = sorted(int(p["published"]) for n in HUITOU for p in services[n]["ports"])
    assert published == [8000, 8001, 8002, 8003]


def test_kafka_runs_in_kraft_mode_and_makes_no_topic_by_itself(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in " ".join(env)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # `huitou migrate` makes them
    bus = huitou_services(compose)["ingest"]["environment"]["HUITOU_BUS_URL"]
    assert bus == f"kafka://{env['KAFKA_ADVERTISED_LISTENERS'].split('//')[1]}"


def test_prometheus_scrapes_the_four_services_with_the_alert_rules(
    compose: dict[str, Any],
) -> None:
    prometheus = compose["services"]["prometheus"]
    mounted = _mounts(prometheus)
    config_dir = mounted["/etc/prometheus"]
    config = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert targets >= {f"{name}:8000" for name in HUITOU}
    for rules in config["rule_files"]:
        assert (config_dir / rules).is_file(), rules


def test_grafana_is_provisioned_from_the_repository(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounted = _mounts(grafana)
    provisioning = mounted["/etc/grafana/provisioning"]
    assert list((provisioning / "datasources").glob("*.yml"))
    assert list((provisioning / "dashboards").glob("*.yml"))
    dashboards = mounted["/var/lib/grafana/dashboards"]
    assert list(dashboards.glob("*.json"))
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / home.removeprefix("/var/lib/grafana/dashboards/")).is_file()


def test_the_notifier_sends_email_to_mailpit(compose: dict[str, Any]) -> None:
    env = huitou_services(compose)["notifier"]["environment"]
    smtp = json.loads(env["HUITOU_NOTIFIER_DEFAULT_SMTP"])
    assert (smtp["host"], smtp["port"], smtp["tls"]) == ("mailpit", 1025, "none")
    mailpit = compose["services"]["mailpit"]
    assert mailpit["image"].startswith("axllent/mailpit:")
    assert [int(p["target"]) for p in mailpit["ports"]] == [8025]  # its web UI


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → the repository path bound there (each must exist)."""
    found = {}
    for volume in service["volumes"]:
        if volume["type"] == "bind":
            source = Path(volume["source"])
            assert source.exists() and source.is_relative_to(ROOT), source
            assert volume.get("read_only"), f"{source} is mounted writable"
            found[volume["target"]] = source
    return found

"""The alert rules (deploy/prometheus/alerts.yml): valid for Prometheus (`promtool check
rules`), passing their unit tests (`promtool test rules` on alerts.test.yml, which must
cover every alert both firing and not), loaded by a valid Compose Prometheus config, the
same as the Kubernetes PrometheusRule, and each with a severity and the annotations an
on-call engineer needs, its runbook a section of docs/runbooks.md.

promtool is not on PyPI: `scripts/install-promtool.sh` (run by `make test`) puts it in
.venv/bin; without it these tests fail."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.promql import ALERTS, alert_rules, promtool
from tests.deploy.tools import ROOT, run

PROMETHEUS = ROOT / "deploy" / "prometheus"
UNIT_TESTS = PROMETHEUS / "alerts.test.yml"
CONFIG = PROMETHEUS / "prometheus.yml"
RULE = ROOT / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_URL = "https://github.com/huitou/huitou/blob/main/docs/runbooks.md#"
SERVICES = ("ingest", "lifecycle", "campaigns", "notifier")
SEVERITIES = {"critical", "warning", "info"}


def test_promtool_checks_the_rules() -> None:
    out = run(promtool(), "check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alert_rules())} rules found" in out, out


def test_the_rule_unit_tests_pass() -> None:
    run(promtool(), "test", "rules", str(UNIT_TESTS))


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert not names - fires, f"no unit test where these fire: {sorted(names - fires)}"
    assert not names - silent, f"no unit test where these stay silent: {sorted(names - silent)}"
    assert not (fires | silent) - names, f"tests of unknown alerts: {(fires | silent) - names}"


def test_the_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    # As mounted in Compose: the config and its rule file side by side.
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    out = run(promtool(), "check", "config", "prometheus.yml", cwd=tmp_path)
    assert "SUCCESS: 1 rule files found" in out, out

    config = yaml.safe_load(CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }
    assert jobs == {name: [f"{name}:8000"] for name in SERVICES}


def test_compose_mounts_the_config_where_it_says() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    for name in SERVICES:
        assert name in compose["services"], name


def test_the_prometheus_rule_has_the_same_groups() -> None:
    rule = yaml.safe_load(RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "huitou"
    labels = rule["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "huitou"
    assert labels["release"] == "prometheus"  # kube-prometheus-stack's default ruleSelector
    alerts = yaml.safe_load(ALERTS.read_text())
    assert rule["spec"]["groups"] == alerts["groups"], (
        "regenerate: .venv/bin/python deploy/prometheus/build_rule.py"
    )


def test_every_alert_has_a_severity_and_annotations() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Huitou[A-Z][A-Za-z0-9]+", name), name
        assert "for" in rule, f"{name}: no `for:` clause"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations: dict[str, Any] = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert str(annotations.get(key, "")).strip(), f"{name}: no {key}"


def test_every_runbook_url_is_a_section_of_the_runbooks() -> None:
    sections = runbook_sections()
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_URL), f"{rule['alert']}: {url}"
        anchor = url.removeprefix(RUNBOOK_URL)
        assert anchor in sections, f"{rule['alert']}: docs/runbooks.md has no #{anchor}"
        assert f"`{rule['alert']}`" in sections[anchor], (
            f"the runbook section #{anchor} does not name {rule['alert']}"
        )


def test_the_runbooks_own_links_resolve() -> None:
    sections = runbook_sections()
    for anchor in re.findall(r"\]\(#([^)]+)\)", RUNBOOKS.read_text()):
        assert anchor in sections, f"docs/runbooks.md links to a missing #{anchor}"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """Anchor → text of each heading's section in docs/runbooks.md."""
    sections: dict[str, list[str]] = {}
    anchor: str | None = None
    for line in RUNBOOKS.read_text().splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            anchor = slug(heading.group(1))
            sections.setdefault(anchor, [])
        elif anchor is not None:
            sections[anchor].append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}

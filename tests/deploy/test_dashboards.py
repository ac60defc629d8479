"""The Grafana dashboards (deploy/grafana/dashboards/*.json): exactly what
deploy/grafana/build.py writes now, every panel on the provisioned Prometheus datasource
with a title, a description and a query, a layout Grafana accepts (unique ids, panels on
the 24-column grid, none overlapping), queries that parse as PromQL (`promtool`), the
panels the operators need, and only metrics the services register (offline; the live
scrape is `tests/deploy/test_metrics.py`'s)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from deploy.grafana import build
from tests.deploy.promql import (
    DASHBOARDS,
    dashboard_expressions,
    dashboards,
    expressions,
    family,
    metric_names,
    names_in,
    panels,
    promtool,
)
from tests.deploy.tools import ROOT, run

PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DATASOURCE_UID = "prometheus"

REQUIRED = {
    "ingest rate by platform and outcome": "huitou_ingest_deliveries_total",
    "ingest latency by platform": "huitou_ingest_request_seconds",
    "consumer lag per group": "huitou_consumer_lag",
    "dead letters": "huitou_dead_letters_total",
    "lifecycle stage distribution": "huitou_lifecycle_customers",
    "lifecycle stage transitions": "huitou_lifecycle_stage_transitions_total",
    "journey enrollments": "huitou_campaigns_enrollments_total",
    "waits pending": "huitou_campaigns_waits_pending",
    "timer fire skew": "huitou_timer_fire_skew_seconds",
    "watermark lag": "huitou_campaigns_watermark_lag_seconds",
    "messages by channel and status": "huitou_notifier_messages_total",
    "provider calls by provider and outcome": "huitou_notifier_provider_calls_total",
    "provider call latency": "huitou_notifier_provider_call_seconds",
}
"""What the dashboards must show → the metric family that shows it."""


def test_the_committed_dashboards_are_what_build_writes() -> None:
    expected = build.rendered()
    committed = {p.name: p.read_text() for p in sorted(DASHBOARDS.glob("*.json"))}
    assert sorted(committed) == sorted(expected), "regenerate: python deploy/grafana/build.py"
    for name, text in expected.items():
        assert committed[name] == text, f"{name} is stale: python deploy/grafana/build.py"


def test_every_panel_has_the_datasource_a_title_a_description_and_a_query() -> None:
    for name, board in dashboards().items():
        found = list(panels(board))
        assert found, f"{name} has no panel"
        for panel in found:
            where = f"{name}: panel {panel.get('id')} {panel.get('title')!r}"
            assert str(panel.get("title", "")).strip(), f"{where}: no title"
            assert str(panel.get("description", "")).strip(), f"{where}: no description"
            assert panel.get("datasource", {}).get("uid") == DATASOURCE_UID, where
            targets = panel.get("targets", [])
            assert targets, f"{where}: no query"
            refs = [t.get("refId") for t in targets]
            assert len(set(refs)) == len(refs) and all(refs), f"{where}: refIds {refs}"
            for t in targets:
                assert str(t.get("expr", "")).strip(), f"{where}: a target has no expr"
                assert t.get("datasource", {}).get("uid") == DATASOURCE_UID, where


def test_the_dashboards_are_valid_for_grafana() -> None:
    uids: set[str] = set()
    for name, board in dashboards().items():
        assert board["uid"] not in uids, f"{name}: uid {board['uid']} used twice"
        uids.add(board["uid"])
        assert re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"]), f"{name}: uid {board['uid']}"
        assert name == f"{board['uid']}.json", name
        assert board.get("id") is None, f"{name}: provisioned dashboards carry no id"
        assert 36 <= board["schemaVersion"] <= 41, f"{name}: schemaVersion"
        assert str(board.get("title", "")).strip() and "huitou" in board["tags"], name
        ids = [panel.get("id") for panel in panels(board)]
        assert all(isinstance(i, int) for i in ids), f"{name}: panel ids {ids}"
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids {ids}"
        boxes: list[tuple[int, int, int, int, str]] = []
        for panel in panels(board):
            grid = panel.get("gridPos")
            assert isinstance(grid, dict), f"{name}: {panel['title']!r} has no gridPos"
            keys = ("h", "w", "x", "y")
            assert all(isinstance(grid.get(k), int) for k in keys), f"{name}: {grid}"
            h, w, x, y = (int(grid[k]) for k in keys)
            assert h > 0 and 0 < w <= 24 and x >= 0 and x + w <= 24 and y >= 0, (
                f"{name}: {panel['title']!r} is off the grid: {grid}"
            )
            for bx, by, bw, bh, other in boxes:
                overlap = x < bx + bw and bx < x + w and y < by + bh and by < y + h
                assert not overlap, f"{name}: {panel['title']!r} overlaps {other!r}"
            boxes.append((x, y, w, h, panel["title"]))


def test_the_home_dashboard_and_the_provisioning_agree() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    [source] = datasources["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "huitou.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path("/var/lib/grafana/dashboards")
    assert (DASHBOARDS / home.name).exists(), f"the home dashboard {home.name} is missing"


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    """Each query as a recording rule (Grafana's interval variables filled in), for promtool."""
    queries = dashboard_expressions()
    assert queries
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query_{n}:check", "expr": grafana_to_promql(expr)}
                    for n, expr in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run(promtool(), "check", "rules", str(path))
    assert f"SUCCESS: {len(queries)} rules found" in out, out


def grafana_to_promql(expr: str) -> str:
    for variable, value in (
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "6h"),
    ):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown variable in {expr}"
    return expr


def test_the_dashboards_show_what_operators_need() -> None:
    used = {family(n) for expr in dashboard_expressions() for n in names_in(expr)}
    missing = {what: name for what, name in REQUIRED.items() if name not in used}
    assert not missing, f"no dashboard shows: {missing}"


@pytest.fixture(scope="module")
def registered() -> set[str]:
    """Every `huitou_*` family the services register (counters with their `_total`)."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    import services.platform  # noqa: F401  (every service's metrics registered)

    found: set[str] = set()
    for collector in list(REGISTRY._collector_to_names):
        if isinstance(collector, MetricWrapperBase) and collector._name.startswith("huitou_"):
            kind = collector._type
            found.add(f"{collector._name}_total" if kind == "counter" else collector._name)
    return found


def test_dashboards_and_alerts_use_only_registered_metrics(registered: set[str]) -> None:
    used = metric_names()
    assert set(REQUIRED.values()) <= used
    unknown = sorted(used - registered)
    assert not unknown, f"not a metric of the services: {unknown}"


def test_metric_names_reads_families_not_label_values() -> None:
    assert names_in('sum by (le) (rate(huitou_a_seconds_bucket{x="huitou_b"}[5m]))') == {
        "huitou_a_seconds_bucket"
    }
    assert names_in("huitou:recorded:rate5m + huitou_c_total") == {"huitou_c_total"}
    assert family("huitou_a_seconds_bucket") == "huitou_a_seconds"
    assert family("huitou_a_seconds_count") == "huitou_a_seconds"
    assert family("huitou_a_seconds_sum") == "huitou_a_seconds"
    assert family("huitou_a_seconds_created") == "huitou_a_seconds"
    assert family("huitou_dead_letters_created") == "huitou_dead_letters_total"
    assert family("huitou_consumer_lag") == "huitou_consumer_lag"
    assert {"huitou_dead_letters_total", "huitou_ready"} <= metric_names()
    assert all(n.startswith("huitou_") for n in metric_names())
    assert len(expressions()) > len(dashboard_expressions())

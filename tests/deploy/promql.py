"""The PromQL the deployment ships: every expression of the alert rules
(deploy/prometheus/alerts.yml) and of the Grafana dashboards (deploy/grafana/dashboards),
and the `huitou_*` metric families they name (`tests/deploy/test_metrics.py` checks each
is in a live `/metrics` scrape)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import ROOT

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
"""PromQL string literals (label values such as `group=~"huitou_x"` are not metric names)."""
_NAMES = re.compile(r"(?<![A-Za-z0-9_:])huitou_[A-Za-z0-9_]*(?![A-Za-z0-9_:])")
"""`huitou_*` identifiers; recording rules' `level:metric:operation` names are left out."""
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum")
_UNIT_SUFFIXES = ("_seconds", "_bytes")


def promtool() -> str:
    """Prometheus' `promtool`: the virtualenv's (scripts/install-promtool.sh puts it there;
    `make test` runs that), else the PATH's. Missing, the calling test fails."""
    for candidate in (
        ROOT / ".venv" / "bin" / "promtool",
        Path(sys.executable).parent / "promtool",
    ):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: run `bash scripts/install-promtool.sh` (`make test` does) "
            "to put it in .venv/bin, or install Prometheus' promtool on the PATH",
            pytrace=False,
        )
    return found


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml, in order."""
    loaded = yaml.safe_load(ALERTS.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboards() -> dict[str, dict[str, Any]]:
    """File name → the committed dashboard."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The dashboard's panels, those inside rows included."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions() -> list[str]:
    return [
        str(t["expr"])
        for board in dashboards().values()
        for panel in panels(board)
        for t in panel.get("targets", [])
        if t.get("expr")
    ]


def expressions() -> list[str]:
    """Every PromQL expression of the alerts and the dashboards."""
    return [str(rule["expr"]) for rule in alert_rules()] + dashboard_expressions()


def family(name: str) -> str:
    """A sample name's family as a registry names it: `x_bucket`, `x_count`, `x_sum` → `x`;
    `x_created` → `x` for a histogram (named in a base unit, the project's convention) and
    `x_total` for a counter."""
    for suffix in _SERIES_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    if name.endswith("_created"):
        base = name.removesuffix("_created")
        return base if base.endswith(_UNIT_SUFFIXES) else f"{base}_total"
    return name


def names_in(expr: str) -> set[str]:
    """The `huitou_*` sample names an expression selects."""
    return set(_NAMES.findall(_STRINGS.sub('""', expr)))


def metric_names() -> set[str]:
    """Every `huitou_*` metric family the dashboards and the alerts use (counters with their
    `_total`, histograms by their base name)."""
    return {family(name) for expr in expressions() for name in names_in(expr)}

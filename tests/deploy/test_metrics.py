"""The metrics, against the code: Prometheus naming conventions for every `huitou_*`
family the services register, the README's catalogue listing exactly those families with
their type and labels, and every metric a dashboard or an alert uses present in a live
`/metrics` scrape of the running platform (both modes).

`python -m tests.deploy.test_metrics` prints the catalogue's rows from the registry."""

from __future__ import annotations

import re

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import services.platform  # noqa: F401  (every service's metrics registered)
from tests.deploy.tools import ROOT
from tests.metrics_check import FORBIDDEN_LABELS, scrape
from tests.platform import Platform

README = ROOT / "README.md"
CATALOGUE_START = "<!-- metrics catalogue: tests/deploy/test_metrics.py -->"
CATALOGUE_END = "<!-- end of metrics catalogue -->"


def families() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """Exposed name → (type, labels, help) of every `huitou_*` family in this process."""
    found: dict[str, tuple[str, tuple[str, ...], str]] = {}
    for collector in list(REGISTRY._collector_to_names):
        if isinstance(collector, MetricWrapperBase) and collector._name.startswith("huitou_"):
            kind = str(collector._type)
            name = f"{collector._name}_total" if kind == "counter" else collector._name
            found[name] = (kind, tuple(collector._labelnames), collector._documentation)
    return found


def test_names_follow_the_prometheus_conventions() -> None:
    found = families()
    assert len(found) >= 30
    for name, (kind, labels, help_) in found.items():
        assert re.fullmatch(r"huitou_[a-z][a-z0-9_]*[a-z0-9]", name), name
        assert help_.strip(), f"{name} has no help text"
        assert (kind == "counter") == name.endswith("_total"), name
        if kind in ("histogram", "summary"):
            assert name.endswith(("_seconds", "_bytes")), f"{name}: base unit suffix"
        assert not re.search(r"_(ms|milliseconds|minutes|hours|kb|mb)(_|$)", name), name
        for label in labels:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", label), f"{name}: label {label}"
            assert label not in FORBIDDEN_LABELS, f"{name}: label {label} is unbounded"


def catalogue_rows() -> list[str]:
    return [
        f"| `{name}` | {kind} | {', '.join(f'`{x}`' for x in labels) or '—'} | {help_} |"
        for name, (kind, labels, help_) in sorted(families().items())
    ]


def test_the_readme_catalogue_lists_every_metric() -> None:
    text = README.read_text()
    assert CATALOGUE_START in text and CATALOGUE_END in text
    table = text.split(CATALOGUE_START, 1)[1].split(CATALOGUE_END, 1)[0]
    rows = [line for line in table.strip().splitlines() if line.startswith("| `")]
    assert rows == catalogue_rows(), "regenerate: python -m tests.deploy.test_metrics"


async def test_dashboards_and_alerts_use_only_metrics_the_services_expose(
    platform: Platform,
) -> None:
    from tests.deploy.promql import metric_names

    exposed = {
        _family_name(name, kind)
        for exposition in (await scrape(platform)).values()
        for name, kind in exposition.families.items()
    }
    used = metric_names()
    assert used, "the dashboards and alerts use no metric"
    missing = sorted(used - exposed)
    assert not missing, f"used but not exposed: {missing}"


def _family_name(name: str, kind: str) -> str:
    return f"{name}_total" if kind == "counter" else name


if __name__ == "__main__":
    print("| metric | type | labels | meaning |")
    print("|---|---|---|---|")
    print("\n".join(catalogue_rows()))

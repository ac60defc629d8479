"""Checks of a live `/metrics` exposition: Prometheus naming, and label cardinality that
stays bounded whatever the traffic (no customer, order, tracking, message or shop ids as
label values). The session's platform runs them on every process once the whole suite has
gone through it (`tests/conftest.py`), and `tests/deploy/test_metrics.py` on the code."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from tests.platform import Platform

FORBIDDEN_LABELS = frozenset(
    {
        "shop",
        "shop_id",
        "customer",
        "customer_id",
        "order",
        "order_id",
        "tracking",
        "tracking_number",
        "message",
        "message_id",
        "enrollment",
        "enrollment_id",
        "key",
        "id",
        "email",
        "phone",
        "to",
        "journey_id",
    }
)
"""Label names that would carry an id or an address (one series each: unbounded)."""

MAX_SERIES = 400
"""Series of one family in one process, at most: the largest legitimate one is the HTTP
latency histogram (routes × methods × buckets)."""

_ID_LIKE = re.compile(
    r"[0-9a-f]{12,}|[0-9a-f]{8}-[0-9a-f]{4}-|\d{6,}|@|\+\d{6,}|^(c|o|n|s|cdnow|shop|tiny)-"
)
"""Label values that look like an id, a number or an address."""
_TOPIC = re.compile(r"([A-Za-z0-9_-]+\.)?huitou\.[a-z_.]+\.v\d+(\.dlt)?")


@dataclass
class Exposition:
    families: dict[str, str] = field(default_factory=dict)
    """Family name → type (`counter`, `gauge`, `histogram`, ...)."""
    series: dict[str, set[tuple[tuple[str, str], ...]]] = field(default_factory=dict)
    """Family name → its label sets (of every sample, `le` and `quantile` left out)."""


def parse(text: str) -> Exposition:
    found = Exposition()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("huitou_"):
            continue
        found.families[family.name] = family.type
        labelsets = found.series.setdefault(family.name, set())
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in ("le", "quantile")}
            labelsets.add(tuple(sorted(labels.items())))
    return found


def cardinality_problems(exposition: Exposition, where: str) -> list[str]:
    problems = []
    for name, labelsets in exposition.series.items():
        if len(labelsets) > MAX_SERIES:
            problems.append(f"{where}: {name} has {len(labelsets)} series (> {MAX_SERIES})")
        for labels in labelsets:
            for label, value in labels:
                if label in FORBIDDEN_LABELS:
                    problems.append(f"{where}: {name} has the label {label!r}")
                elif label == "topic" and _TOPIC.fullmatch(value):
                    continue  # a bus topic (the namespace is the deployment's, bounded)
                elif any(_ID_LIKE.search(part) for part in _parts(label, value)):
                    problems.append(f"{where}: {name}{{{label}={value!r}}} looks like an id")
    return sorted(set(problems))


def _parts(label: str, value: str) -> list[str]:
    """What must not look like an id: a route template's fixed segments, or the value."""
    if label == "route":
        return [p for p in value.split("/") if not p.startswith("{")]
    return [value]


async def scrape(platform: Platform) -> dict[str, Exposition]:
    """The `/metrics` of every running process of the platform, by process name."""
    found: dict[str, Exposition] = {}
    async with httpx.AsyncClient(timeout=30) as client:
        for name, process in platform.processes.items():
            if process.poll() is None:
                r = await client.get(f"http://127.0.0.1:{platform.ports[name]}/metrics")
                assert r.status_code == 200, r.text
                found[name] = parse(r.text)
    return found

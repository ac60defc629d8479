"""The table, the results file, and the comparison with the previous results file."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.core import Measurement, Run

COLUMNS = ("path", "mode", "our rate", "raw rate", "ratio", "p50", "p99", "memory", "vs prev")
REGRESSION_FLOOR_PCT = 10.0
"""A change smaller than this is never called a regression, whatever the spread."""
SINGLE_SAMPLE_FLOOR_PCT = 25.0
"""The same for figures measured once (no spread of their own); p99 latencies must move by
twice this, and by more than P99_FLOOR_MS, at the same offered load."""
P99_FLOOR_MS = 10.0


def _rate(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit in ("MB", "B/timer"):
        return f"{value:,.1f} {unit}"
    if unit in ("ms", "s"):
        return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.2f} {unit}"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:,.1f} ms"


def _spread(m: Measurement) -> str:
    return f" ±{m.ours.spread_pct / 2:.0f}%" if len(m.ours.samples) > 1 else ""


def previous_results(results_dir: Path, run: Run, current: Path | None) -> Path | None:
    """The newest earlier results file of the same size whose workload was the same (a
    size whose figures changed, e.g. fewer events in quick mode, is not compared)."""
    candidates = sorted(
        (p for p in results_dir.glob(f"*-{run.size.name}.json") if p != current), reverse=True
    )
    for path in candidates:
        if _workload(orjson.loads(path.read_bytes()).get("sizes", {})) == _workload(
            orjson.loads(orjson.dumps(run.size.__dict__))
        ):
            return path
    return None


def _workload(sizes: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs comparable: every size figure but the number of repeats."""
    return {k: v for k, v in sizes.items() if k != "repeats"}


def compare(run: Run, previous: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per row: the change of our median (and of p99 where there is one) against the
    previous file's, and whether it lies beyond the noise: the wider of both runs' spreads,
    at least REGRESSION_FLOOR_PCT (SINGLE_SAMPLE_FLOOR_PCT for single samples and p99)."""
    if previous is None:
        return {}
    before = {f"{r['path']}|{r['mode']}": r for r in previous.get("results", [])}
    changes = {}
    for m in run.measurements:
        old = before.get(m.key)
        if not old or old.get("unit") != m.unit or not old["ours"]["median"]:
            continue
        if not m.ours.samples:
            continue
        delta = (m.ours.median - old["ours"]["median"]) / abs(old["ours"]["median"]) * 100
        single = len(m.ours.samples) < 2 or len(old["ours"]["samples"]) < 2
        floor = SINGLE_SAMPLE_FLOOR_PCT if single else REGRESSION_FLOOR_PCT
        noise = max(floor, m.ours.spread_pct, old["ours"].get("spread_pct", 0))
        worse = -delta if m.higher_is_better else delta
        change: dict[str, Any] = {
            "previous_median": old["ours"]["median"],
            "delta_pct": round(delta, 1),
            "noise_pct": round(noise, 1),
            "regression": worse > noise,
            "improvement": -worse > noise,
        }
        same_load = m.extra.get("target_rate") == old.get("extra", {}).get("target_rate")
        if m.p99_ms and old.get("p99_ms") and same_load:
            p99_delta = (m.p99_ms - old["p99_ms"]) / old["p99_ms"] * 100
            change["p99_delta_pct"] = round(p99_delta, 1)
            change["regression"] |= (
                p99_delta > 2 * SINGLE_SAMPLE_FLOOR_PCT and m.p99_ms - old["p99_ms"] > P99_FLOOR_MS
            )
        changes[m.key] = change
    return changes


def table(run: Run, changes: dict[str, dict[str, Any]]) -> str:
    rows = [COLUMNS]
    for m in run.measurements:
        change = changes.get(m.key)
        vs = "-"
        if change:
            flag = " better" if change["improvement"] else ""
            flag = " REGRESSION" if change["regression"] else flag
            vs = f"{change['delta_pct']:+.0f}%{flag}"
            if abs(change.get("p99_delta_pct", 0)) > 2 * SINGLE_SAMPLE_FLOOR_PCT:
                vs = f"{vs}, p99 {change['p99_delta_pct']:+.0f}%"
        rows.append(
            (
                m.path,
                m.mode,
                _rate(m.ours.median if m.ours.samples else None, m.unit) + _spread(m),
                _rate(m.raw.median if m.raw and m.raw.samples else None, m.unit),
                f"{m.ratio:.2f}" if m.ratio is not None else "-",
                _ms(m.p50_ms),
                _ms(m.p99_ms),
                f"{m.rss_mb:,.0f} MB" if m.rss_mb is not None else "-",
                vs,
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for index, row in enumerate(rows):
        lines.append(
            "  ".join(
                str(c).ljust(w) if i < 2 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_path(run: Run) -> Path:
    stamp = datetime.fromtimestamp(run.started, UTC).strftime("%Y%m%dT%H%M%SZ")
    return run.results_dir / f"{stamp}-{run.size.name}.json"


def write(run: Run, facts: dict[str, Any], changes: dict[str, Any], previous: Path | None) -> Path:
    path = results_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "suite": "huitou-bench",
        "size": run.size.name,
        "started_at": datetime.fromtimestamp(run.started, UTC).isoformat(),
        "seconds": round(datetime.now(UTC).timestamp() - run.started, 1),
        "machine": facts,
        "tools": run.tools,
        "sizes": run.size.__dict__,
        "results": [m.to_json() for m in run.measurements],
        "notes": run.notes,
        "details": run.details,
        "profiles": {
            name: {k: v for k, v in summary.items() if k != "text"}
            for name, summary in (run.profiler.summaries if run.profiler else {}).items()
        },
        "compared_with": previous.name if previous else None,
        "changes": changes,
    }
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path

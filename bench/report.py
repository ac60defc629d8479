"""The table, the results file, and the comparison with earlier results files."""

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


def previous_results(
    results_dir: Path, size: str, sizes: dict[str, Any], current: Path
) -> list[Path]:
    """The earlier results files of the same size and workload, newest first. A size whose
    figures changed (e.g. fewer events in quick mode) is not compared; one that only
    gained figures (a new path's) still is, on the figures both have."""
    sizes = orjson.loads(orjson.dumps(sizes))  # as a file holds them: tuples become lists
    found = []
    for path in sorted(results_dir.glob(f"*-{size}.json"), reverse=True):
        if path.name >= current.name:
            continue
        if _comparable(orjson.loads(path.read_bytes()).get("sizes", {}), sizes):
            found.append(path)
    return found


_NOT_WORKLOAD = frozenset({"repeats", "distributed_paths"})
"""Size fields that do not change what a row measures."""


def _comparable(old: dict[str, Any], new: dict[str, Any]) -> bool:
    shared = (set(old) & set(new)) - _NOT_WORKLOAD
    return all(old[k] == new[k] for k in shared)


def compare(rows: list[dict[str, Any]], previous: list[Path]) -> dict[str, dict[str, Any]]:
    """Per row (as written in a results file): the change of our median (and of p99 where
    there is one) against the newest of `previous` that measured the same row, and
    whether it lies beyond the noise: the wider of both runs' spreads, at least
    REGRESSION_FLOOR_PCT (SINGLE_SAMPLE_FLOOR_PCT for single samples and p99). A run of
    some paths is so compared with the last run of each, not only with the last file."""
    before: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in previous:
        for r in orjson.loads(path.read_bytes()).get("results", []):
            before.setdefault(f"{r['path']}|{r['mode']}", (path.name, r))
    changes = {}
    for row in rows:
        key = f"{row['path']}|{row['mode']}"
        source, old = before.get(key, ("", {}))
        ours = row["ours"]
        if not old or old.get("unit") != row["unit"] or not old["ours"]["median"]:
            continue
        if not ours["samples"]:
            continue
        delta = (ours["median"] - old["ours"]["median"]) / abs(old["ours"]["median"]) * 100
        single = len(ours["samples"]) < 2 or len(old["ours"]["samples"]) < 2
        floor = SINGLE_SAMPLE_FLOOR_PCT if single else REGRESSION_FLOOR_PCT
        noise = max(floor, ours.get("spread_pct", 0), old["ours"].get("spread_pct", 0))
        worse = -delta if row.get("higher_is_better", True) else delta
        change: dict[str, Any] = {
            "compared_with": source,
            "previous_median": old["ours"]["median"],
            "delta_pct": round(delta, 1),
            "noise_pct": round(noise, 1),
            "regression": worse > noise,
            "improvement": -worse > noise,
        }
        extra, old_extra = row.get("extra", {}), old.get("extra", {})
        same_load = extra.get("target_rate") == old_extra.get("target_rate")
        p99, old_p99 = row.get("p99_ms"), old.get("p99_ms")
        if p99 and old_p99 and same_load:
            p99_delta = (p99 - old_p99) / old_p99 * 100
            change["p99_delta_pct"] = round(p99_delta, 1)
            change["regression"] |= (
                p99_delta > 2 * SINGLE_SAMPLE_FLOOR_PCT and p99 - old_p99 > P99_FLOOR_MS
            )
        changes[key] = change
    return changes


def compared_with(changes: dict[str, dict[str, Any]]) -> list[str]:
    """The earlier results files the changes were measured against."""
    return sorted({c["compared_with"] for c in changes.values()})


def change_text(change: dict[str, Any]) -> str:
    """A row's change as the `vs prev` column shows it, e.g. `+12% better, p99 -60%`."""
    flag = " better" if change["improvement"] else ""
    flag = " REGRESSION" if change["regression"] else flag
    text = f"{change['delta_pct']:+.0f}%{flag}"
    if abs(change.get("p99_delta_pct", 0)) > 2 * SINGLE_SAMPLE_FLOOR_PCT:
        text = f"{text}, p99 {change['p99_delta_pct']:+.0f}%"
    return text


def table(run: Run, changes: dict[str, dict[str, Any]]) -> str:
    rows = [COLUMNS]
    for m in run.measurements:
        change = changes.get(m.key)
        vs = change_text(change) if change else "-"
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


def write(run: Run, facts: dict[str, Any], changes: dict[str, Any]) -> Path:
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
        "compared_with": compared_with(changes),
        "changes": changes,
    }
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path

"""The bench compares each row with the last earlier run that measured it: a run of some
paths (or the soak alone) does not hide the runs before it, a size that only gained
figures stays comparable, and one whose figures changed is not compared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bench import report
from bench.recompare import recompare

SIZES = {"repeats": 3, "lifecycle_events": 200_000, "distributed_paths": ["ingest"]}
LADDER = (100, 250)
"""A size figure the runner holds as a tuple, and a results file as a list."""


def _row(path: str, median: float, samples: int = 3) -> dict[str, Any]:
    return {
        "path": path,
        "mode": "distributed",
        "unit": "ev/s",
        "ours": {"samples": [median] * samples, "median": median, "spread_pct": 0.0},
        "p99_ms": None,
        "extra": {},
        "higher_is_better": True,
    }


def _write(folder: Path, stamp: str, sizes: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    path = folder / f"{stamp}-full.json"
    document = {"size": "full", "sizes": {**sizes, "ladder": LADDER}, "results": rows}
    path.write_bytes(orjson.dumps(document))
    return path


def test_each_row_is_compared_with_the_last_run_that_measured_it(tmp_path: Path) -> None:
    _write(tmp_path, "20260101T000000Z", SIZES, [_row("ingest.single", 100), _row("lc", 50)])
    # Newer, but measured only the soak; its size gained a figure (a new path's).
    grown = {**SIZES, "soak_seconds": 600, "repeats": 1}
    _write(tmp_path, "20260102T000000Z", grown, [_row("soak.load", 10)])
    # A size whose shared figure changed is another workload: never compared.
    _write(tmp_path, "20260103T000000Z", {**SIZES, "lifecycle_events": 5_000}, [_row("lc", 1)])
    current = _write(
        tmp_path,
        "20260104T000000Z",
        grown,
        [_row("ingest.single", 150), _row("lc", 40), _row("soak.load", 10), _row("new", 1)],
    )

    previous = report.previous_results(tmp_path, "full", {**grown, "ladder": LADDER}, current)
    assert [p.name for p in previous] == [
        "20260102T000000Z-full.json",
        "20260101T000000Z-full.json",
    ]

    changes = report.compare(orjson.loads(current.read_bytes())["results"], previous)
    assert set(changes) == {"ingest.single|distributed", "lc|distributed", "soak.load|distributed"}
    single = changes["ingest.single|distributed"]
    assert (single["compared_with"], single["delta_pct"], single["improvement"]) == (
        "20260101T000000Z-full.json",
        50.0,
        True,
    )
    lc = changes["lc|distributed"]
    assert (lc["previous_median"], lc["delta_pct"], lc["regression"]) == (50, -20.0, True)
    assert changes["soak.load|distributed"]["compared_with"] == "20260102T000000Z-full.json"

    lines = recompare(current)
    written = orjson.loads(current.read_bytes())
    assert written["compared_with"] == ["20260101T000000Z-full.json", "20260102T000000Z-full.json"]
    assert written["changes"] == changes
    assert any("ingest.single" in line and "+50% better" in line for line in lines)

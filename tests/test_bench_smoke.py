"""The benchmark suite runs at its smallest size and writes its table and results file.

Speed is measured by `make bench`, never asserted by a test: this only proves the suite
still runs (embedded mode, plus the timers on PostgreSQL), nothing about its figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smallest_bench_prints_its_table_and_writes_its_results(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "smoke", "--results-dir", str(tmp_path), "--no-install"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("path"))
    for column in ("mode", "our rate", "raw rate", "ratio", "p50", "p99", "memory"):
        assert column in header
    written = list(tmp_path.glob("*-smoke.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert results["machine"]["cpu_model"]
    assert results["results"]

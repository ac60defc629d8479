"""The benchmark suite runs at its smallest size and writes its table and results file.

Speed is measured by `make bench`, never asserted by a test: this only proves the suite
still runs (embedded mode, plus the timers on PostgreSQL), nothing about its figures.

The run is a minute and a half of mostly waiting on processes it starts, so it starts with
the session (`start`, called by the conftest once the test is collected) and runs beside
the other tests; the test collects what it wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_RUN: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}


def start(folder: Path) -> None:
    """Start the smoke run in the background, its output and results file in `folder`."""
    if _RUN:
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "out.txt", "wb") as out, open(folder / "err.txt", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench", "smoke", "--results-dir", str(folder), "--no-install"],
            cwd=ROOT,
            stdout=out,
            stderr=err,
        )
    _RUN["smoke"] = (process, folder)


def stop() -> None:
    """At the session's end: a run no test waited for is not left behind."""
    for process, _ in _RUN.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def test_smallest_bench_prints_its_table_and_writes_its_results(tmp_path: Path) -> None:
    start(tmp_path)  # alone (-k, one file): started here
    process, folder = _RUN["smoke"]
    returncode = process.wait(timeout=600)
    stdout = (folder / "out.txt").read_text()
    assert returncode == 0, (folder / "err.txt").read_text()[-3000:]
    header = next(line for line in stdout.splitlines() if line.startswith("path"))
    for column in ("mode", "our rate", "raw rate", "ratio", "p50", "p99", "memory"):
        assert column in header
    written = list(folder.glob("*-smoke.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert results["machine"]["cpu_model"]
    assert results["results"]

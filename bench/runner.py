"""`python -m bench [smoke|quick|full]`: run the paths in each mode, print the table,
write `bench/results/<timestamp>-<size>.json`, compare with the previous file."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from bench import machine, report, tools
from bench.core import EMBEDDED_ONLY, MODES, PATHS, SIZES, Profiler, Run, Stack
from bench.infra import ROOT
from bench.paths import (
    campaigns,
    celery,
    e2e,
    ingest,
    lifecycle,
    memory,
    notifier,
    prediction,
    soak,
    timers,
)

RESULTS = ROOT / "bench" / "results"
PathRunner = Callable[[Run, Stack], Awaitable[None]]
RUNNERS: dict[str, PathRunner] = {
    "ingest": ingest.measure,
    "lifecycle": lifecycle.measure,
    "e2e": e2e.measure,
    "timers": timers.measure,
    "campaigns": campaigns.measure,
    "notifier": notifier.measure,
    "memory": memory.measure,
    "soak": soak.measure,
    "prediction": prediction.measure,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("size", nargs="?", default="quick", choices=sorted(SIZES))
    parser.add_argument("--modes", default=",".join(MODES), help="embedded,distributed")
    parser.add_argument("--paths", default=",".join(PATHS), help=",".join(PATHS))
    parser.add_argument("--repeats", type=int, help="override the size's repeat count")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="py-spy each path once")
    parser.add_argument(
        "--no-install", action="store_true", help="never apt-get or pip install anything"
    )
    parser.add_argument("--keep-workdir", action="store_true")
    return parser.parse_args(argv)


async def run_suite(args: argparse.Namespace) -> int:
    size = SIZES[args.size]
    if args.repeats:
        size = dataclasses.replace(size, repeats=args.repeats)
    modes = [m for m in args.modes.split(",") if m]
    paths = [p for p in args.paths.split(",") if p]
    unknown = [m for m in modes if m not in MODES] + [p for p in paths if p not in PATHS]
    if unknown:
        sys.exit(f"unknown mode or path: {unknown}")
    install = not args.no_install
    workdir = Path(tempfile.mkdtemp(prefix="huitou-bench-"))
    run = Run(size=size, workdir=workdir, results_dir=args.results_dir, wrk=None, install=install)
    run.log(f"Huitou bench, size {size.name}, modes {modes}, paths {paths}; work in {workdir}")

    if any(p in paths for p in ("ingest",)):
        run.wrk, note = tools.apt_binary("wrk", "wrk", install=install)
        run.tools["load_generator"] = (
            f"wrk ({tools.version_of([run.wrk, '-v'])})"
            if run.wrk
            else "httpx fallback (python -m bench.loadgen)"
        )
        run.tools["load_generator_note"] = note
        run.log(f"load generator: {run.tools['load_generator']} — {note}")
    if args.profile:
        binary, note = tools.py_spy(install=install)
        run.tools["profiler"] = note
        if binary:
            run.profiler = Profiler(
                binary, args.results_dir / "profiles" / report.results_path(run).stem
            )
        else:
            run.note(f"no profiles: {note}")

    facts = machine.facts(ROOT)
    try:
        for mode in modes:
            todo = [
                p
                for p in paths
                if p in RUNNERS
                and (mode == "embedded" or (p in size.distributed_paths and p not in EMBEDDED_ONLY))
            ]
            if not todo:
                continue
            run.log(f"== {mode}: {', '.join(todo)}")
            async with Stack(mode, workdir) as stack:
                if stack.versions:
                    facts[f"{mode}_servers"] = stack.versions
                for path in todo:
                    revision = machine.git_revision(ROOT)
                    run.details.setdefault("revisions", {})[f"{path}|{mode}"] = revision
                    run.log(f"-- {path} [{mode}] at {revision['commit'][:10]}")
                    try:
                        await RUNNERS[path](run, stack)
                    except Exception as exc:
                        traceback.print_exc()
                        run.note(f"{path} [{mode}] failed: {exc!r}")
        if "celery" in paths:
            if size.celery_hold > 0:
                run.log("-- celery [redis]")
                try:
                    await celery.measure(run)
                except Exception as exc:
                    traceback.print_exc()
                    run.note(f"celery failed: {exc!r}")
            else:
                run.note(f"Celery comparison skipped at size {size.name}")
    finally:
        if args.keep_workdir:
            run.log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    current = report.results_path(run)
    previous = report.previous_results(run.results_dir, size.name, size.__dict__, current)
    changes = report.compare([m.to_json() for m in run.measurements], previous)
    written = report.write(run, facts, changes)
    print()
    print(
        f"Huitou bench — size {size.name} — {facts['cpu_model']}, {facts['cores']} cores, "
        f"Python {facts['python']}; load: {run.tools.get('load_generator', '-')}"
    )
    print()
    print(report.table(run, changes))
    for block in (celery.comparison(run), memory.growth(run), soak.table(run)):
        if block:
            print()
            print(block)
    if run.profiler and run.profiler.summaries:
        print()
        print(f"profiles (py-spy, on-CPU samples): {run.profiler.out_dir}")
        for name, summary in run.profiler.summaries.items():
            top = summary.get("self_by_package", [])[:4]
            shares = ", ".join(f"{pkg} {pct:.0f}%" for pkg, pct in top)
            print(f"  {name}: {shares or summary.get('error', '')}")
    if run.notes:
        print()
        print("notes:")
        for text in run.notes:
            print(f"  - {text}")
    print()
    print(f"results: {written}")
    if changes:
        regressions = [k for k, c in changes.items() if c["regression"]]
        files = ", ".join(report.compared_with(changes))
        print(f"compared with {files}: {len(regressions)} regression(s) beyond the noise")
    else:
        print("no earlier results of this size and workload to compare with")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.exit(uvloop.run(run_suite(args)))

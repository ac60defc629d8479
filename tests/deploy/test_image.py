"""The image, checked without a container engine: the Dockerfile passes hadolint, has two
stages with the final one unprivileged, pinned, health-checked and free of build tools,
runs a real `huitou` command; and the package built from exactly the files the Dockerfile
copies (after `.dockerignore`) holds every module the services import."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from services.cli import build_parser
from tests.deploy.tools import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last:]


def test_hadolint_finds_nothing() -> None:
    run(tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE))


def test_two_stages_on_a_pinned_slim_base() -> None:
    steps = instructions()
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    bases = [a.split()[0] for w, a in steps if w == "FROM"]
    assert len(bases) == 2
    for base in bases:
        image = args.get(base.strip("${}"), base)
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), image


def test_the_final_stage_runs_unprivileged_without_build_tools() -> None:
    stage = final_stage()
    (user,) = [a for w, a in stage if w == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, user
    runs = " ".join(a for w, a in stage if w == "RUN")
    for forbidden in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert forbidden not in runs, forbidden
    copies = [a for w, a in stage if w == "COPY"]
    assert copies and all(a.startswith("--from=build") for a in copies)


def test_health_check_and_command() -> None:
    stage = final_stage()
    (check,) = [a for w, a in stage if w == "HEALTHCHECK"]
    assert "/healthz" in check
    (cmd,) = [a for w, a in stage if w == "CMD"]
    words = re.findall(r'"([^"]*)"', cmd)
    assert words[0] == "huitou"
    args = build_parser().parse_args(words[1:])
    assert args.command == "serve"
    assert "STOPSIGNAL" not in dict(stage) or dict(stage)["STOPSIGNAL"] == "SIGTERM"


def test_the_package_built_from_the_build_context_holds_every_module(tmp_path: Path) -> None:
    context = tmp_path / "context"
    ignore = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and p[0] != "#"]
    sources = _copy_sources()
    assert sources
    for source in sources:
        assert _kept(source, ignore), f"{source} is copied but .dockerignore leaves it out"
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, context / source)
    out = tmp_path / "wheel"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("huitou-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "libs", "services"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    missing = [f for f in tracked if f not in packaged]
    assert not missing, f"not in the image's package: {missing}"
    entry = [n for n in packaged if n.endswith("entry_points.txt")]
    assert entry and "huitou = services.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def _copy_sources() -> list[str]:
    """The build context paths the build stage copies (`COPY a b ./` → a, b)."""
    sources = []
    for word, args in instructions():
        if word == "COPY" and "--from" not in args:
            *srcs, _dest = args.split()
            sources += srcs
    return sources


def _kept(path: str, ignore: list[str]) -> bool:
    """Whether Docker keeps `path` in the context (last matching pattern wins)."""
    kept = True
    for pattern in ignore:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, body) or fnmatch.fnmatch(path.rstrip("/"), body):
            kept = negated
    return kept

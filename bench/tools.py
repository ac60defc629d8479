"""The outside tools a run needs, installed by the runner itself and never as project deps.

- `wrk` and `redis-server` from Debian's packages (`apt-get install -y …`) when missing and
  apt is available;
- Celery (with its Redis client) into its own venv, `bench/.venv-celery`;
- `py-spy` into the project venv, only when a run profiles.
Each installer returns what it found or why it could not, so the run can say which tool it
used (or fall back) instead of failing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CELERY_VENV = BENCH / ".venv-celery"
CELERY_REQUIREMENT = "celery[redis]>=5.4,<6"


def _run(args: list[str], timeout: float = 600) -> tuple[bool, str]:
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, repr(exc)
    return done.returncode == 0, (done.stdout + done.stderr)[-2000:]


def apt_binary(binary: str, package: str, *, install: bool = True) -> tuple[str | None, str]:
    """Path of `binary`, installing Debian's `package` when missing and apt is available.

    Returns (path or None, a note saying what happened)."""
    found = shutil.which(binary)
    if found:
        return found, f"{binary} found at {found}"
    if not install:
        return None, f"{binary} missing (installation disabled)"
    apt = shutil.which("apt-get")
    if apt is None:
        return None, f"{binary} missing and apt-get unavailable"
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    ok, out = _run([*prefix, apt, "install", "-y", "-q", package])
    if not ok:
        _run([*prefix, apt, "update", "-q"])
        ok, out = _run([*prefix, apt, "install", "-y", "-q", package])
    found = shutil.which(binary)
    if found:
        return found, f"{binary} installed with apt-get install -y {package}"
    return None, f"apt-get install -y {package} failed: {out[-300:]}"


def version_of(args: list[str]) -> str | None:
    _, out = _run(args, timeout=20)
    line = out.strip().splitlines()[0] if out.strip() else ""
    return line or None


def celery_venv(*, install: bool = True) -> tuple[Path | None, str]:
    """`bench/.venv-celery/bin/python` with Celery and redis-py, created when missing."""
    python = CELERY_VENV / "bin" / "python"
    marker = CELERY_VENV / ".installed"
    if python.exists() and marker.exists():
        return python, f"Celery venv {CELERY_VENV}"
    if not install:
        return None, "Celery venv missing (installation disabled)"
    if not python.exists():
        ok, out = _run([sys.executable, "-m", "venv", str(CELERY_VENV)])
        if not ok:
            return None, f"could not create {CELERY_VENV}: {out[-300:]}"
    ok, out = _run([str(python), "-m", "pip", "install", "--quiet", CELERY_REQUIREMENT])
    if not ok:
        return None, f"pip install {CELERY_REQUIREMENT} failed: {out[-300:]}"
    marker.touch()
    return python, f"Celery venv created at {CELERY_VENV}"


def py_spy(*, install: bool = True) -> tuple[str | None, str]:
    """The py-spy binary: on PATH, in this venv, or pip-installed into this venv."""
    local = Path(sys.executable).parent / "py-spy"
    for candidate in (shutil.which("py-spy"), str(local) if local.exists() else None):
        if candidate:
            return candidate, f"py-spy at {candidate}"
    if not install:
        return None, "py-spy missing (installation disabled)"
    ok, out = _run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"])
    if ok and local.exists():
        return str(local), "py-spy installed into the project venv (not a project dependency)"
    return None, f"pip install py-spy failed: {out[-300:]}"

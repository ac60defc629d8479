"""Log hygiene: the logs of the whole test session hold no full phone number, email
address, webhook secret, API key or admin key.

What is scanned, at the end of the session (after every fixture is torn down, so every
process has stopped writing):
- every `*.log` file under the session's temporary folder: the output of the processes
  the tests start (`huitou up`/`serve` write theirs to `<workdir>/<name>.log`, the broker
  to `tansu.log`, PostgreSQL to `pg/log`; a test starting another process gives it a
  `*.log` file there too);
- `in-process.log` there: every record the code under test logs inside the pytest
  process, formatted by the services' own `JsonFormatter` (which masks phones and emails).

What counts as a leak: an E.164 phone number or a Chinese mobile number in full, an email
address whose local part is not masked (`f***@example.com` is fine), a Huitou key
(`hk_…`), and every secret the tests use: the values of the `SECRET*`/`*SECRETS*`
constants of the test modules and the admin keys of the fixtures (`sensitive(...)` adds
more). A leak fails the run: the exit status becomes 1 and the report names the file,
line and kind (never the value). `tests/test_log_hygiene.py` tests the scanner itself and
scans what is there when it runs, last.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from libs.common.logs import JsonFormatter

IN_PROCESS_LOG = "in-process.log"
_SECRET_NAME = re.compile(r"^[A-Z0-9_]*SECRETS?(_[A-Z0-9]+)?$")
_NOT_SECRETS = ("_HEADER", "_FIELD", "_NAME", "_ENV")
"""`SECRET_HEADER` names a header; its value is no secret."""
_SENSITIVE: set[str] = set()

PATTERNS: dict[str, re.Pattern[str]] = {
    "phone number": re.compile(r"(?<![\w+*])(?:\+[1-9]\d{9,14}|1[3-9]\d{9})(?![\d*])"),
    "email address": re.compile(
        r"(?<![\w.%+*-])([A-Za-z0-9._%+-]+)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})"
    ),
    "API key": re.compile(r"(?<![\w-])hk_[A-Za-z0-9_-]{20,}"),
}


def sensitive(*values: str) -> None:
    """Values no log may contain (secrets and keys a test uses)."""
    _SENSITIVE.update(v for v in values if v and len(v) >= 8)


def known_secrets() -> set[str]:
    """The secrets of the test modules loaded so far, the fixtures' admin key and what
    tests registered with `sensitive`."""
    found = set(_SENSITIVE)
    for name, module in list(sys.modules.items()):
        if not name.startswith("tests") or module is None:
            continue
        for attribute, value in vars(module).items():
            if _SECRET_NAME.match(attribute) and not attribute.endswith(_NOT_SECRETS):
                found.update(_strings(value))
    try:
        from tests.conftest import make_settings

        admin = make_settings("embedded", Path(".")).admin_key
        if admin:
            found.add(admin)
    except Exception:  # the conftest changed; the admin keys are still caught by pattern
        pass
    return {s for s in found if len(s) >= 8}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            yield from _strings(v)


@dataclass(frozen=True)
class Leak:
    path: Path
    line: int
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: a full {self.kind}"


def scan_text(text: str, secrets: Iterable[str] = ()) -> list[tuple[int, str]]:
    """(line number, kind) of every leak in a text."""
    secrets = list(secrets)
    found: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        for kind, pattern in PATTERNS.items():
            for match in pattern.finditer(line):
                if kind == "email address" and match.group(1).endswith("***"):
                    continue
                found.append((number, kind))
        found.extend((number, "secret or admin key") for s in secrets if s in line)
    return found


def scan_folder(folder: Path, secrets: Iterable[str] = ()) -> list[Leak]:
    secrets = list(secrets)
    leaks: list[Leak] = []
    for path in sorted({*folder.rglob("*.log"), *folder.rglob("log")}):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        leaks.extend(Leak(path, line, kind) for line, kind in scan_text(text, secrets))
    return leaks


class LogHygiene:
    """The pytest plugin: records in-process logs, scans everything at session finish."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.handler: logging.Handler | None = None
        self.leaks: list[Leak] = []

    def basetemp(self) -> Path | None:
        factory = getattr(self.config, "_tmp_path_factory", None)
        return factory.getbasetemp() if factory is not None else None

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        folder = self.basetemp()
        if folder is None:
            return
        self.handler = logging.FileHandler(folder / IN_PROCESS_LOG, encoding="utf-8")
        self.handler.setFormatter(JsonFormatter())
        logging.getLogger().addHandler(self.handler)

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """The hygiene tests run last, after every other test wrote its logs."""
        last = [i for i in items if i.get_closest_marker("log_hygiene_last")]
        items[:] = [i for i in items if not i.get_closest_marker("log_hygiene_last")] + last

    def pytest_configure(self, config: pytest.Config) -> None:
        config.addinivalue_line("markers", "log_hygiene_last: run after every other test")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
        folder = self.basetemp()
        if folder is None or not folder.exists():
            return
        self.leaks = scan_folder(folder, known_secrets())
        if self.leaks:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.leaks:
            return
        terminalreporter.write_sep(
            "=", "log hygiene: personal data or secrets in the logs", red=True
        )
        for leak in self.leaks[:100]:
            terminalreporter.write_line(str(leak))
        if len(self.leaks) > 100:
            terminalreporter.write_line(f"… and {len(self.leaks) - 100} more")

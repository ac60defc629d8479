"""Summaries of py-spy's collapsed stacks: where the CPU time of a path goes.

Three views of the on-CPU samples (idle time is not sampled): self time by package (who
burns the cycles), self time by function, and inclusive time of Huitou's own functions
(which of our calls lead to that work).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
OWN = ("libs/", "services/", "bench/")


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    for marker in OWN:
        if f"/{marker}" in path:
            return marker + path.split(f"/{marker}", 1)[1]
    match = re.search(r"/lib/python3\.\d+/(.*)", path)
    return f"stdlib/{match.group(1)}" if match else path


def package_of(short_path: str) -> str:
    if short_path.startswith(("libs/", "services/", "bench/")):
        parts = short_path.split("/")
        return "/".join(parts[:3]) if parts[0] == "libs" else "/".join(parts[:2])
    if short_path.startswith("stdlib/"):
        name = short_path.split("/")[1]
        return f"stdlib/{name.removesuffix('.py')}"
    return short_path.split("/")[0].removesuffix(".py")


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for raw in stack.split(";"):
        match = _FRAME.match(raw.strip())
        if match:
            short = _short(match["file"])
            frames.append((f"{match['func']} ({short})", short))
        else:
            frames.append((raw.strip(), raw.strip()))
    return frames


def summarize(collapsed: str, top: int = 15) -> dict[str, Any]:
    """Aggregate py-spy `--format raw` output into shares of on-CPU samples."""
    by_package: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    inclusive_own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        total += count
        leaf_name, leaf_path = frames[-1]
        by_package[package_of(leaf_path)] += count
        by_function[leaf_name] += count
        for name in {name for name, path in frames if path.startswith(OWN)}:
            inclusive_own[name] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100 * n / total) for name, n in counter.most_common(top)] if total else []

    views = {
        "self_by_package": share(by_package),
        "self_by_function": share(by_function),
        "inclusive_own": share(inclusive_own),
    }
    titles = {
        "self_by_package": "self time by package",
        "self_by_function": "self time by function",
        "inclusive_own": "inclusive time of Huitou's functions",
    }
    lines = [f"{total} on-CPU samples"]
    for key, rows in views.items():
        lines.append(f"\n{titles[key]}:")
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in rows]
    return {"samples": total, **views, "text": "\n".join(lines) + "\n"}

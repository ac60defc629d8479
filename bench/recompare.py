"""`python -m bench.recompare FILE…`: compare finished results files again with the
earlier ones of their size and workload (as a run does at its end, `report.compare`),
rewrite their `changes` and `compared_with`, and print each row's change.

For runs written before a comparison could reach past the newest earlier file, or that
ran next to one another (a run of some paths, then the soak alone), so each row is
compared with the last run that measured it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson

from bench import report


def recompare(path: Path) -> list[str]:
    document = orjson.loads(path.read_bytes())
    previous = report.previous_results(
        path.parent, document["size"], document.get("sizes", {}), path
    )
    changes = report.compare(document["results"], previous)
    document["changes"] = changes
    document["compared_with"] = report.compared_with(changes)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    lines = [f"{path.name}:"]
    for row in document["results"]:
        key = f"{row['path']}|{row['mode']}"
        change = changes.get(key)
        if change is None:
            continue
        lines.append(
            f"  {row['path']:<24} {row['mode']:<12} {change['previous_median']:>12,.1f} → "
            f"{row['ours']['median']:>12,.1f} {row['unit']:<10} {report.change_text(change)}"
            f"  (vs {change['compared_with']})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", type=Path, nargs="+")
    for path in parser.parse_args().files:
        print("\n".join(recompare(path)))


if __name__ == "__main__":
    main()

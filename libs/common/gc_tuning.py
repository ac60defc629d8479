"""The garbage collector's settings for a long-running service process.

Python's cyclic collector runs a young collection every 700 net allocations and a full
one every 100 young ones, and a full collection walks every tracked object in the
process. A service's heap is mostly what it built at startup (FastAPI's routes and
schemas, pydantic validators, SQLAlchemy's tables and compiled statements), which never
becomes garbage, yet each full collection walked all of it: in ingest under load the
collector took 15–20 % of the process's CPU (bench/README.md, finding 22).

After startup, `tune_for_service` collects once and freezes what is left (moved to a
permanent generation that collections skip), and raises the young threshold to 10,000
allocations. Objects freed by reference counting, the great majority, are unaffected;
cycles are still collected, in fewer and cheaper passes. The bench's bare endpoint
calls it too, so the ratios compare code with code, not collector settings.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Net allocations between young collections (CPython's default: 700)."""


def tune_for_service() -> None:
    """Freeze the startup heap and space collections out; call once the process started."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)

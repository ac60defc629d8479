"""The Celery side of the comparison: one reminder task on a local Redis broker.

Run only with `bench/.venv-celery/bin/python` (or its `celery`), which has Celery and
redis-py. `BENCH_REDIS_URL` names the broker; `BENCH_VISIBILITY_TIMEOUT` sets Redis'
visibility timeout (Celery's default is one hour) and `BENCH_RESTORE_INTERVAL` how often
the worker sweeps for messages past it. A fire appends `id skew fired_at` to
the Redis list `fired` (database 1, apart from the broker's keys).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery  # type: ignore[import-not-found]

BROKER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
VISIBILITY_TIMEOUT = float(os.environ.get("BENCH_VISIBILITY_TIMEOUT", "3600"))
RESTORE_INTERVAL = os.environ.get("BENCH_RESTORE_INTERVAL")
"""Seconds between sweeps for unacknowledged messages past the visibility timeout (kombu's
`unacked_restore_interval`, with `unacked_restore_throttle` 1); unset keeps kombu's
defaults (a sweep every 10 × 10 s)."""

transport_options: dict[str, Any] = {"visibility_timeout": VISIBILITY_TIMEOUT}
if RESTORE_INTERVAL:
    transport_options |= {
        "unacked_restore_interval": float(RESTORE_INTERVAL),
        "unacked_restore_throttle": 1,
    }

app: Any = Celery("reminders", broker=f"{BROKER}/0")
app.conf.update(
    broker_transport_options=transport_options,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
_results: Any = None


def _fired_list() -> Any:
    global _results
    if _results is None:
        import redis  # type: ignore[import-not-found]

        _results = redis.Redis.from_url(f"{BROKER}/1")
    return _results


def _remind(reminder_id: str, due: float) -> None:
    now = time.time()
    _fired_list().rpush("fired", f"{reminder_id} {now - due:.6f} {now:.6f}")


remind: Any = app.task(name="remind")(_remind)

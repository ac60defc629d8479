"""Counting every delivery by platform, topic and outcome, whatever the answer was."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from libs.common.problems import Problem
from services.ingest import metrics

_OUTCOME_OF_STATUS = {
    400: "invalid",
    401: "unauthorized",
    403: "unauthorized",
    404: "unknown_shop",
    413: "too_large",
    422: "invalid",
    503: "bus_unavailable",
}


class Outcome:
    def __init__(self, platform: str, topic: str) -> None:
        self.platform = platform
        self.topic = topic
        self.value = "error"

    def set(self, value: str) -> None:
        self.value = value


@contextmanager
def measured(platform: str, topic: str) -> Iterator[Outcome]:
    """Yield an Outcome to fill in; a Problem raised inside sets it from its status."""
    outcome = Outcome(platform, topic)
    started = time.perf_counter()
    try:
        yield outcome
    except Problem as problem:
        outcome.value = _OUTCOME_OF_STATUS.get(problem.status, "error")
        raise
    finally:
        metrics.DELIVERIES.labels(outcome.platform, outcome.topic, outcome.value).inc()
        metrics.REQUEST_SECONDS.labels(platform).observe(time.perf_counter() - started)

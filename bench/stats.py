"""Medians, spreads and percentiles: what every measurement reports."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) by linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Stat:
    """Repeated samples of one figure: the median and how far the samples spread."""

    samples: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def spread_pct(self) -> float:
        """(max − min) / median, in percent: the noise band of this figure in this run."""
        if len(self.samples) < 2 or not self.median:
            return 0.0
        return (max(self.samples) - min(self.samples)) / abs(self.median) * 100

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": [round(s, 3) for s in self.samples],
            "median": round(self.median, 3),
            "min": round(min(self.samples), 3) if self.samples else None,
            "max": round(max(self.samples), 3) if self.samples else None,
            "spread_pct": round(self.spread_pct, 1),
        }


def of(samples: Sequence[float]) -> Stat:
    return Stat(list(samples))


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None

"""Synthetic customer summaries drawn from a BG/NBD population (tests and the bench)."""

from __future__ import annotations

import numpy as np

from services.lifecycle.prediction.model import FloatArray


def simulate_bgnbd(
    rng: np.random.Generator,
    customers: int,
    *,
    r: float,
    alpha: float,
    a: float,
    b: float,
    max_age_days: int = 730,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Draw ``(x, t_x, T)`` in whole days for ``customers`` customers, vectorised.

    Ages T are uniform whole days in [1, max_age_days]. Each customer has
    λ ~ Gamma(r, 1/α) and p ~ Beta(a, b); they would make K ~ Geometric(p) repeat
    purchases before dropping out, and N ~ Poisson(λT) purchases happen in (0, T], so
    x = min(N, K) and the x-th of N uniform arrival times is T · Beta(x, N − x + 1).
    Recency is rounded up to a whole day (≥ 1); two arrivals on one day are not merged,
    which is immaterial for the rates drawn here.
    """
    T = rng.integers(1, max_age_days + 1, size=customers).astype(np.float64)
    lam = rng.gamma(r, 1.0 / alpha, size=customers)
    p = rng.beta(a, b, size=customers)
    k = rng.geometric(p)
    n = rng.poisson(lam * T)
    x = np.minimum(n, k)
    pos = x > 0
    frac = np.zeros(customers)
    frac[pos] = rng.beta(x[pos], n[pos] - x[pos] + 1)
    t_x = np.where(pos, np.clip(np.ceil(frac * T), 1.0, T), 0.0)
    return x.astype(np.float64), t_x, T

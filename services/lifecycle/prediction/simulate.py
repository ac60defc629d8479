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


def simulate_bgnbd_window(
    rng: np.random.Generator,
    customers: int,
    *,
    r: float,
    alpha: float,
    a: float,
    b: float,
    start: float,
    end: float,
    max_age_days: int = 730,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Draw ``(x, t_x, T)`` and each customer's purchases in ``(T + start, T + end]``.

    The same process as :func:`simulate_bgnbd`, continued past T: arrivals by T, T+start
    and T+end are cumulative Poisson counts N_T ≤ N_s ≤ N_e at rate λ, the customer makes
    min(N, K) of them, and the window count is min(N_e, K) − min(N_s, K). Ages T are whole
    days, but t_x is left continuous (not rounded up to a day) so that (x, t_x, T) is
    exactly what the model conditions on.
    """
    T = rng.integers(1, max_age_days + 1, size=customers).astype(np.float64)
    lam = rng.gamma(r, 1.0 / alpha, size=customers)
    p = rng.beta(a, b, size=customers)
    k = rng.geometric(p)
    n_T = rng.poisson(lam * T)
    n_s = n_T + rng.poisson(lam * start)
    n_e = n_s + rng.poisson(lam * (end - start))
    x = np.minimum(n_T, k)
    pos = x > 0
    frac = np.zeros(customers)
    frac[pos] = rng.beta(x[pos], n_T[pos] - x[pos] + 1)
    t_x = np.where(pos, np.clip(frac * T, 1e-9, T), 0.0)
    window = np.minimum(n_e, k) - np.minimum(n_s, k)
    return x.astype(np.float64), t_x, T, window.astype(np.float64)

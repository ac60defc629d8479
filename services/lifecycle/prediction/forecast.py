"""Promotion forecast: returning customers' purchase days in a coming window, with a 95% interval.

Pure and vectorised like :mod:`.model`: no database, no clock, no network; loops run over
distinct values (of x, or of the four parameters), never over customers.

What is forecast
----------------
For customers summarised by ``(x, t_x, T)`` (days, ``T`` counted up to "now") and a window
``(start, end]`` in days from now, the number of purchase days customer i makes in
``(T_i + start, T_i + end]`` is N_i, and the forecast is of the total Σ N_i (over everyone,
and over each group of customers when labels are given). The expectation is the model's:
E[N_i] = E[X(T, T+end)] − E[X(T, T+start)] from :func:`.model.expected_purchases`.

The interval
------------
Given the data, the customers' futures are independent (each has their own λ and p), so
Var(Σ N_i) = Σ Var(N_i), and a total over many customers is close to normal. Var(N_i) is
exact under the BG/NBD posterior, derived as follows. Alive at T with (λ, p), a customer is
alive at T+u with probability e^(−λpu) (each of the Poisson(λu) purchases before u is
survived with probability 1 − p), so purchases happen at rate λe^(−λpu) and two purchases
at u₁ < u₂ have joint density λ²(1 − p)e^(−λpu₂). With D = end − start,

    E[N(N−1) | λ, p, alive] = 2λ²(1 − p) ∫_start^end (u − start) e^(−λpu) du.

Given the data and alive at T, λ ~ Gamma(r+x, α+T) and p ~ Beta(a, b+x) independently (the
posterior behind :func:`.model.p_alive`). Integrating λ out in closed form (R = r + x,
A = α + T, z = pD/(A + p·start)):

    E[N(N−1) | p, alive] = 2(1 − p) (1 + p·start/A)^(−R) (D/(A + p·start))² φ(z)/z²,
    φ(z) = 1 − (1 + z)^(−(R+1)) (1 + (R+1)z),   φ(z)/z² → R(R+1)/2 as z → 0,

and p is integrated numerically by Gauss–Jacobi quadrature for the Beta(a, b+x) weight
(nodes from the Golub–Welsch eigenproblem). The integrand is analytic on [0, 1], its nearest
singularity at p = −A/end; the number of nodes (16 to 1024) comes from the classical error
bound for Gauss quadrature on Bernstein ellipses, aiming at 1e-14 (see :func:`_nodes_for`).
The tests check it against the model's closed-form mean (to 1e-10, or the closed form's
own error where that is larger) and against an independent computation from the discrete
law min(Poisson, Geometric) (to 1e-10). Then,
with P(alive) from the model,

    Var(N) = P(alive) · E[N(N−1) | alive] + E[N] − E[N]².

The integral depends on (x, T) only and P(alive) on (x, t_x, T), so each is computed once
per distinct pair or row: a million day-grained customers take well under a second (plus
about as much again for parameter uncertainty).

Parameter uncertainty
---------------------
Included when the caller passes ``log_covariance``, the covariance of the estimates of
(log r, log α, log a, log b): :func:`parameter_covariance` computes it from the calibration
summaries the parameters were fitted on, as the fit computes ``std_errors`` (which carry no
correlations, and the estimates are strongly correlated, so they cannot be used alone).
It adds the delta-method variance gᵀΣg of the expected total, g its gradient in the
log-parameters (central differences, step 1e-3); by the law of total variance the process
variance above and this one add up (the future's deviation from its conditional mean is
uncorrelated with anything computed from the data). The parameter error is shared by all
groups, so the groups' parameter variances do not add up to the total's. Without
``log_covariance`` the interval covers the future given the parameters only: right for a
segment small against the fitted base, but for the fitted base itself it leaves out a term
of the same order (both variances grow like the number of customers). For a million
CDNOW-like customers forecast with their own fit, parameter uncertainty adds 6% to the
variance of days 7–37 and 60% to that of the next year.

Small totals
------------
The normal interval is used from an expected total of :data:`NORMAL_FROM` (30) up, its lower
end clamped at 0. In simulations of CDNOW-like shops (tests and the numbers here) it covers
94.5–95.8% of totals from 40 to 1,600; the total is slightly right-skewed, so at 40–200 the
misses split about 1.5–2% below and 3–3.5% above. Below 30 the total is a small, skewed
count and the interval is the central 95% of the count distribution with the same mean and
variance: negative binomial when the variance exceeds the mean (heterogeneous λ: the usual
case), Poisson (slightly wider than the matched one) when it does not (short windows, where
each customer is nearly a Bernoulli trial). Its ends are whole numbers and, being discrete,
it covers more than 95% (97–99% in the simulations, from totals of 0.6 to 10), where a
normal interval would miss almost only above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import linalg

from services.lifecycle.prediction import model
from services.lifecycle.prediction.model import BgNbdParams, FloatArray

NORMAL_FROM: Final = 30.0
"""From this expected total up the interval is normal; below it, a matched count law."""
LEVEL: Final = 0.95
_Z: Final = NormalDist().inv_cdf(0.5 + LEVEL / 2)
_DELTA_STEP: Final = 1e-3  # central-difference step in the log-parameters
_QUAD_TOL: Final = 1e-14  # target of the Gauss–Jacobi error bound ρ^(−2n)
_MIN_NODES: Final = 16
_MAX_NODES: Final = 1024
_SERIES_BELOW: Final = 0.5  # (R+2)·z below this: φ(z)/z² by its series
_SERIES_TERMS: Final = 30

IntervalMethod = Literal["normal", "negative binomial", "poisson"]


@dataclass(frozen=True)
class WindowTotal:
    """The forecast total of one set of customers' purchase days in the window.

    ``variance`` is the process variance (given the parameters), ``parameter_variance``
    the delta-method term (0 when parameter uncertainty is not included); ``low`` and
    ``high`` bound the 95% interval, built by ``method``.
    """

    customers: int
    expected: float
    variance: float
    parameter_variance: float
    low: float
    high: float
    method: IntervalMethod

    @property
    def std_dev(self) -> float:
        return math.sqrt(self.variance + self.parameter_variance)


@dataclass(frozen=True)
class PromotionForecast:
    """Purchase days in ``(T + start, T + end]`` (days from now) over all customers and per
    group (``groups``: (label, total) pairs by increasing label, empty without labels)."""

    start: float
    end: float
    total: WindowTotal
    groups: tuple[tuple[int, WindowTotal], ...]
    parameter_uncertainty: bool

    def group(self, label: int) -> WindowTotal:
        for key, value in self.groups:
            if key == label:
                return value
        raise KeyError(label)


# --------------------------------------------------------------------------- inputs


def _window(start: float, end: float) -> tuple[float, float]:
    s, e = float(start), float(end)
    if not (math.isfinite(s) and math.isfinite(e)) or s < 0 or s >= e:
        raise ValueError("the window must satisfy 0 <= start < end (days from now), finite")
    return s, e


def _unique_rows(*columns: FloatArray) -> tuple[list[FloatArray], NDArray[np.intp]]:
    """Distinct rows of up to three non-negative columns (sorted) and each input's row.

    Whole-day data (the product's) pack into one int64 key, 21 bits a column, as the fit
    does; anything else is sorted with ``lexsort`` (``np.unique(axis=0)`` is far slower).
    """
    limit = float(1 << 21)
    if all(bool(np.all(np.round(c) == c)) and float(c.max(initial=0.0)) < limit for c in columns):
        key = np.zeros(columns[0].shape[0], dtype=np.int64)
        for c in columns:
            key = (key << 21) | c.astype(np.int64)
        keys, inverse = np.unique(key, return_inverse=True)
        mask = (1 << 21) - 1
        shifts = [21 * (len(columns) - 1 - i) for i in range(len(columns))]
        return [((keys >> sh) & mask).astype(np.float64) for sh in shifts], inverse.reshape(-1)
    order = np.lexsort(columns[::-1])
    new = np.ones(order.shape[0], dtype=bool)
    for c in columns:
        sc = c[order]
        new[1:] |= sc[1:] != sc[:-1]
    inverse = np.empty(order.shape[0], dtype=np.intp)
    inverse[order] = np.cumsum(new) - 1
    first = order[new]
    return [c[first].copy() for c in columns], inverse


# --------------------------------------------------------------------------- moments


def _beta_nodes(a: float, b: float, n: int) -> tuple[FloatArray, FloatArray]:
    """Gauss–Jacobi nodes and weights (summing to 1) for the Beta(a, b) density on [0, 1].

    Golub–Welsch on the Jacobi matrix of the monic Jacobi polynomials with weight
    (1 − t)^(b−1) (1 + t)^(a−1) on [−1, 1], mapped by p = (1 + t)/2. SciPy's
    ``roots_jacobi`` overflows for b in the thousands (customers with thousands of
    purchase days); this does not.
    """
    al, be = b - 1.0, a - 1.0  # exponents of (1 − t) and (1 + t)
    k = np.arange(n, dtype=np.float64)
    s = 2.0 * k + al + be
    diag = np.empty(n)
    diag[0] = (be - al) / (al + be + 2.0)
    diag[1:] = (be * be - al * al) / (s[1:] * (s[1:] + 2.0))
    off2 = np.empty(max(n - 1, 0))
    if n > 1:  # m = 1 with (m + al + be) cancelled: defined when al + be = −1 (a + b = 1)
        off2[0] = 4.0 * (1.0 + al) * (1.0 + be) / ((2.0 + al + be) ** 2 * (3.0 + al + be))
    m = np.arange(2, n, dtype=np.float64)
    sm = 2.0 * m + al + be
    off2[1:] = 4.0 * m * (m + al) * (m + be) * (m + al + be) / (sm * sm * (sm + 1.0) * (sm - 1.0))
    t, vectors = linalg.eigh_tridiagonal(diag, np.sqrt(off2))
    weights = vectors[0] ** 2
    nodes = np.clip((1.0 + t) / 2.0, 0.0, 1.0)
    return nodes, weights / weights.sum()


def _nodes_for(ratio: float, power: float) -> int:
    """Gauss nodes for the p-integral, from a bound on the error of Gauss quadrature.

    The integrand is analytic in p except where 1 + p·ratio = 0 (ratio = end/A), and is at
    most |1 + p·ratio|^(−power) in modulus; on the Bernstein ellipse of [0, 1] with
    parameter ρ = e^u that is δ(u)^(−power), δ(u) = 1 − ratio(cosh u − 1)/2 (its leftmost
    point), and the error is below 4 δ^(−power) ρ^(−2n)/(ρ − 1) relative to the integrand's
    scale. n is the smallest meeting _QUAD_TOL over a grid of u (conservative: in the cases
    tried about half as many nodes already gave 1e-13).
    """
    u0 = math.acosh(1.0 + 2.0 / ratio)
    u = np.linspace(u0 / 400.0, u0 * 0.999, 400)
    delta = 1.0 - ratio * (np.cosh(u) - 1.0) / 2.0
    needed = (power * -np.log(delta) + math.log(4.0 / _QUAD_TOL) - np.log(np.expm1(u))) / (2 * u)
    return min(max(math.ceil(float(needed.min())), _MIN_NODES), _MAX_NODES)


def _phi_over_z2(R: float, z: FloatArray) -> FloatArray:
    """φ(z)/z² = R(R+1)/2 · ₂F₁(R+2, 2; 3; −z), with φ(z) = 1 − (1+z)^(−(R+1))(1 + (R+1)z)."""
    out = np.empty_like(z)
    small = (R + 2.0) * z < _SERIES_BELOW
    zs = z[small]
    term = np.ones_like(zs)
    total = np.ones_like(zs)  # j = 0 term of Σ (R+2)_j (2)_j / ((3)_j j!) (−z)^j
    for j in range(1, _SERIES_TERMS):
        term = term * (-(R + 1.0 + j) * zs / j)
        total += term * (2.0 / (j + 2.0))
    out[small] = R * (R + 1.0) / 2.0 * total
    zb = z[~small]
    k = R + 1.0
    out[~small] = -np.expm1(-k * np.log1p(zb)) - k * zb * np.exp(-k * np.log1p(zb))
    out[~small] /= zb * zb
    return out


def _alive_moments(
    params: BgNbdParams, x: FloatArray, T: FloatArray, start: float, end: float
) -> tuple[FloatArray, FloatArray]:
    """(E[N | alive at T], E[N(N−1) | alive at T]) per (x, T) pair, by quadrature over p.

    The first is for checking (the model's closed form gives it); ``x`` must be sorted.
    """
    m1 = np.empty_like(x)
    f2 = np.empty_like(x)
    span = end - start
    bounds = np.flatnonzero(np.diff(x)) + 1
    for lo, hi in zip(
        np.concatenate([[0], bounds]), np.concatenate([bounds, [x.shape[0]]]), strict=True
    ):
        if lo == hi:
            continue
        xv = float(x[lo])
        A = params.alpha + T[lo:hi, None]
        R = params.r + xv
        p, w = _beta_nodes(params.a, params.b + xv, _nodes_for(end / float(A.min()), R + 4.0))
        lead = np.exp(-R * np.log1p(p * start / A))
        base = A + p * start
        z = p * span / base
        safe = np.maximum(z, 1e-300)
        gain = np.where(z > 1e-12, -np.expm1(-R * np.log1p(z)) / safe, R)  # (1 − (1+z)^−R)/z
        m1[lo:hi] = (lead * gain * (span / base)) @ w
        pair = (
            2.0
            * (1.0 - p)
            * lead
            * (span / base) ** 2
            * _phi_over_z2(R, z.ravel()).reshape(z.shape)
        )
        f2[lo:hi] = pair @ w
    return m1, f2


def _given_alive(params: BgNbdParams, t: float, x: FloatArray, T: FloatArray) -> FloatArray:
    """E[X(T, T+t) | alive at T] per (x, T) pair, from the model's closed form."""
    if t == 0.0:
        return np.zeros_like(x)
    # expected_purchases = given-alive × p_alive; any t_x serves, t_x = T keeps p_alive ≥ 1/(1+a/b).
    t_x = np.where(x > 0, T, 0.0)
    alive = model.p_alive(params, x, t_x, T)
    return np.asarray(model.expected_purchases(params, t, x, t_x, T) / alive, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class _Prepared:
    x: FloatArray
    t_x: FloatArray
    T: FloatArray
    inverse: NDArray[np.intp]  # customer → row
    px: FloatArray  # distinct (x, T) pairs, sorted by x
    pT: FloatArray
    pair: NDArray[np.intp]  # row → pair


def _prepare(x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> _Prepared:
    xa, ta, Ta = model._rfm_arrays(x, t_x, T)
    (ux, ut, uT), inverse = _unique_rows(xa, ta, Ta)
    (px, pT), pair = _unique_rows(ux, uT)
    return _Prepared(ux, ut, uT, inverse, px, pT, pair)


def _row_means(params: BgNbdParams, d: _Prepared, start: float, end: float) -> FloatArray:
    alive = model.p_alive(params, d.x, d.t_x, d.T)
    given = _given_alive(params, end, d.px, d.pT) - _given_alive(params, start, d.px, d.pT)
    return np.asarray(alive * given[d.pair], dtype=np.float64)


def _row_moments(
    params: BgNbdParams, d: _Prepared, start: float, end: float
) -> tuple[FloatArray, FloatArray]:
    alive = model.p_alive(params, d.x, d.t_x, d.T)
    given = _given_alive(params, end, d.px, d.pT) - _given_alive(params, start, d.px, d.pT)
    _, f2 = _alive_moments(params, d.px, d.pT, start, end)
    mean = alive * given[d.pair]
    var = np.maximum(alive * f2[d.pair] + mean - mean * mean, 0.0)
    return np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)


def window_moments(
    params: BgNbdParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,
    window: tuple[float, float],
) -> tuple[FloatArray, FloatArray]:
    """Each customer's mean and variance of purchase days in ``(T + start, T + end]``.

    Given the parameters (no parameter uncertainty): see the module's docstring.
    """
    start, end = _window(*window)
    d = _prepare(x, t_x, T)
    mean, var = _row_moments(params, d, start, end)
    return mean[d.inverse], var[d.inverse]


# --------------------------------------------------------------------------- parameters


def parameter_covariance(
    params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike
) -> FloatArray:
    """Covariance of the estimates of (log r, log α, log a, log b): inverse observed information.

    ``x, t_x, T`` are the calibration summaries ``params`` were fitted on. The same
    computation as the fit's: its diagonal, times the parameters squared, is the square of
    ``params.std_errors``.
    """
    xa, ta, Ta = model._rfm_arrays(x, t_x, T)
    rows = model._prepare(xa, ta, Ta, compress=True)
    theta = np.log(np.array([params.r, params.alpha, params.a, params.b], dtype=np.float64))

    def objective(th: FloatArray) -> tuple[float, FloatArray]:
        return model._bgnbd_objective(th, rows)

    hess = model._hessian(objective, theta)
    return np.asarray(np.linalg.inv(hess) / float(xa.shape[0]), dtype=np.float64)


def _with_log_params(params: BgNbdParams, theta: FloatArray) -> BgNbdParams:
    r, alpha, a, b = (float(v) for v in np.exp(theta))
    return BgNbdParams(
        r,
        alpha,
        a,
        b,
        params.log_likelihood,
        params.customers,
        params.repeat_buyers,
        params.std_errors,
    )


def _log_covariance(value: ArrayLike) -> FloatArray:
    cov = np.asarray(value, dtype=np.float64)
    if cov.shape != (4, 4) or not np.isfinite(cov).all() or not np.allclose(cov, cov.T):
        raise ValueError("log_covariance must be a finite symmetric 4 × 4 matrix")
    if float(np.linalg.eigvalsh(cov)[0]) < -1e-12 * max(float(np.abs(cov).max()), 1e-300):
        raise ValueError("log_covariance must be positive semi-definite")
    return cov


# --------------------------------------------------------------------------- intervals


def _intervals(
    expected: FloatArray, variance: FloatArray
) -> tuple[FloatArray, FloatArray, list[IntervalMethod]]:
    """95% intervals for totals with these means and variances (see the module docstring)."""
    # Imported here: `scipy.stats` takes ~1 s to import, and every service process imports
    # this module (the platform's registry) while only a forecast needs it.
    from scipy import stats

    tail = (1.0 - LEVEL) / 2.0
    sd = np.sqrt(variance)
    low = np.maximum(expected - _Z * sd, 0.0)
    high = expected + _Z * sd
    methods: list[IntervalMethod] = ["normal"] * expected.shape[0]
    small = expected < NORMAL_FROM
    over = small & (variance > expected * (1.0 + 1e-9)) & (expected > 0.0)
    under = small & ~over
    if over.any():
        mu, var = expected[over], variance[over]
        n, prob = mu * mu / (var - mu), mu / var
        low[over] = stats.nbinom.ppf(tail, n, prob)
        high[over] = stats.nbinom.ppf(1.0 - tail, n, prob)
    if under.any():
        mu = expected[under]
        positive = mu > 0.0
        low[under] = np.where(positive, stats.poisson.ppf(tail, np.maximum(mu, 1e-300)), 0.0)
        high[under] = np.where(positive, stats.poisson.ppf(1.0 - tail, np.maximum(mu, 1e-300)), 0.0)
    for i in np.flatnonzero(over):
        methods[i] = "negative binomial"
    for i in np.flatnonzero(under):
        methods[i] = "poisson"
    return low, high, methods


# --------------------------------------------------------------------------- forecast


def forecast_window(
    params: BgNbdParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,
    window: tuple[float, float],
    *,
    groups: ArrayLike | None = None,
    log_covariance: ArrayLike | None = None,
) -> PromotionForecast:
    """Forecast purchase days in ``(T + start, T + end]`` (``window`` in days from now).

    ``groups``: optional integer labels, one per customer, for a breakdown by label.
    ``log_covariance``: the 4 × 4 covariance of (log r, log α, log a, log b) (from
    :func:`parameter_covariance`) to include parameter uncertainty; without it the
    interval is given the parameters. Invalid input is a caller error: ValueError.
    """
    start, end = _window(*window)
    d = _prepare(x, t_x, T)
    n = int(d.inverse.shape[0])
    if groups is None:
        label_of = np.zeros(n, dtype=np.intp)
        labels: NDArray[np.int64] = np.zeros(0, dtype=np.int64)
    else:
        raw = np.asarray(groups)
        if raw.shape != (n,) or raw.dtype.kind not in "iub":
            raise ValueError("groups must be integer labels, one per customer")
        labels, label_inv = np.unique(raw.astype(np.int64), return_inverse=True)
        label_of = label_inv.reshape(-1)
    cov = None if log_covariance is None else _log_covariance(log_covariance)
    k = max(int(labels.shape[0]), 1)

    mean, var = _row_moments(params, d, start, end)

    def per_group(row_values: FloatArray) -> FloatArray:
        return np.asarray(
            np.bincount(label_of, weights=row_values[d.inverse], minlength=k), dtype=np.float64
        )

    g_mean, g_var = per_group(mean), per_group(var)
    counts = np.bincount(label_of, minlength=k)
    g_param = np.zeros(k)
    total_param = 0.0
    if cov is not None:
        theta = np.log(np.array([params.r, params.alpha, params.a, params.b]))
        grad = np.empty((k, 4))
        for i in range(4):
            step = np.zeros(4)
            step[i] = _DELTA_STEP
            up = _row_means(_with_log_params(params, theta + step), d, start, end)
            down = _row_means(_with_log_params(params, theta - step), d, start, end)
            grad[:, i] = per_group((up - down) / (2.0 * _DELTA_STEP))
        g_param = np.einsum("gi,ij,gj->g", grad, cov, grad)
        total_grad = grad.sum(axis=0)
        total_param = float(total_grad @ cov @ total_grad)
    means = np.append(g_mean, g_mean.sum())
    variances = np.append(g_var, g_var.sum())
    param_vars = np.append(g_param, total_param)
    low, high, methods = _intervals(means, variances + param_vars)
    sizes = np.append(counts, n)
    totals = [
        WindowTotal(
            int(sizes[i]),
            float(means[i]),
            float(variances[i]),
            float(param_vars[i]),
            float(low[i]),
            float(high[i]),
            methods[i],
        )
        for i in range(means.shape[0])
    ]
    total = totals[-1]
    by_group = tuple((int(label), totals[i]) for i, label in enumerate(labels))
    return PromotionForecast(start, end, total, by_group, cov is not None)

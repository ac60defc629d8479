"""BG/NBD repurchase model and Gamma-Gamma spend model, fitted by maximum likelihood.

Pure and vectorised: every function takes numpy arrays with one element per customer and
loops over customers nowhere. Nothing here touches a database, a clock or the network.

Models
------
* BG/NBD — Fader, Hardie & Lee (2005), "Counting Your Customers the Easy Way: An
  Alternative to the Pareto/NBD Model", Marketing Science 24(2). While alive a customer
  buys at Poisson rate λ ~ Gamma(r, α); after each purchase they drop out with probability
  p ~ Beta(a, b). A customer is summarised by ``x`` (repeat purchases: purchase *days*
  after the first one), ``t_x`` (day of the last purchase, counted from the first) and
  ``T`` (age: days from the first purchase to the end of the calibration period).
* Gamma-Gamma — Fader, Hardie & Lee (2005), "RFM and CLV: Using Iso-Value Curves for
  Customer Base Analysis", Journal of Marketing Research 42(4); and Fader & Hardie (2013),
  "The Gamma-Gamma Model of Monetary Value". A purchase's value is Gamma(p, ν) with
  ν ~ Gamma(q, γ) across customers; it is fitted on repeat buyers' mean repeat spend.

The time unit is whatever the inputs are in; the product uses days (`summarise` returns
days). Parameters scale with the unit: α in days is 7 × α in weeks, the others are
dimensionless.

Refusals
--------
A fit that the data cannot support raises :class:`FitRefused` with a reason; it never
returns made-up parameters. Reasons: too few customers (< ``MIN_CUSTOMERS``) or repeat
buyers (< ``MIN_REPEAT_BUYERS``; Gamma-Gamma: < ``MIN_SPEND_REPEAT_BUYERS``), an optimiser
that did not converge (the gradient of the mean log-likelihood not ≈ 0 after restarts), and
a degenerate optimum: a non-finite value, a parameter that ran to its bound (1e-6 or 1e6,
i.e. the likelihood prefers a limit such as "no heterogeneity", where the model's
parameters are not defined) or drifts toward one along a flat ridge, a likelihood that is
flat in some direction (the Hessian is not positive definite), or a parameter the data
leave undetermined (standard error of its logarithm over 5). Gamma-Gamma also refuses
q ≤ 1, for which the model's mean spend is infinite.

Why these thresholds: the four BG/NBD parameters describe *heterogeneity* across
customers, and the dropout pair (a, b) is learnt from repeat buyers only. Refitting random
subsets of the CDNOW sample: with 30 customers (≈ 12 repeat buyers) half the fits are
refused as degenerate and the rest scatter over orders of magnitude; with 100 (≈ 40 repeat
buyers) five in six fit and their median is near the full-sample fit; from 1,000 every fit
does. Below 100 customers / 20 repeat buyers a fit would describe noise, not the shop, so it
is refused up front; above them the checks on the optimum refuse what the data still do not
support (including a standard error over 5 on the log scale: an interval spanning a factor
over 10^4). Gamma-Gamma is more fragile (a ridge toward p → ∞): 50 repeat buyers with spend,
where most CDNOW subsets fit near the full-sample values.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, special

FloatArray = NDArray[np.float64]

MIN_CUSTOMERS: Final = 100
"""BG/NBD refuses with fewer customers than this."""
MIN_REPEAT_BUYERS: Final = 20
"""BG/NBD refuses with fewer customers with at least one repeat purchase day than this."""
MIN_SPEND_REPEAT_BUYERS: Final = 50
"""Gamma-Gamma refuses with fewer repeat buyers (with a positive mean spend) than this."""

PARAM_MIN: Final = 1e-6
PARAM_MAX: Final = 1e6
_LOG_BOUNDS: Final = (math.log(PARAM_MIN), math.log(PARAM_MAX))
_BOUND_MARGIN: Final = 0.05  # in log units: within ~5% of a bound counts as "at the bound"
_GRAD_TOL: Final = 1e-5  # max |d mean-LL / d log θ| accepted as a stationary point
_RESTARTS: Final = 3
_DRIFT_LOG: Final = math.log(1e4)  # not converged out here: drifting toward a limit
_MAX_LOG_SE: Final = 5.0  # se(log θ) above this: a 95% interval spans a factor > 10^4


class FitRefused(Exception):
    """The data cannot support a fit; ``reason`` says why (shown to the operator)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class BgNbdParams:
    """Fitted BG/NBD parameters (α in the unit of the inputs: days in the product).

    ``std_errors`` are the asymptotic standard errors of (r, α, a, b) from the observed
    information (delta method from the log-parameters).
    """

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    customers: int
    repeat_buyers: int
    std_errors: tuple[float, float, float, float]


@dataclass(frozen=True)
class GammaGammaParams:
    """Fitted Gamma-Gamma parameters; ``customers`` is the number of repeat buyers used."""

    p: float
    q: float
    gamma: float
    log_likelihood: float
    customers: int
    std_errors: tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class Summary:
    """Per-customer calibration summary, one element per customer, times in days.

    ``x``: repeat purchase days; ``t_x``: days from the first purchase day to the last;
    ``T``: days from the first purchase day to ``calibration_end``; ``monetary``: mean
    spend per repeat purchase day (the first day excluded, as in "RFM and CLV"), 0 when
    ``x`` is 0.
    """

    customer_ids: NDArray[Any]
    x: FloatArray
    t_x: FloatArray
    T: FloatArray
    monetary: FloatArray
    calibration_end: dt.date


# --------------------------------------------------------------------------- summary


def _to_days(purchased_at: ArrayLike) -> NDArray[np.int64]:
    raw = np.asarray(purchased_at)
    if raw.dtype.kind == "M":
        days = raw.astype("datetime64[D]")
    elif raw.dtype.kind in "OU":
        # An aware datetime's calendar date is taken in its own offset: callers convert to
        # the shop's time zone first. Dates and ISO strings pass through.
        flat = [v.date() if isinstance(v, dt.datetime) else v for v in raw.ravel().tolist()]
        days = np.asarray(flat, dtype="datetime64[D]").reshape(raw.shape)
    else:
        raise ValueError(f"purchase times must be dates or datetimes, not {raw.dtype}")
    if np.isnat(days).any():
        raise ValueError("purchase times contain NaT")
    return days.astype(np.int64)


def summarise(
    customer_ids: ArrayLike,
    purchased_at: ArrayLike,
    amounts: ArrayLike | None,
    calibration_end: dt.date,
) -> Summary:
    """Turn purchases (one row per order) into per-customer ``(x, t_x, T, monetary)``.

    Purchases are taken by calendar day: several orders on one day are one purchase day
    (their amounts summed), as Fader, Hardie & Lee do with CDNOW. ``calibration_end`` is
    the last day of the calibration period and is included; ``T`` counts days from the
    first purchase day to it (so a customer first seen on that day has ``T`` = 0). Orders
    after it are ignored, and customers whose first purchase is after it are left out.
    Only purchases belong here: refunds-only and cancelled orders are the caller's to drop;
    amounts must be finite and ≥ 0. With ``amounts`` None, ``monetary`` is all zeros.
    """
    ids = np.asarray(customer_ids)
    days = _to_days(purchased_at)
    n = ids.shape[0] if ids.ndim else 0
    if ids.ndim != 1 or days.shape != (n,):
        raise ValueError("customer_ids and purchased_at must be 1-D and of the same length")
    amt = np.zeros(n) if amounts is None else np.asarray(amounts, dtype=np.float64)
    if amt.shape != (n,):
        raise ValueError("amounts must have one value per purchase")
    if not np.isfinite(amt).all() or (amt < 0).any():
        raise ValueError("amounts must be finite and non-negative")
    end = int(np.datetime64(calibration_end, "D").astype(np.int64))
    keep = days <= end
    ids, days, amt = ids[keep], days[keep], amt[keep]
    if ids.shape[0] == 0:
        empty = np.zeros(0)
        return Summary(ids[:0], empty, empty, empty, empty, calibration_end)
    uniq, inv = np.unique(ids, return_inverse=True)
    order = np.lexsort((days, inv))
    inv, days, amt = inv[order], days[order], amt[order]
    new_day = np.ones(inv.shape[0], dtype=bool)
    new_day[1:] = (inv[1:] != inv[:-1]) | (days[1:] != days[:-1])
    day_start = np.flatnonzero(new_day)
    day_cust, day_day = inv[day_start], days[day_start]
    day_amt = np.add.reduceat(amt, day_start)
    new_cust = np.ones(day_cust.shape[0], dtype=bool)
    new_cust[1:] = day_cust[1:] != day_cust[:-1]
    cust_start = np.flatnonzero(new_cust)
    cust_end = np.append(cust_start[1:], day_cust.shape[0])
    first, last = day_day[cust_start], day_day[cust_end - 1]
    x = (cust_end - cust_start - 1).astype(np.float64)
    repeat_spend = np.add.reduceat(day_amt, cust_start) - day_amt[cust_start]
    monetary = np.divide(repeat_spend, x, out=np.zeros_like(x), where=x > 0)
    return Summary(
        customer_ids=uniq[day_cust[cust_start]],
        x=x,
        t_x=(last - first).astype(np.float64),
        T=(end - first).astype(np.float64),
        monetary=monetary,
        calibration_end=calibration_end,
    )


# --------------------------------------------------------------------------- BG/NBD


def _rfm_arrays(
    x: ArrayLike, t_x: ArrayLike, T: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    xa = np.asarray(x, dtype=np.float64)
    ta = np.asarray(t_x, dtype=np.float64)
    Ta = np.asarray(T, dtype=np.float64)
    if not (xa.shape == ta.shape == Ta.shape) or xa.ndim != 1:
        raise ValueError("x, t_x and T must be 1-D arrays of the same length")
    if not (np.isfinite(xa).all() and np.isfinite(ta).all() and np.isfinite(Ta).all()):
        raise ValueError("x, t_x and T must be finite")
    if (xa < 0).any() or (xa != np.round(xa)).any():
        raise ValueError("x must be non-negative whole numbers")
    if (ta < 0).any() or (ta > Ta).any():
        raise ValueError("0 <= t_x <= T must hold")
    if ((xa > 0) & (ta <= 0)).any() or ((xa == 0) & (ta != 0)).any():
        raise ValueError("t_x must be > 0 when x > 0 and 0 when x is 0")
    return xa, ta, Ta


@dataclass(frozen=True, eq=False)
class _Rows:
    """Distinct (x, t_x, T) rows with their counts, and the distinct values of each column.

    Day-grained summaries repeat a lot (a million customers make a few hundred thousand
    distinct rows, a few hundred distinct x and T), so the special functions of x and the
    logarithms of t_x and T are evaluated once per distinct value and gathered.
    """

    x: FloatArray
    t_x: FloatArray
    T: FloatArray
    w: FloatArray
    pos: NDArray[np.bool_]
    xm1: FloatArray
    x_values: FloatArray
    x_index: NDArray[np.intp]
    x_weight: FloatArray
    t_values: FloatArray
    t_index: NDArray[np.intp]
    T_values: FloatArray
    T_index: NDArray[np.intp]


def _distinct_rows(x: FloatArray, t_x: FloatArray, T: FloatArray) -> tuple[FloatArray, ...]:
    limit = float(1 << 21)
    whole = bool(np.all(np.round(t_x) == t_x)) and bool(np.all(np.round(T) == T))
    if whole and float(x.max(initial=0)) < limit and float(T.max(initial=0)) < limit:
        # Whole days: pack each row into one int64 (21 bits a column) and sort that.
        key = (x.astype(np.int64) << 42) | (t_x.astype(np.int64) << 21) | T.astype(np.int64)
        keys, counts = np.unique(key, return_counts=True)
        mask = (1 << 21) - 1
        return (
            (keys >> 42).astype(np.float64),
            ((keys >> 21) & mask).astype(np.float64),
            (keys & mask).astype(np.float64),
            counts.astype(np.float64),
        )
    rows, counts = np.unique(np.column_stack([x, t_x, T]), axis=0, return_counts=True)
    return rows[:, 0].copy(), rows[:, 1].copy(), rows[:, 2].copy(), counts.astype(np.float64)


def _prepare(x: FloatArray, t_x: FloatArray, T: FloatArray, compress: bool) -> _Rows:
    if compress:
        ux, ut, uT, w = _distinct_rows(x, t_x, T)
    else:
        ux, ut, uT, w = x, t_x, T, np.ones_like(x)
    x_values, x_index = np.unique(ux, return_inverse=True)
    t_values, t_index = np.unique(ut, return_inverse=True)
    T_values, T_index = np.unique(uT, return_inverse=True)
    return _Rows(
        x=ux,
        t_x=ut,
        T=uT,
        w=w,
        pos=ux > 0,
        xm1=np.maximum(ux - 1.0, 0.0),
        x_values=x_values,
        x_index=x_index,
        x_weight=np.asarray(
            np.bincount(x_index, weights=w, minlength=x_values.shape[0]), dtype=np.float64
        ),
        t_values=t_values,
        t_index=t_index,
        T_values=T_values,
        T_index=T_index,
    )


def _bgnbd_parts(
    theta: FloatArray, d: _Rows
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """(A1 + A2 per distinct x, A3, A4, log-sum-exp(A3, A4), log(α+T), log(α+t_x)) per row.

    The paper's equation (6): L = A1 · A2 · (A3 + δ(x>0) A4), here in logs.
    """
    r, alpha, a, b = (float(v) for v in np.exp(theta))
    xv = d.x_values
    a12 = (
        special.gammaln(r + xv)
        - special.gammaln(r)
        + r * math.log(alpha)
        + special.gammaln(a + b)
        + special.gammaln(b + xv)
        - special.gammaln(b)
        - special.gammaln(a + b + xv)
    )
    log_aT = np.log(alpha + d.T_values)[d.T_index]
    log_atx = np.log(alpha + d.t_values)[d.t_index]
    rx = r + d.x
    a3 = -rx * log_aT
    a4 = np.where(d.pos, math.log(a) - np.log(b + d.xm1) - rx * log_atx, -np.inf)
    return a12, a3, a4, np.logaddexp(a3, a4), log_aT, log_atx


def _bgnbd_row_ll(theta: FloatArray, d: _Rows) -> FloatArray:
    a12, _, _, lse, _, _ = _bgnbd_parts(theta, d)
    return np.asarray(a12[d.x_index] + lse, dtype=np.float64)


def _bgnbd_objective(theta: FloatArray, d: _Rows) -> tuple[float, FloatArray]:
    """Mean negative log-likelihood per customer and its gradient in log-parameters."""
    r, alpha, a, b = (float(v) for v in np.exp(theta))
    a12, a3, a4, lse, log_aT, log_atx = _bgnbd_parts(theta, d)
    total = float(d.x_weight.sum())
    ll = float(d.x_weight @ a12) + float(d.w @ lse)
    ww3 = d.w * np.exp(a3 - lse)
    ww4 = d.w * np.exp(a4 - lse)  # 0 where x = 0
    xv, xw = d.x_values, d.x_weight
    rx = r + d.x
    psi_ab, psi_b = special.digamma(a + b), special.digamma(b)
    psi_abx = special.digamma(a + b + xv)
    d_r = float(xw @ (special.digamma(r + xv) - special.digamma(r) + math.log(alpha)))
    d_r -= float(ww3 @ log_aT) + float(ww4 @ log_atx)
    d_alpha = total * r / alpha - float(ww3 @ (rx / (alpha + d.T)) + ww4 @ (rx / (alpha + d.t_x)))
    sum_w4 = float(ww4.sum())
    d_a = float(xw @ (psi_ab - psi_abx)) + sum_w4 / a
    d_b = float(xw @ (psi_ab + special.digamma(b + xv) - psi_b - psi_abx))
    d_b -= float(ww4 @ (1.0 / (b + d.xm1)))
    grad = np.array([d_r * r, d_alpha * alpha, d_a * a, d_b * b]) / total
    return -ll / total, -grad


def bgnbd_log_likelihood(
    r: float, alpha: float, a: float, b: float, x: ArrayLike, t_x: ArrayLike, T: ArrayLike
) -> FloatArray:
    """Each customer's BG/NBD log-likelihood (equation 6 of the paper, in logs)."""
    xa, ta, Ta = _rfm_arrays(x, t_x, T)
    theta = np.log(np.array([r, alpha, a, b], dtype=np.float64))
    return _bgnbd_row_ll(theta, _prepare(xa, ta, Ta, compress=False))


Objective = Callable[[FloatArray], tuple[float, FloatArray]]


def _maximise(
    objective: Objective,
    start: FloatArray,
    names: tuple[str, ...],
    what: str,
    customers: int,
) -> tuple[FloatArray, float, FloatArray]:
    """Minimise a mean negative log-likelihood over log-parameters; refuse when unsound.

    Returns the log-parameters, the mean negative log-likelihood and the standard errors
    of the log-parameters (from the observed information of ``customers`` customers).
    """
    bounds = [_LOG_BOUNDS] * len(start)
    theta = start
    message = ""
    for _ in range(_RESTARTS):
        res = optimize.minimize(
            objective,
            theta,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-9},
        )
        theta = np.asarray(res.x, dtype=np.float64)
        message = str(res.message)
        value, grad = objective(theta)
        if not (math.isfinite(value) and np.isfinite(theta).all() and np.isfinite(grad).all()):
            raise FitRefused(f"{what}: the likelihood is not finite at the optimum")
        at_bound = np.abs(theta - _LOG_BOUNDS[0]) < _BOUND_MARGIN
        at_bound |= np.abs(theta - _LOG_BOUNDS[1]) < _BOUND_MARGIN
        if at_bound.any():
            detail = ", ".join(
                f"{names[i]} → {'lower' if theta[i] < 0 else 'upper'} bound "
                f"{PARAM_MIN if theta[i] < 0 else PARAM_MAX:g}"
                for i in np.flatnonzero(at_bound)
            )
            raise FitRefused(
                f"{what}: degenerate optimum ({detail}); the data favour a limit of the "
                "model, so its parameters are not identified"
            )
        if np.max(np.abs(grad)) <= _GRAD_TOL:
            break
    else:
        drifting = np.abs(theta) > _DRIFT_LOG
        if drifting.any():
            detail = ", ".join(
                f"{names[i]} = {math.exp(theta[i]):.3g}" for i in np.flatnonzero(drifting)
            )
            raise FitRefused(
                f"{what}: degenerate optimum (the optimiser drifts along a flat ridge toward "
                f"a limit of the model: {detail}); the parameters are not identified"
            )
        raise FitRefused(
            f"{what}: the optimiser did not converge (max |gradient| "
            f"{float(np.max(np.abs(grad))):.2g} after {_RESTARTS} runs: {message})"
        )
    hess = _hessian(objective, theta)
    eig = np.linalg.eigvalsh(hess)
    if not np.isfinite(eig).all() or eig[0] <= 1e-10 * max(float(eig[-1]), 1e-300):
        raise FitRefused(
            f"{what}: degenerate optimum (the likelihood is flat in some direction, so the "
            "parameters are not identified by this data)"
        )
    log_se = np.sqrt(np.diag(np.linalg.inv(hess)) / customers)
    if not np.isfinite(log_se).all() or (log_se > _MAX_LOG_SE).any():
        worst = int(np.argmax(np.where(np.isfinite(log_se), log_se, np.inf)))
        raise FitRefused(
            f"{what}: the data do not pin the parameters down ({names[worst]} = "
            f"{math.exp(theta[worst]):.3g} with a standard error of "
            f"{float(log_se[worst]):.3g} on the log scale, over {_MAX_LOG_SE:g})"
        )
    return theta, value, log_se


def _hessian(objective: Objective, theta: FloatArray, h: float = 1e-4) -> FloatArray:
    k = theta.shape[0]
    hess = np.empty((k, k))
    for i in range(k):
        step = np.zeros(k)
        step[i] = h
        hess[i] = (objective(theta + step)[1] - objective(theta - step)[1]) / (2 * h)
    return (hess + hess.T) / 2


def fit_bgnbd(
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,
    *,
    min_customers: int = MIN_CUSTOMERS,
    min_repeat_buyers: int = MIN_REPEAT_BUYERS,
) -> BgNbdParams:
    """Fit BG/NBD (r, α, a, b) by maximum likelihood, or raise :class:`FitRefused`.

    L-BFGS-B on the log-parameters with the analytic gradient of the mean log-likelihood,
    over the distinct (x, t_x, T) rows weighted by their counts. Invalid input (negative
    counts, t_x > T, …) is a caller error: ValueError.
    """
    xa, ta, Ta = _rfm_arrays(x, t_x, T)
    n = int(xa.shape[0])
    repeaters = int(np.count_nonzero(xa))
    if n < min_customers:
        raise FitRefused(f"too few customers to fit: {n} (at least {min_customers} needed)")
    if repeaters < min_repeat_buyers:
        raise FitRefused(
            f"too few repeat buyers to fit: {repeaters} of {n} customers bought on more "
            f"than one day (at least {min_repeat_buyers} needed)"
        )
    rows = _prepare(xa, ta, Ta, compress=True)

    def objective(theta: FloatArray) -> tuple[float, FloatArray]:
        return _bgnbd_objective(theta, rows)

    # Start: r = 1, α from the customers' overall repeat rate, a = 1, b = 2.
    rate = float(xa.sum()) / float(Ta.sum())
    start = np.log(np.array([1.0, 1.0 / max(rate, 1e-6), 1.0, 2.0]))
    start = np.clip(start, _LOG_BOUNDS[0] + 1, _LOG_BOUNDS[1] - 1)
    theta, value, log_se = _maximise(
        objective, start, ("r", "alpha", "a", "b"), "BG/NBD", customers=n
    )
    params = np.exp(theta)
    se = params * log_se
    r, alpha, a, b = (float(v) for v in params)
    return BgNbdParams(
        r=r,
        alpha=alpha,
        a=a,
        b=b,
        log_likelihood=-value * n,
        customers=n,
        repeat_buyers=repeaters,
        std_errors=(float(se[0]), float(se[1]), float(se[2]), float(se[3])),
    )


def p_alive(params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> FloatArray:
    """P(alive at T | x, t_x, T): 1 / (1 + δ(x>0) · a/(b+x−1) · ((α+T)/(α+t_x))^(r+x))."""
    xa = np.asarray(x, dtype=np.float64)
    ta = np.asarray(t_x, dtype=np.float64)
    Ta = np.asarray(T, dtype=np.float64)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    log_odds = (
        math.log(a)
        - np.log(b + np.maximum(xa - 1.0, 0.0))
        + (r + xa) * (np.log(alpha + Ta) - np.log(alpha + ta))
    )
    return np.asarray(np.where(xa > 0, special.expit(-log_odds), 1.0), dtype=np.float64)


def _expected_given_alive(
    r: float, alpha: float, a: float, b: float, t: FloatArray, x: FloatArray, T: FloatArray
) -> FloatArray:
    z = t / (alpha + T + t)
    hyp = special.hyp2f1(r + x, b + x, a + b + x - 1.0, z)
    term = 1.0 - np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + t))) * hyp
    return np.asarray((a + b + x - 1.0) / (a - 1.0) * term, dtype=np.float64)


def expected_purchases(
    params: BgNbdParams, t: ArrayLike, x: ArrayLike, t_x: ArrayLike, T: ArrayLike
) -> FloatArray:
    """E[purchase days in (T, T+t] | x, t_x, T] — the paper's equation (10).

    Arrays broadcast (``t`` may be a scalar). The closed form has a removable singularity
    at a = 1; within 1e-4 of it the value is interpolated between a = 1 ± 1e-4.
    """
    xa = np.asarray(x, dtype=np.float64)
    Ta = np.asarray(T, dtype=np.float64)
    ta = np.asarray(t, dtype=np.float64)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    h = 1e-4
    if abs(a - 1.0) < h:
        weight = (a - (1.0 - h)) / (2 * h)
        given_alive = (1.0 - weight) * _expected_given_alive(
            r, alpha, 1.0 - h, b, ta, xa, Ta
        ) + weight * _expected_given_alive(r, alpha, 1.0 + h, b, ta, xa, Ta)
    else:
        given_alive = _expected_given_alive(r, alpha, a, b, ta, xa, Ta)
    return np.asarray(given_alive * p_alive(params, xa, t_x, Ta), dtype=np.float64)


def probability_of_purchase(
    params: BgNbdParams, t: ArrayLike, x: ArrayLike, t_x: ArrayLike, T: ArrayLike
) -> FloatArray:
    """P(at least one purchase in (T, T+t] | x, t_x, T).

    Alive at T, the next purchase comes at rate λ whatever the dropout (dropout happens
    only just after a purchase) and λ | data, alive ~ Gamma(r+x, α+T), so this is
    P(alive) · (1 − ((α+T)/(α+T+t))^(r+x)).
    """
    xa = np.asarray(x, dtype=np.float64)
    Ta = np.asarray(T, dtype=np.float64)
    ta = np.asarray(t, dtype=np.float64)
    r, alpha = params.r, params.alpha
    within = -np.expm1((r + xa) * (np.log(alpha + Ta) - np.log(alpha + Ta + ta)))
    return np.asarray(p_alive(params, xa, t_x, Ta) * within, dtype=np.float64)


def days_to_next_purchase(
    params: BgNbdParams, x: ArrayLike, T: ArrayLike, quantile: float = 0.5
) -> FloatArray:
    """The likely next purchase: days after T until P(next purchase | alive) = quantile.

    Definition: the ``quantile`` (default the median) of the time from T to the next
    purchase, *given that the customer is still alive*: λ | data, alive ~ Gamma(r+x, α+T),
    so P(next within s) = 1 − ((α+T)/(α+T+s))^(r+x) and
    s = (α+T) · ((1 − quantile)^(−1/(r+x)) − 1). It does not depend on t_x. Read it with
    :func:`p_alive`: a customer probably gone still has a date, "if they are still a
    customer". Heterogeneity makes it long for customers with few purchases (small r+x).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError("quantile must be in (0, 1)")
    xa = np.asarray(x, dtype=np.float64)
    Ta = np.asarray(T, dtype=np.float64)
    k = params.r + xa
    return np.asarray((params.alpha + Ta) * np.expm1(-math.log1p(-quantile) / k), dtype=np.float64)


# --------------------------------------------------------------------------- Gamma-Gamma


def _gg_rows(
    theta: FloatArray, x: FloatArray, m: FloatArray, grad: bool
) -> tuple[FloatArray, FloatArray | None]:
    p, q, g = (float(v) for v in np.exp(theta))
    px = p * x
    log_gmx = np.log(g + m * x)
    ll = (
        special.gammaln(px + q)
        - special.gammaln(px)
        - special.gammaln(q)
        + q * math.log(g)
        + (px - 1.0) * np.log(m)
        + px * np.log(x)
        - (px + q) * log_gmx
    )
    if not grad:
        return ll, None
    psi_pxq = special.digamma(px + q)
    d_p = x * (psi_pxq - special.digamma(px) + np.log(m) + np.log(x) - log_gmx)
    d_q = psi_pxq - special.digamma(q) + math.log(g) - log_gmx
    d_g = q / g - (px + q) / (g + m * x)
    return ll, np.stack([d_p * p, d_q * q, d_g * g])


def fit_gamma_gamma(
    x: ArrayLike,
    monetary: ArrayLike,
    *,
    min_repeat_buyers: int = MIN_SPEND_REPEAT_BUYERS,
) -> GammaGammaParams:
    """Fit Gamma-Gamma (p, q, γ) on repeat buyers' mean repeat spend, or refuse.

    Only customers with x > 0 and a positive mean spend enter the fit (one-time buyers
    carry no spend information beyond the first purchase, which is excluded as in "RFM
    and CLV"; a zero mean has no Gamma density). The model assumes spend independent of
    purchase frequency; check that before relying on it.
    """
    xa = np.asarray(x, dtype=np.float64)
    ma = np.asarray(monetary, dtype=np.float64)
    if xa.shape != ma.shape or xa.ndim != 1:
        raise ValueError("x and monetary must be 1-D arrays of the same length")
    if not (np.isfinite(xa).all() and np.isfinite(ma).all()) or (xa < 0).any() or (ma < 0).any():
        raise ValueError("x and monetary must be finite and non-negative")
    use = (xa > 0) & (ma > 0)
    xs, ms = xa[use], ma[use]
    n = int(xs.shape[0])
    if n < min_repeat_buyers:
        raise FitRefused(
            f"too few repeat buyers with spend to fit the spend model: {n} "
            f"(at least {min_repeat_buyers} needed)"
        )
    total = float(n)

    def objective(theta: FloatArray) -> tuple[float, FloatArray]:
        ll, g = _gg_rows(theta, xs, ms, grad=True)
        assert g is not None
        return -float(ll.sum()) / total, -g.sum(axis=1) / total

    # Start: p = 1, q = 2, γ = mean spend, so that the model's mean spend pγ/(q−1) matches.
    start = np.log(np.array([1.0, 2.0, float(ms.mean())]))
    theta, value, log_se = _maximise(
        objective, start, ("p", "q", "gamma"), "Gamma-Gamma", customers=n
    )
    params = np.exp(theta)
    p, q, g = (float(v) for v in params)
    if q <= 1.0:
        raise FitRefused(
            f"Gamma-Gamma: q = {q:.3g} ≤ 1, so the model's mean spend is infinite "
            "(spend too heavy-tailed for this model)"
        )
    se = params * log_se
    return GammaGammaParams(
        p=p,
        q=q,
        gamma=g,
        log_likelihood=-value * total,
        customers=n,
        std_errors=(float(se[0]), float(se[1]), float(se[2])),
    )


def gamma_gamma_log_likelihood(
    p: float, q: float, gamma: float, x: ArrayLike, monetary: ArrayLike
) -> FloatArray:
    """Each repeat buyer's Gamma-Gamma log-likelihood of their mean spend (x > 0, m > 0)."""
    theta = np.log(np.array([p, q, gamma], dtype=np.float64))
    xa = np.asarray(x, dtype=np.float64)
    ma = np.asarray(monetary, dtype=np.float64)
    return _gg_rows(theta, xa, ma, grad=False)[0]


def expected_average_spend(
    params: GammaGammaParams, x: ArrayLike, monetary: ArrayLike
) -> FloatArray:
    """E[spend per purchase | x, mean spend m] = p(γ + x·m) / (p·x + q − 1).

    For x = 0 this is the population mean pγ/(q − 1): a one-time buyer's first purchase
    is not used, as in the fit.
    """
    xa = np.asarray(x, dtype=np.float64)
    ma = np.where(xa > 0, np.asarray(monetary, dtype=np.float64), 0.0)
    p, q, g = params.p, params.q, params.gamma
    return np.asarray(p * (g + xa * ma) / (p * xa + q - 1.0), dtype=np.float64)


def expected_customer_value(
    bgnbd: BgNbdParams,
    spend: GammaGammaParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,
    monetary: ArrayLike,
    *,
    horizon_days: float = 365.0,
    annual_discount_rate: float = 0.0,
    step_days: float = 30.0,
) -> FloatArray:
    """Expected revenue from each customer over the next ``horizon_days`` (residual value).

    Σ_k (E[Y(t_k)] − E[Y(t_{k−1})]) · E[spend] / (1 + d)^(t_k/365), t_k = k·step up to the
    horizon: each step's expected purchases are discounted at the step's end at the annual
    rate d (default 0: no discounting, i.e. E[Y(horizon)] · E[spend]). Revenue, not margin:
    multiply by a margin for profit. Defaults: one year, undiscounted — a seller's horizon,
    and a rate nobody has to guess.
    """
    if horizon_days <= 0 or step_days <= 0 or annual_discount_rate < 0:
        raise ValueError("horizon_days and step_days must be > 0, the discount rate >= 0")
    xa = np.asarray(x, dtype=np.float64)
    ta = np.asarray(t_x, dtype=np.float64)
    Ta = np.asarray(T, dtype=np.float64)
    avg = expected_average_spend(spend, xa, monetary)
    if annual_discount_rate == 0.0:
        return np.asarray(expected_purchases(bgnbd, horizon_days, xa, ta, Ta) * avg)
    steps = np.minimum(
        np.arange(1, math.ceil(horizon_days / step_days) + 1) * step_days, horizon_days
    )
    value = np.zeros(np.broadcast(xa, ta, Ta).shape)
    previous = np.zeros_like(value)
    for t_k in steps:  # loops over time steps, not customers
        cumulative = expected_purchases(bgnbd, float(t_k), xa, ta, Ta)
        value += (cumulative - previous) / (1.0 + annual_discount_rate) ** (t_k / 365.0)
        previous = cumulative
    return np.asarray(value * avg, dtype=np.float64)

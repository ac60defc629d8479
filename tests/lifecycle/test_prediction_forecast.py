"""The promotion forecast: its expectation is the model's, its variance is checked against an
independent computation and against simulation of the BG/NBD process, its intervals cover
simulated totals at the stated rate, and the breakdown, ordering and refusals behave.

Statistical tolerances are stated where they are used; every generator is seeded, so the
tests are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from services.lifecycle.prediction import forecast, model
from services.lifecycle.prediction.forecast import PromotionForecast
from services.lifecycle.prediction.model import BgNbdParams
from services.lifecycle.prediction.simulate import simulate_bgnbd, simulate_bgnbd_window

# The CDNOW fit in days (Fader, Hardie & Lee 2005), and a population with more regular buyers.
CDNOW = (0.243, 30.9, 0.793, 2.426)
REGULAR = (2.0, 20.0, 1.5, 3.0)


def _params(r: float, alpha: float, a: float, b: float) -> BgNbdParams:
    return BgNbdParams(r, alpha, a, b, 0.0, 0, 0, (0.0, 0.0, 0.0, 0.0))


def _population(
    seed: int, customers: int, params: tuple[float, float, float, float], start: float, end: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r, alpha, a, b = params
    rng = np.random.default_rng(seed)
    return simulate_bgnbd_window(rng, customers, r=r, alpha=alpha, a=a, b=b, start=start, end=end)


# --------------------------------------------------------------------------- expectation


@pytest.mark.parametrize("window", [(0.0, 30.0), (7.0, 37.0), (30.0, 365.0)])
def test_expected_total_is_the_sum_of_the_models_differences(
    window: tuple[float, float],
) -> None:
    p = _params(*CDNOW)
    x, t_x, T = simulate_bgnbd(np.random.default_rng(1), 20_000, r=p.r, alpha=p.alpha, a=p.a, b=p.b)
    start, end = window
    direct = model.expected_purchases(p, end, x, t_x, T) - model.expected_purchases(
        p, start, x, t_x, T
    )
    result = forecast.forecast_window(p, x, t_x, T, window)
    assert result.total.expected == pytest.approx(float(direct.sum()), rel=1e-10)
    assert result.total.customers == 20_000
    assert (result.start, result.end) == window
    assert not result.parameter_uncertainty and result.groups == ()
    mean, var = forecast.window_moments(p, x, t_x, T, window)
    assert np.allclose(mean, direct, rtol=1e-9, atol=1e-15)
    assert result.total.variance == pytest.approx(float(var.sum()), rel=1e-10)
    # N is a whole number, so E[N²] ≥ E[N]: the variance is at least mean − mean².
    assert np.all(var >= mean - mean * mean - 1e-12)


# --------------------------------------------------------------------------- the variance


def _brute_alive_moments(
    p: BgNbdParams, x: int, T: float, start: float, end: float, nodes: int = 80
) -> tuple[float, float]:
    """(E[N], E[N(N−1)]) given alive at T, from the discrete law, by product quadrature.

    Independent of the module's derivation: alive at T with (λ, p), the customer is alive
    at T+start with probability E[(1−p)^Poisson(λ·start)] = e^(−λp·start), and then makes
    N = min(M, K) purchases in the window, M ~ Poisson(λD), K ~ Geometric(p) on {1, 2, …}
    (memoryless), so P(N ≥ k) = P(M ≥ k)(1−p)^(k−1) and E[N(N−1)] = Σ 2(k−1) P(N ≥ k).
    λ ~ Gamma(r+x, α+T) by generalised Gauss–Laguerre, p ~ Beta(a, b+x) by SciPy's
    Gauss–Jacobi.
    """
    shape, rate, span = p.r + x, p.alpha + T, end - start
    u, wl = special.roots_genlaguerre(nodes, shape - 1.0)
    lam, wl = u / rate, wl / wl.sum()
    t, wp = special.roots_jacobi(nodes, p.b + x - 1.0, p.a - 1.0)
    stay, wp = 1.0 - (1.0 + t) / 2.0, wp / wp.sum()
    k = np.arange(1, 400)
    at_least = stats.poisson.sf(k[None, :] - 1, lam[:, None] * span)
    survive = at_least[:, None, :] * stay[None, :, None] ** (k - 1)
    weight = wl[:, None] * wp[None, :] * np.exp(-lam[:, None] * (1.0 - stay)[None, :] * start)
    return (
        float((weight * survive.sum(-1)).sum()),
        float((weight * (2.0 * (k - 1) * survive).sum(-1)).sum()),
    )


@pytest.mark.parametrize("params", [CDNOW, REGULAR])
def test_second_moment_matches_an_independent_computation(
    params: tuple[float, float, float, float],
) -> None:
    p = _params(*params)
    cases = [
        (0, 100.0, 0.0, 30.0),
        (2, 272.0, 7.0, 37.0),
        (5, 60.0, 10.0, 40.0),
        (12, 200.0, 0, 90),
    ]
    x = np.array([c[0] for c in cases], dtype=float)
    T = np.array([c[1] for c in cases])
    for i, (xi, Ti, start, end) in enumerate(cases):
        m1, f2 = forecast._alive_moments(p, x[i : i + 1], T[i : i + 1], start, end)
        brute = _brute_alive_moments(p, xi, Ti, start, end)
        assert (float(m1[0]), float(f2[0])) == pytest.approx(brute, rel=1e-10)


@pytest.mark.parametrize(
    ("params", "x", "T", "start", "end", "tolerance"),
    [
        (CDNOW, 0, 0.0, 0.0, 365.0, 1e-10),
        (CDNOW, 0, 0.0, 300.0, 365.0, 1e-10),
        (CDNOW, 30, 31.0, 0.0, 365.0, 1e-10),
        (CDNOW, 500, 700.0, 0.0, 30.0, 1e-10),
        # SciPy's roots_jacobi overflows here; the closed form's hyp2f1 is itself off by
        # 2e-9 (adaptive quadrature agrees with the Gauss–Jacobi value to 3e-13).
        (CDNOW, 3000, 3000.0, 0.0, 30.0, 1e-8),
        # a = 1: the closed form interpolates across its removable singularity (7e-10 off).
        ((0.243, 30.9, 1.0, 2.426), 5, 60.0, 0.0, 90.0, 1e-8),
        ((2.0, 5.0, 1.5, 3.0), 3, 0.0, 0.0, 365.0, 1e-10),
        ((0.5, 1.0, 0.5, 1.0), 0, 0.0, 0.0, 365.0, 1e-10),  # a singularity at p = −1/365
        ((0.5, 1.0, 2.5, 1.0), 1, 1.0, 0.0, 365.0, 1e-10),
    ],
)
def test_quadrature_reproduces_the_closed_form_mean(
    params: tuple[float, float, float, float],
    x: int,
    T: float,
    start: float,
    end: float,
    tolerance: float,
) -> None:
    # The p-quadrature integrates the mean too; the model has it in closed form (eq. 10).
    p = _params(*params)
    m1, f2 = forecast._alive_moments(p, np.array([float(x)]), np.array([T]), start, end)
    t_x = np.array([T if x > 0 else 0.0])
    alive = model.p_alive(p, [x], t_x, [T])
    closed = (
        model.expected_purchases(p, end, [x], t_x, [T])
        - model.expected_purchases(p, start, [x], t_x, [T])
    ) / alive
    assert float(m1[0]) == pytest.approx(float(closed[0]), rel=tolerance)
    assert float(f2[0]) >= 0.0


@pytest.mark.parametrize(("a", "b"), [(0.5, 0.5), (0.793, 2.426), (1.5, 3.0), (0.793, 3002.4)])
def test_beta_nodes_integrate_polynomials_exactly(a: float, b: float) -> None:
    # n Gauss nodes integrate polynomials of degree < 2n exactly: the Beta moments
    # E[p^k] = Π_{i<k} (a+i)/(a+b+i). a + b = 1 is the recurrence's special case; b in the
    # thousands is where SciPy's roots_jacobi overflows.
    nodes, weights = forecast._beta_nodes(a, b, 16)
    assert weights.sum() == pytest.approx(1.0, rel=1e-14)
    for k in range(1, 32):
        exact = math.prod((a + i) / (a + b + i) for i in range(k))
        assert float(weights @ nodes**k) == pytest.approx(exact, rel=1e-9)


def test_per_customer_variance_matches_simulation() -> None:
    # E[(N − E[N | data])² | data] = Var(N | data), so over simulated customers the mean of
    # (N − mean)² − var is 0 in expectation; it is tested with its own standard error,
    # overall and within strata of x (conditioning on the data keeps the identity), at
    # |z| < 4 (a false alarm below 1e-4 for a normal z; the squared residuals are
    # heavy-tailed, hence 4 rather than 3). On this seed the simulated/predicted variance
    # ratios are 0.98 overall, 0.95 / 0.99 / 0.99 for x = 0 / 1–3 / ≥ 4 (|z| ≤ 2.6); a
    # Poisson variance (= mean) gives 1.6 and z = 35. The mean is tested the same way.
    window = (7.0, 90.0)
    x, t_x, T, actual = _population(11, 300_000, CDNOW, *window)
    mean, var = forecast.window_moments(_params(*CDNOW), x, t_x, T, window)
    for stratum in (x >= 0, x == 0, (x >= 1) & (x <= 3), x >= 4):
        resid = actual[stratum] - mean[stratum]
        excess = resid * resid - var[stratum]
        n = int(stratum.sum())
        z_var = float(excess.mean()) / (float(excess.std()) / math.sqrt(n))
        z_mean = float(resid.sum()) / math.sqrt(float(var[stratum].sum()))
        assert abs(z_var) < 4, (n, z_var, float((resid * resid).sum() / var[stratum].sum()))
        assert abs(z_mean) < 4, (n, z_mean)
    # The variance is not the mean (Poisson): heterogeneity makes it larger for buyers.
    assert float(var[x >= 4].sum()) > 1.5 * float(mean[x >= 4].sum())


def _coverage(result: PromotionForecast, labels: np.ndarray, actual: np.ndarray) -> float:
    totals = np.bincount(labels, weights=actual)
    low = np.array([g.low for _, g in result.groups])
    high = np.array([g.high for _, g in result.groups])
    return float(np.mean((totals >= low) & (totals <= high)))


def test_interval_covers_simulated_totals() -> None:
    # 1,000 independent shops of 400 customers each (one group each): the forecast of each
    # shop's purchase days in days 7–90 from now (~90 expected: normal intervals) against
    # the simulated actual. Covered shops ~ Binomial(1000, 0.95) if the interval is right:
    # standard deviation 6.9 shops, tolerance ±3.5 of them (±24 shops; the normal
    # approximation's own error at these sizes is a few tenths of a percent).
    shops, size, window = 1000, 400, (7.0, 90.0)
    x, t_x, T, actual = _population(21, shops * size, CDNOW, *window)
    labels = np.repeat(np.arange(shops), size)
    result = forecast.forecast_window(_params(*CDNOW), x, t_x, T, window, groups=labels)
    assert {g.method for _, g in result.groups} == {"normal"}
    assert abs(_coverage(result, labels, actual) - 0.95) <= 3.5 * math.sqrt(0.95 * 0.05 / shops)


def test_small_totals_use_a_count_interval_that_covers() -> None:
    # 2,000 shops of 100 customers over the next two weeks: ~4 purchase days each. The
    # negative binomial interval has whole-number ends and covers at least 95% (discrete:
    # more); a normal one would miss far more often above than below.
    shops, size, window = 2000, 100, (0.0, 14.0)
    x, t_x, T, actual = _population(31, shops * size, CDNOW, *window)
    labels = np.repeat(np.arange(shops), size)
    result = forecast.forecast_window(_params(*CDNOW), x, t_x, T, window, groups=labels)
    groups = [g for _, g in result.groups]
    assert all(g.expected < forecast.NORMAL_FROM for g in groups)
    assert {g.method for g in groups} == {"negative binomial"}
    assert all(g.low == round(g.low) and g.high == round(g.high) and g.low >= 0 for g in groups)
    covered = _coverage(result, labels, actual)
    assert 0.95 - 3.5 * math.sqrt(0.95 * 0.05 / shops) <= covered <= 0.995


def test_interval_methods() -> None:
    expected = np.array([40.0, 40.0, 5.0, 5.0, 0.0])
    variance = np.array([60.0, 1e4, 5.0, 20.0, 0.0])
    low, high, methods = forecast._intervals(expected, variance)
    assert methods == ["normal", "normal", "poisson", "negative binomial", "poisson"]
    assert (low[0], high[0]) == pytest.approx(
        (40 - 1.959964 * math.sqrt(60), 40 + 1.959964 * 60**0.5)
    )
    assert low[1] == 0.0  # clamped
    assert (low[2], high[2]) == (1.0, 10.0)  # Poisson(5): P(X ≤ 0) < 2.5% ≤ P(X ≤ 1) …
    n, prob = 25.0 / 15.0, 5.0 / 20.0
    assert stats.nbinom.cdf(low[3] - 1, n, prob) <= 0.025 < stats.nbinom.cdf(low[3], n, prob)
    assert stats.nbinom.cdf(high[3] - 1, n, prob) < 0.975 <= stats.nbinom.cdf(high[3], n, prob)
    assert (low[4], high[4]) == (0.0, 0.0)


# --------------------------------------------------------------------------- groups, order


def test_group_totals_sum_to_the_total() -> None:
    p = _params(*CDNOW)
    x, t_x, T = simulate_bgnbd(np.random.default_rng(2), 30_000, r=p.r, alpha=p.alpha, a=p.a, b=p.b)
    labels = np.minimum(x, 4).astype(np.int64) * 10 - 3  # e.g. stage codes, negative too
    result = forecast.forecast_window(p, x, t_x, T, (0.0, 30.0), groups=labels)
    assert [label for label, _ in result.groups] == [-3, 7, 17, 27, 37]
    groups = [g for _, g in result.groups]
    assert sum(g.customers for g in groups) == result.total.customers == 30_000
    assert sum(g.expected for g in groups) == pytest.approx(result.total.expected, rel=1e-12)
    assert sum(g.variance for g in groups) == pytest.approx(result.total.variance, rel=1e-12)
    plain = forecast.forecast_window(p, x, t_x, T, (0.0, 30.0))
    assert plain.total.expected == pytest.approx(result.total.expected, rel=1e-12)
    assert result.group(-3) is groups[0]
    with pytest.raises(KeyError):
        result.group(0)
    for label, g in result.groups:
        one = forecast.forecast_window(
            p, x[labels == label], t_x[labels == label], T[labels == label], (0.0, 30.0)
        )
        assert one.total.expected == pytest.approx(g.expected, rel=1e-12)
        assert one.total.variance == pytest.approx(g.variance, rel=1e-12)


@pytest.mark.parametrize("seed", [1, 2])
def test_invariant_to_customer_order(seed: int) -> None:
    p = _params(*REGULAR)
    x, t_x, T, _ = _population(41, 5000, REGULAR, 0.0, 30.0)  # continuous t_x
    whole = simulate_bgnbd(np.random.default_rng(42), 5000, r=p.r, alpha=p.alpha, a=p.a, b=p.b)
    labels = np.random.default_rng(43).integers(0, 7, 5000)
    cov = np.diag([0.01, 0.02, 0.03, 0.04]) + 0.005
    perm = np.random.default_rng(seed).permutation(5000)
    for xs, ts, Ts in ((x, t_x, T), whole):
        base = forecast.forecast_window(
            p, xs, ts, Ts, (3.0, 33.0), groups=labels, log_covariance=cov
        )
        moved = forecast.forecast_window(
            p, xs[perm], ts[perm], Ts[perm], (3.0, 33.0), groups=labels[perm], log_covariance=cov
        )
        for (la, a), (lb, b) in zip(
            [(-1, base.total), *base.groups], [(-1, moved.total), *moved.groups], strict=True
        ):
            assert la == lb
            assert (a.customers, a.method) == (b.customers, b.method)
            for field in ("expected", "variance", "parameter_variance", "low", "high"):
                assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-12)
        mean, var = forecast.window_moments(p, xs, ts, Ts, (3.0, 33.0))
        mean_p, var_p = forecast.window_moments(p, xs[perm], ts[perm], Ts[perm], (3.0, 33.0))
        assert np.array_equal(mean[perm], mean_p) and np.array_equal(var[perm], var_p)


# --------------------------------------------------------------------------- parameters


def test_parameter_uncertainty_by_the_delta_method() -> None:
    truth = _params(*CDNOW)
    rng = np.random.default_rng(51)
    x, t_x, T = simulate_bgnbd(rng, 20_000, r=truth.r, alpha=truth.alpha, a=truth.a, b=truth.b)
    fit = model.fit_bgnbd(x, t_x, T)
    cov = forecast.parameter_covariance(fit, x, t_x, T)
    # The same information as the fit's: its standard errors come back.
    values = np.array([fit.r, fit.alpha, fit.a, fit.b])
    assert values * np.sqrt(np.diag(cov)) == pytest.approx(np.array(fit.std_errors), rel=1e-9)
    # Forecast over 1,000 of the fitted customers: the delta-method variance against the
    # variance of the expected total over parameter sets drawn from the asymptotic normal
    # on the log scale (300 draws: the ratio's 99.9% range under exact linearity is about
    # [0.75, 1.30]).
    sub = slice(0, 1000)
    window = (0.0, 60.0)
    result = forecast.forecast_window(fit, x[sub], t_x[sub], T[sub], window, log_covariance=cov)
    assert result.parameter_uncertainty
    assert result.total.parameter_variance > 0
    assert result.total.std_dev == pytest.approx(
        math.sqrt(result.total.variance + result.total.parameter_variance)
    )
    draws = np.exp(np.random.default_rng(52).multivariate_normal(np.log(values), cov, size=300))
    totals = [
        float(
            (
                model.expected_purchases(_params(*d), window[1], x[sub], t_x[sub], T[sub])
                - model.expected_purchases(_params(*d), window[0], x[sub], t_x[sub], T[sub])
            ).sum()
        )
        for d in draws
    ]
    ratio = float(np.var(totals, ddof=1)) / result.total.parameter_variance
    assert 0.75 < ratio < 1.30, ratio
    # Without the covariance the same forecast has no parameter term.
    plain = forecast.forecast_window(fit, x[sub], t_x[sub], T[sub], window)
    assert plain.total.parameter_variance == 0.0
    assert plain.total.variance == pytest.approx(result.total.variance, rel=1e-12)


# --------------------------------------------------------------------------- refusals


def test_bad_inputs_are_caller_errors() -> None:
    p = _params(*CDNOW)
    x, t_x, T = np.array([0.0, 2.0]), np.array([0.0, 5.0]), np.array([10.0, 20.0])
    for window in [(5.0, 5.0), (6.0, 5.0), (-1.0, 5.0), (0.0, math.nan), (0.0, math.inf)]:
        with pytest.raises(ValueError, match="window"):
            forecast.forecast_window(p, x, t_x, T, window)
        with pytest.raises(ValueError, match="window"):
            forecast.window_moments(p, x, t_x, T, window)
    with pytest.raises(ValueError, match="same length"):
        forecast.forecast_window(p, x, t_x, T[:1], (0.0, 5.0))
    with pytest.raises(ValueError, match="same length"):
        forecast.forecast_window(p, x[:, None], t_x[:, None], T[:, None], (0.0, 5.0))
    with pytest.raises(ValueError):
        forecast.forecast_window(p, x, np.array([0.0, 25.0]), T, (0.0, 5.0))  # t_x > T
    with pytest.raises(ValueError, match="groups"):
        forecast.forecast_window(p, x, t_x, T, (0.0, 5.0), groups=[1])
    with pytest.raises(ValueError, match="groups"):
        forecast.forecast_window(p, x, t_x, T, (0.0, 5.0), groups=[1.0, 2.0])
    with pytest.raises(ValueError, match="log_covariance"):
        forecast.forecast_window(p, x, t_x, T, (0.0, 5.0), log_covariance=np.eye(3))
    with pytest.raises(ValueError, match="log_covariance"):
        forecast.forecast_window(p, x, t_x, T, (0.0, 5.0), log_covariance=-np.eye(4))


def test_no_customers() -> None:
    empty = np.zeros(0)
    result = forecast.forecast_window(_params(*CDNOW), empty, empty, empty, (0.0, 30.0))
    assert (result.total.customers, result.total.expected, result.total.high) == (0, 0.0, 0.0)

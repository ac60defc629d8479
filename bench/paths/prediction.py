"""Prediction: lifecycle's BG/NBD fit over a shop's customers' summaries.

`prediction_customers` synthetic customers are drawn from the CDNOW parameters (Fader,
Hardie & Lee 2005, in days) with `simulate_bgnbd`; each repeat times `fit_bgnbd` on their
(x, t_x, T) — the compression to distinct rows, the L-BFGS-B search and the Hessian for the
standard errors — as customers per second. The raw limit beneath it is one vectorised
evaluation of the per-customer log-likelihood (`bgnbd_log_likelihood`, uncompressed) over
the same customers: the ratio says how many such evaluations the fit costs. The fitted
parameters are reported beside the true ones (the fit must also be right, not only fast).
The computation does not touch the stack, so it runs in the embedded mode only.
"""

from __future__ import annotations

import time

import numpy as np

from bench.core import Measurement, Run, Stack
from bench.stats import Stat
from services.lifecycle.prediction.model import bgnbd_log_likelihood, fit_bgnbd
from services.lifecycle.prediction.simulate import simulate_bgnbd

TRUE: dict[str, float] = {"r": 0.243, "alpha": 30.90, "a": 0.793, "b": 2.426}
"""The CDNOW fit in days: r, α, a, b."""


async def measure(run: Run, stack: Stack) -> None:
    customers = run.size.prediction_customers
    rng = np.random.default_rng(20050101)
    r, alpha, a, b = TRUE.values()
    x, t_x, T = simulate_bgnbd(rng, customers, r=r, alpha=alpha, a=a, b=b)
    distinct = np.unique(np.column_stack([x, t_x, T]), axis=0).shape[0]
    fit, raw = Stat(), Stat()
    fitted: dict[str, float] = {}
    for _ in range(run.size.repeats):
        start = time.perf_counter()
        params = fit_bgnbd(x, t_x, T)
        fit.add(customers / (time.perf_counter() - start))
        fitted = {name: round(getattr(params, name), 4) for name in TRUE}
        start = time.perf_counter()
        bgnbd_log_likelihood(r, alpha, a, b, x, t_x, T)
        raw.add(customers / (time.perf_counter() - start))
    run.add(
        Measurement(
            path="prediction.fit",
            mode=stack.mode,
            unit="customers/s",
            ours=fit,
            raw=raw,
            raw_label="one log-likelihood pass",
            note=f"{customers:,} customers ({distinct:,} distinct rows), "
            f"fit in {customers / fit.median:.2f} s",
            extra={
                "customers": customers,
                "distinct_rows": distinct,
                "fitted": fitted,
                "true": TRUE,
            },
        )
    )

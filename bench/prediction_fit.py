"""Time a BG/NBD fit over 1,000,000 synthetic customers' summaries.

Run: ``.venv/bin/python -m bench.prediction_fit [customers]``. Prints the seconds taken by
the summary compression plus the fit (the figure the issue asks to be "seconds"), the
fitted parameters beside the ones the data were drawn from, and the number of distinct
(x, t_x, T) rows the likelihood was evaluated on.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from services.lifecycle.prediction.model import fit_bgnbd
from services.lifecycle.prediction.simulate import simulate_bgnbd

# The CDNOW fit in days (Fader, Hardie & Lee 2005): r, α, a, b.
TRUE: dict[str, float] = {"r": 0.243, "alpha": 30.90, "a": 0.793, "b": 2.426}


def main(argv: list[str]) -> None:
    customers = int(argv[0]) if argv else 1_000_000
    rng = np.random.default_rng(20050101)
    x, t_x, T = simulate_bgnbd(
        rng, customers, r=TRUE["r"], alpha=TRUE["alpha"], a=TRUE["a"], b=TRUE["b"]
    )
    distinct = np.unique(np.column_stack([x, t_x, T]), axis=0).shape[0]
    start = time.perf_counter()
    params = fit_bgnbd(x, t_x, T)
    seconds = time.perf_counter() - start
    print(f"customers {customers:,}  distinct rows {distinct:,}  fit {seconds:.2f} s")
    for name, true in TRUE.items():
        print(f"  {name:>5}  fitted {getattr(params, name):9.4f}  true {true:9.4f}")
    print(f"  log-likelihood {params.log_likelihood:,.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])

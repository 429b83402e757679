"""Kendall's tau-b: scipy.stats (what ``sensitivity.attribution.kendall_tau_b`` calls) against the hand-written
O(n^2) all-pairs version it replaced, side by side in one process, on rankings with ties.

Usage: python benchmarks/bench_agreement.py [--sizes 56,500,5000] [--repeats 3]

Writes benchmarks/results/agreement.json and prints a table (minimum of ``repeats`` runs per cell). The two must
agree to float64 round-off; the old version is kept here only as the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"


def kendall_all_pairs(x: np.ndarray, y: np.ndarray) -> float:
    """The replaced implementation: sign products over the (n, n) upper triangle of pair differences."""
    n = len(x)
    x, y = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    sx = np.sign(x[:, None] - x[None, :])[upper]
    sy = np.sign(y[:, None] - y[None, :])[upper]
    n0 = n * (n - 1) / 2
    denom = math.sqrt((n0 - (sx == 0).sum()) * (n0 - (sy == 0).sum()))
    return float((sx * sy).sum() / denom)


def _best(fn, repeats: int) -> tuple[float, float]:
    times, value = [], math.nan
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="56,500,5000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sensitivity.attribution import kendall_tau_b
    from sensitivity.core.output import versions

    rows = []
    rng = np.random.default_rng(0)
    for n in map(int, args.sizes.split(",")):
        x = rng.integers(0, n // 4 + 2, n).astype(float)  # ties in both rankings
        y = x + rng.normal(0, n / 8, n).round()
        t_old, old = _best(lambda: kendall_all_pairs(x, y), args.repeats)
        t_new, new = _best(lambda: kendall_tau_b(x, y), args.repeats)
        rows.append({"n": n, "all_pairs_s": t_old, "scipy_s": t_new, "speedup": t_old / t_new,
                     "tau_all_pairs": old, "tau_scipy": new, "abs_diff": abs(old - new)})  # fmt: skip
        print(f"n={n:6d}  all pairs {t_old * 1e3:9.2f} ms  scipy {t_new * 1e3:7.2f} ms  x{t_old / t_new:7.1f}  "
              f"|diff| {abs(old - new):.1e}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "Kendall tau-b: scipy.stats.kendalltau vs the replaced O(n^2) all-pairs version",
               "repeats": args.repeats, "cpus": os.cpu_count(), "rows": rows, "versions": versions()}  # fmt: skip
    (RESULTS / "agreement.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

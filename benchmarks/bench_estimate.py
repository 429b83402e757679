"""First-order probe estimates against the exact sweep: speed and agreement, on the three default models.

Usage: python benchmarks/bench_estimate.py [--models default,default-mamba1,default-hybrid] [--windows 8]

For each model, the same probes (every component and unit, every kind, sparsities 0.25/0.5/0.75; the probe
sweep's defaults) on the same windows (8 validation windows of 256 tokens, seed 0): the exact cached sweep, the
``linear`` estimate (attribution patching) and the ``local`` estimate (the ablated layer exact, the rest
linearised), one after the other in this process. Agreement of each estimate with the exact ``delta_nll``, per
kind and over all probes: Spearman and Kendall rank correlations, the overlap of the 10 most damaging probes, the
share of probes whose estimate has the sign of the exact damage and the median |estimate| / |exact|. Writes
benchmarks/results/estimate.json (and estimate.csv: every probe's three numbers) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KEY = ["layer", "component", "index", "kind", "sparsity"]


def agreement(exact, estimate) -> dict:
    """Spearman, Kendall and top-10 overlap of two delta_nll series on the same probes; also the share of probes
    whose estimate has the exact damage's sign, and the median of |estimate| / |exact|."""
    from scipy.stats import kendalltau, spearmanr

    top = min(10, len(exact))
    overlap = len(set(exact.nlargest(top).index) & set(estimate.nlargest(top).index)) / top if top else float("nan")
    row = {"n": len(exact), "spearman": None, "kendall": None, "top10": round(overlap, 2),
           "same_sign": round(float(((exact > 0) == (estimate > 0)).mean()), 2),
           "median_abs_ratio": round(float((estimate.abs() / exact.abs()).median()), 3)}  # fmt: skip
    if len(exact) >= 3:
        row["spearman"] = round(float(spearmanr(exact, estimate).statistic), 3)
        row["kendall"] = round(float(kendalltau(exact, estimate).statistic), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="default,default-mamba1,default-hybrid")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "estimate.json"))
    args = parser.parse_args()

    import pandas as pd
    import torch

    from sensitivity import load_corpus, load_model
    from sensitivity.core.output import atomic_write_text, versions
    from sensitivity.probes import probe

    corpus = load_corpus()
    payload = {"benchmark": "first-order probe estimates vs the exact cached sweep", "windows": args.windows,
               "seqlen": 256, "models": {}, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}  # fmt: skip
    tables = []
    for name in args.models.split(","):
        lm = load_model(name)
        runs, seconds = {}, {}
        for label, opts in (("exact", {}), ("linear", {"estimate": True}),
                            ("local", {"estimate": True, "estimator": "local"})):  # fmt: skip
            start = time.perf_counter()
            df = probe(lm, corpus, windows=args.windows, calib_windows=args.windows, show_progress=False, **opts)
            seconds[label] = time.perf_counter() - start
            damage = df[df.metric == "delta_nll"]
            names = damage[KEY].astype("string").fillna("-").agg(" ".join, axis=1)  # e.g. "0 dt - zero -"
            runs[label] = pd.Series(damage.value.to_numpy(), index=pd.Index(names, name="probe"))
        exact = runs["exact"]
        model = {"probes": len(exact), "seconds": {k: round(v, 2) for k, v in seconds.items()},
                 "speedup": {k: round(seconds["exact"] / seconds[k], 1) for k in ("linear", "local")},
                 "agreement": {}}  # fmt: skip
        kinds = exact.index.str.split(" ").str[3]
        for label in ("linear", "local"):
            est = runs[label]
            rows = {"all": agreement(exact, est)}
            for kind in dict.fromkeys(kinds):
                rows[kind] = agreement(exact[kinds == kind], est[kinds == kind])
            model["agreement"][label] = rows
        worst = (runs["linear"] - exact).abs().sort_values(ascending=False).head(5)
        model["largest_linear_errors"] = [
            {"probe": k, "exact": round(exact[k], 4), "linear": round(runs["linear"][k], 4),
             "local": round(runs["local"][k], 4)} for k in worst.index
        ]  # fmt: skip
        payload["models"][name] = model
        speed = model["speedup"]
        print(f"\n{name}: {len(exact)} probes; exact {seconds['exact']:.1f} s, linear {seconds['linear']:.1f} s "
              f"({speed['linear']}x), local {seconds['local']:.1f} s ({speed['local']}x)")  # fmt: skip
        print(f"{'kind':<10}{'n':>5}  linear: rho    tau  top10  sign  |est|/|exact|   local: rho    tau  top10  sign")
        for kind in model["agreement"]["linear"]:
            a, b = model["agreement"]["linear"][kind], model["agreement"]["local"][kind]
            print(f"{kind:<10}{a['n']:>5}  {a['spearman']!s:>11}{a['kendall']!s:>7}{a['top10']!s:>7}"
                  f"{a['same_sign']!s:>6}{a['median_abs_ratio']!s:>15}{b['spearman']!s:>13}{b['kendall']!s:>7}"
                  f"{b['top10']!s:>7}{b['same_sign']!s:>6}")  # fmt: skip
        table = pd.DataFrame(runs).rename_axis("probe").reset_index()
        table.insert(0, "model", name)
        tables.append(table)
    payload["versions"] = versions()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".csv"), pd.concat(tables).to_csv(index=False))
    print(f"wrote {out} and {out.with_suffix('.csv')} (delta_nll per probe: exact, linear, local)")


if __name__ == "__main__":
    main()

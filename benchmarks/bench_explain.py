"""What the explainer costs on the default model, by how much restoration patching it does.

Usage: python benchmarks/bench_explain.py [--windows 4] [--repeats 2]

WANDA 50% of the default Mamba-2 (calibration 32 x 256 train tokens, seed 0), explained on validation windows of
256 tokens: without patching (drift and dynamics only), coarse to fine (``top_layers=2``: every whole mixer, then
single components of the best 2 layers), and full (every (layer, component) that differs from dense). Each setting
is timed in the same process, minimum of ``--repeats`` runs, against one forward of the same windows, and must name
the same top component as the full run. Writes benchmarks/results/explain.json and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from sensitivity import calibration_windows, load_corpus, load_model, prune
    from sensitivity.core import LoadedModel
    from sensitivity.core.output import atomic_write_text, versions
    from sensitivity.explain import explain

    corpus = load_corpus()
    dense = load_model()
    windows = calibration_windows(corpus, dense.tokenizer, args.windows, 256, seed=0, split="validation")
    pruned = LoadedModel(copy.deepcopy(dense.model), dense.tokenizer, dense.registry, "wanda50")
    prune(pruned, "wanda", sparsity=0.5, windows=calibration_windows(corpus, dense.tokenizer, 32, 256, seed=0),
          show_progress=False)  # fmt: skip

    def forward() -> None:
        with torch.no_grad():
            dense.model(windows.ids, use_cache=False)

    settings = {"forward (one, for scale)": forward,
                "explain, no patching": lambda: explain(dense, pruned, windows, patch=False, show_progress=False),
                "explain, top_layers=2": lambda: explain(dense, pruned, windows, top_layers=2, show_progress=False),
                "explain, full patching": lambda: explain(dense, pruned, windows, show_progress=False)}  # fmt: skip
    rows, tops = [], {}
    for name, fn in settings.items():
        best, result = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - start)
        runs = None
        if result is not None:
            tops[name] = result.top
            runs = result.meta.get("patched", "none")
        rows.append({"setting": name, "seconds": round(best, 2), "patching": runs})
    base = rows[0]["seconds"]
    for r in rows:
        r["x_forward"] = round(r["seconds"] / base, 1)
    full, coarse = tops["explain, full patching"], tops["explain, top_layers=2"]
    payload = {"benchmark": "explainer cost on the default model (WANDA 50%)",
               "windows": windows.describe(), "rows": rows, "top_full": full, "top_coarse": coarse,
               "same_top": full[:2] == coarse[:2], "cpus": os.cpu_count(), "versions": versions()}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "explain.json", json.dumps(payload, indent=2) + "\n")
    print(f"{'setting':<28}{'seconds':>9}{'x forward':>11}  patching")
    for r in rows:
        print(f"{r['setting']:<28}{r['seconds']:>9.2f}{r['x_forward']:>11.1f}  {r['patching'] or ''}")
    print(f"top restoration: full {full}, coarse-to-fine {coarse}; windows: {windows.describe()}")


if __name__ == "__main__":
    main()

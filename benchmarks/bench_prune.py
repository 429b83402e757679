"""WANDA pruning wall time against one calibration forward pass over the same windows, side by side.

Usage: python benchmarks/bench_prune.py [--model default] [--windows 64] [--seqlen 256] [--repeats 3]

In one process, on the same calibration windows (the CLI's defaults, 64 x 256 tokens from the train split): one
forward of the model in batches of 8 (no hooks, the LM head included), then WANDA one-shot, WANDA sequential and
magnitude pruning at 50% of every mixer weight matrix, each on a freshly loaded model. Each time is the minimum over
``--repeats`` runs. The target is WANDA one-shot <= 1.5x the forward. Writes benchmarks/results/prune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "prune.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sensitivity import calibration_windows, load_corpus, load_model
    from sensitivity.core.output import atomic_write_text, versions
    from sensitivity.pruning import prune_unstructured

    lm = load_model(args.model)
    windows = calibration_windows(load_corpus(), lm.tokenizer, args.windows, args.seqlen, seed=0)

    def forward() -> None:
        with torch.no_grad():
            for i in range(0, len(windows), 8):
                lm.model(windows.ids[i : i + 8], use_cache=False)

    def pruner(method: str, sequential: bool):
        def run() -> None:
            options = {"sequential": sequential} if method == "wanda" else {}  # magnitude has no calibration
            prune_unstructured(fresh, method, sparsity=0.5, windows=windows, show_progress=False, **options)

        return run

    forward()  # warm-up
    timings = {}
    cases = {"forward": (None, forward), "wanda one-shot": ("wanda", False), "wanda sequential": ("wanda", True),
             "magnitude": ("magnitude", False)}  # fmt: skip
    for name, (method, arg) in cases.items():
        best = float("inf")
        for _ in range(args.repeats):
            if method is not None:
                fresh = load_model(args.model)
                fn = pruner(method, arg)
            else:
                fn = arg
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    rows = [{"job": k, "seconds": v, "x_forward": v / timings["forward"]} for k, v in timings.items()]
    payload = {"benchmark": "pruning wall time relative to one calibration forward", "model": args.model,
               "windows": args.windows, "seqlen": args.seqlen, "sparsity": 0.5, "repeats": args.repeats,
               "rows": rows, "target": "wanda one-shot <= 1.5x forward", "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "versions": versions()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(payload, indent=2) + "\n")
    print(f"{args.model}: {args.windows} x {args.seqlen} calibration tokens, 50% of every mixer weight matrix")
    print(f"{'job':<18}{'seconds':>9}{'x forward':>11}")
    for r in rows:
        print(f"{r['job']:<18}{r['seconds']:>9.2f}{r['x_forward']:>10.2f}x")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

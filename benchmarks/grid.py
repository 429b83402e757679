"""The paper's question on the shipped models: which pruning methods do state-space LMs survive?

Usage: python benchmarks/grid.py [--models default,default-mamba1] [--max-windows N]

For each model: magnitude (per tensor), WANDA uniform, WANDA + OWL schedule, WANDA + sensitivity schedule (from
WANDA probes at 0.25/0.5/0.75/0.9 of every prunable component, measured on validation windows), WANDA 2:4, and the
SSM-structured pruners (state by Taylor score; Mamba-2 head and head-dim by FLAP with bias compensation) at
sparsities 0.25/0.5/0.75 (structured: 0.25/0.5). Weight pruning targets every mixer weight matrix except conv1d.
Calibration: 64 windows x 256 tokens of the train split, seed 0. Every pruned model is evaluated by token-level
perplexity on the test split: non-overlapping 512-token windows, stride 512, the first token of each window is
context only (``sensitivity evaluate``'s definition). Writes benchmarks/results/grid.csv (one row per run, appended
as runs finish; rerunning resumes) and grid.json, and prints the perplexity table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).parent / "results"
SPARSITIES = (0.25, 0.5, 0.75)
STRUCTURED = (0.25, 0.5)


def plan(arch: str) -> list[tuple[str, str, float | None]]:
    """(label, method, sparsity) for one model; the sparsity of 2:4 is implied."""
    runs = [("dense", "dense", 0.0)]
    for s in SPARSITIES:
        runs += [("magnitude", "magnitude", s), ("wanda", "wanda", s), ("wanda+owl", "wanda", s),
                 ("wanda+sensitivity", "wanda", s)]  # fmt: skip
    runs.append(("wanda 2:4", "wanda", 0.5))
    units = ("state", "head", "headdim") if arch == "mamba2" else ("state",)
    runs += [(u, u, s) for u in units for s in STRUCTURED]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="default,default-mamba1")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N test windows only")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--probe-windows", type=int, default=8)
    parser.add_argument("--results", type=Path, default=RESULTS, help="output directory (default benchmarks/results)")
    args = parser.parse_args()
    results = args.results

    from sensitivity import calibration_windows, eval_windows, load_corpus, load_model, perplexity, probe
    from sensitivity.allocation import allocate
    from sensitivity.core.output import atomic_write_text, versions
    from sensitivity.pruning import prune

    corpus = load_corpus()
    results.mkdir(parents=True, exist_ok=True)
    out_csv = results / "grid.csv"
    done = pd.read_csv(out_csv) if out_csv.is_file() else pd.DataFrame()
    rows = done.to_dict(orient="records")
    previous = results / "grid.json"
    definition = json.loads(previous.read_text())["definition"] if previous.is_file() else ""
    for name in args.models.split(","):
        lm = load_model(name)
        test = eval_windows(corpus, lm.tokenizer, 512, split="test", max_windows=args.max_windows)
        calib = calibration_windows(corpus, lm.tokenizer, args.calib_windows, 256, seed=0)
        probes_dir = results / "grid_probes" / name
        curves = None
        for label, method, s in plan(lm.arch):
            if any(r["model"] == name and r["label"] == label and r["sparsity"] == s for r in rows):
                continue
            lm = load_model(name)
            start = time.perf_counter()
            schedule, options = None, {}
            if label == "wanda+owl":
                schedule = allocate(lm, "owl", s, windows=calib, show_progress=False)
            elif label == "wanda+sensitivity":
                if curves is None:  # resumable: probe() skips finished probes in its out dir
                    curves = probe(lm, corpus, kinds=["wanda"], sparsities=[0.25, 0.5, 0.75, 0.9],
                                   components=list(lm.registry.resolve()), windows=args.probe_windows,
                                   calibration_windows=8, seqlen=256, out=probes_dir, show_progress=False)  # fmt: skip
                schedule = allocate(lm, "sensitivity", s, probes=curves, max_sparsity=0.9, show_progress=False)
            elif label == "wanda 2:4":
                options = {"structure": "2:4"}
            elif label == "magnitude":
                options = {"compare": "tensor"}
            elif method in ("state", "head", "headdim"):
                options = {"score": "taylor" if method == "state" else "flap"}
            if method != "dense":
                if schedule is None and "structure" not in options:
                    options["sparsity"] = s
                result = prune(lm, method, schedule=schedule, windows=calib, show_progress=False, **options)
                params = result.manifest["params_after"]
            else:
                params = {"params": lm.n_params, "nonzero": lm.n_params}
            prune_s = time.perf_counter() - start
            ppl = perplexity(lm, test, show_progress=False)
            definition = ppl.definition
            rows.append({"model": name, "arch": lm.arch, "label": label, "method": method, "sparsity": s,
                         "score": options.get("score", ""), "params": params["params"], "nonzero": params["nonzero"],
                         "perplexity": ppl.perplexity, "nll": ppl.nll, "tokens": ppl.tokens,
                         "prune_s": round(prune_s, 2)})  # fmt: skip
            print(f"{name:<15}{label:<19}{s:>5}  ppl {ppl.perplexity:10.2f}  ({prune_s:.1f} s)", flush=True)
            atomic_write_text(out_csv, pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
    df = pd.DataFrame(rows)
    dense = df[df.label == "dense"].set_index("model").perplexity
    df["ppl_ratio"] = df.perplexity / df.model.map(dense)
    atomic_write_text(out_csv, df.to_csv(index=False, float_format="%.6g"))
    table = df[df.label != "dense"].pivot_table(index=["model", "label"], columns="sparsity", values="perplexity",
                                                sort=False)  # fmt: skip
    payload = {"benchmark": "pruning grid: test perplexity per method and sparsity", "definition": definition,
               "calibration": f"{args.calib_windows} x 256 tokens of train, seed 0", "dense": dense.to_dict(),
               "cpus": os.cpu_count(), "versions": versions()}  # fmt: skip
    atomic_write_text(results / "grid.json", json.dumps(payload, indent=2) + "\n")
    print(f"dense: {', '.join(f'{m} {p:.2f}' for m, p in dense.items())}")
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    print(f"perplexity: {definition}\nwrote {out_csv}")


if __name__ == "__main__":
    main()

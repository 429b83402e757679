"""The hybrid question on the embedded hybrid: where can it be pruned, and why does it collapse?

Usage: python benchmarks/hybrid_findings.py [--model default-hybrid] [--eval-windows 48]

On ``default-hybrid`` (Bamba: Mamba-2 mixers with attention at layers 2 and 5, a SwiGLU MLP in every layer):

1. **Probes** on 8 validation windows of 256 tokens: every whole unit removed (``mixer``, ``attention``, ``mlp``,
   ``block``) and every prunable component WANDA-pruned at 25/50/75/90%, in every layer that holds it (the curves
   of the ``sensitivity`` schedule).
2. **Pruning at 25/50/75%**, each scored by test perplexity (``--eval-windows`` consecutive windows of 512 tokens of
   the test split, the report's definition): uniform WANDA over every linear weight (SSM, attention, MLP); WANDA on
   a type-aware ``unit`` schedule keeping attention 0.25 denser; WANDA on the probe-derived ``sensitivity``
   schedule; SSM head pruning (FLAP scores, every SSM layer); Mamba-Shedder-style greedy block removal (that
   fraction of the 8 blocks, the cheapest first by calibration loss).
3. **The explainer** on SSM head pruning at 50% and 75% (degraded and collapsed; block removal changes the layer
   count, so it cannot be patched against the dense model).

Calibration: 32 train windows of 256 tokens, seed 0. Writes benchmarks/results/hybrid/ (probes.csv, runs.csv,
explanations.json, hybrid.json) and prints the tables the README quotes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "hybrid"
SPARSITIES = (0.25, 0.5, 0.75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default-hybrid")
    parser.add_argument("--eval-windows", type=int, default=48)
    args = parser.parse_args()

    import pandas as pd
    import torch

    from sensitivity import calibration_windows, eval_windows, load_corpus, load_model, perplexity, prune
    from sensitivity.allocation import allocate
    from sensitivity.core import LoadedModel
    from sensitivity.core.output import atomic_write_text, versions
    from sensitivity.explain import explain
    from sensitivity.probes import probe

    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    dense = load_model(args.model)
    reg = dense.registry
    cal = calibration_windows(corpus, dense.tokenizer, 32, 256, seed=0)
    val = calibration_windows(corpus, dense.tokenizer, 8, 256, seed=0, split="validation")
    test = eval_windows(corpus, dense.tokenizer, 512, split="test", max_windows=args.eval_windows)
    base = perplexity(dense, test, show_progress=False)
    record = {"model": args.model, "layers": [reg.layer_kind(i) for i in range(reg.n_layers)],
              "dense_perplexity": base.perplexity, "definition": base.definition, "versions": versions()}  # fmt: skip

    # 1. probes
    t0 = time.perf_counter()
    units = probe(dense, corpus, components=["mixer", "attention", "mlp", "block"], kinds=["remove"], heldout=val,
                  calibration=cal, show_progress=False)  # fmt: skip
    comps = probe(dense, corpus, components=list(reg.prunable_components), kinds=["wanda"],
                  sparsities=[0.25, 0.5, 0.75, 0.9], heldout=val, calibration=cal, show_progress=False)  # fmt: skip
    probes = pd.concat([units, comps])
    probes.to_csv(RESULTS / "probes.csv", index=False)
    record["probe_s"] = time.perf_counter() - t0
    d = probes[probes.metric == "delta_nll"].copy()
    d["layer_kind"] = [reg.layer_kind(i) for i in d.layer]
    d["unit"] = [reg.component(c).unit if c in reg.component_names else c for c in d.component]
    record["unit_removal"] = (d[d.kind == "remove"].pivot_table(index="layer", columns="component", values="value")
                              .round(4).to_dict())  # fmt: skip
    w50 = d[(d.kind == "wanda") & (d.sparsity == 0.5)]
    record["wanda50_by_unit"] = w50.groupby("unit").value.agg(["mean", "max"]).round(4).to_dict()
    record["wanda50_top"] = w50.nlargest(8, "value")[["layer", "component", "value"]].round(4).to_dict("records")

    # 2. pruning at 25/50/75%
    runs, models = [], {}

    def run(label: str, method: str, sparsity: float, **kw) -> None:
        lm = LoadedModel(copy.deepcopy(dense.model), dense.tokenizer, reg, f"{label}@{sparsity}")
        start = time.perf_counter()
        prune(lm, method, sparsity=sparsity if "schedule" not in kw else None, windows=cal, show_progress=False,
              **kw)  # fmt: skip
        ppl = perplexity(lm, test, show_progress=False).perplexity
        runs.append({"label": label, "sparsity": sparsity, "perplexity": ppl, "ppl_ratio": ppl / base.perplexity,
                     "prune_s": round(time.perf_counter() - start, 1)})  # fmt: skip
        models[(label, sparsity)] = lm
        print(f"{label:24s} {sparsity:.2f}  ppl {ppl:10.2f}  x{ppl / base.perplexity:.2f}", flush=True)

    for s in SPARSITIES:
        run("wanda (uniform)", "wanda", s)
        unit = allocate(dense, "unit", s, unit_offset={"attention": -0.25}, max_sparsity=0.95)
        run("wanda (unit schedule)", "wanda", s, schedule=unit)
        sens = allocate(dense, "sensitivity", s, probes=comps, max_sparsity=0.95)
        run("wanda (sensitivity)", "wanda", s, schedule=sens)
        run("SSM heads (flap)", "head", s, mode="mask")  # masked heads compute what removed ones would
        run("blocks (greedy)", "blocks", s)
    frame = pd.DataFrame(runs)
    frame.to_csv(RESULTS / "runs.csv", index=False)
    record["runs"] = runs

    # 3. the explainer on SSM head pruning, degraded at 50% and collapsed at 75%
    explanations = {}
    for s in (0.5, 0.75):
        e = explain(dense, models[("SSM heads (flap)", s)], val, top_layers=2, show_progress=False)
        explanations[f"SSM heads (flap) {s}"] = {**e.summary(), "text": e.text}
    record["explanations"] = explanations
    atomic_write_text(RESULTS / "hybrid.json", json.dumps(record, indent=2, default=float) + "\n")
    print(frame.pivot(index="label", columns="sparsity", values="perplexity").round(2).to_string())
    for label, e in explanations.items():
        print(f"\n{label}: {e['text']}")
    assert math.isfinite(base.perplexity)


if __name__ == "__main__":
    main()

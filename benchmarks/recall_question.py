"""The recall question: on a model that needs its state, what do state, head, head-dim and WANDA pruning cost on
perplexity, the built-in tasks and associative recall, and does the ordering differ from the perplexity ordering?

Usage: python benchmarks/recall_question.py [--model recall] [--eval-windows 64] [--task-items 200]

On ``--model`` (default ``recall``, the zoo's Mamba-2 trained with recall items):

1. **Dense scores**: test perplexity (``--eval-windows`` consecutive windows of 512 tokens of the test split), the
   built-in ``cloze`` and ``choice`` tasks (the first ``--task-items`` items) and recall accuracy at 2, 4, 8 and 16
   pairs (``--recall-items`` items per number of pairs, seed 0, no gap).
2. **Pruning at 25/50%** with state pruning (SSM state channels), head pruning (FLAP scores), head-dim pruning and
   unstructured WANDA, each on every SSM layer, calibrated on 32 train windows of 256 tokens (seed 0); structured
   methods in mask mode (masked units compute exactly what removed ones would). Every run gets the same scores.
3. **Orderings**: the methods ranked by damage on each objective at each sparsity (perplexity ratio; accuracy
   lost), and Kendall's tau between each objective's damage and perplexity's over all eight runs.
4. **The explainer** on every 50% run twice: on 8 validation windows of 256 tokens (text) and on 32 recall items
   of 8 pairs (only the answers scored), so each method gets a verdict per objective.

Writes benchmarks/results/recall/ (runs.csv, explanations.csv, recall.json) and prints the tables the README
quotes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "recall"
SPARSITIES = (0.25, 0.5)
METHODS = ("state", "head", "headdim", "wanda")
RECALL_PAIRS = (2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="recall")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--task-items", type=int, default=200)
    parser.add_argument("--recall-items", type=int, default=128)
    args = parser.parse_args()

    import pandas as pd
    import torch
    from scipy.stats import kendalltau

    from sensitivity import calibration_windows, eval_windows, load_corpus, load_model, perplexity, prune
    from sensitivity.core import LoadedModel
    from sensitivity.core.output import atomic_write_text, versions
    from sensitivity.data.objective import task_windows
    from sensitivity.eval import objective_definition, recall_accuracy, recall_definition, score_builtin
    from sensitivity.explain import explain

    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    dense = load_model(args.model)
    tok = dense.tokenizer
    cal = calibration_windows(corpus, tok, 32, 256, seed=0)
    val = calibration_windows(corpus, tok, 8, 256, seed=0, split="validation")
    recall_val = task_windows("recall:8", tok, items=32, seed=0)
    test = eval_windows(corpus, tok, 512, split="test", max_windows=args.eval_windows)

    def scores(lm) -> dict[str, float]:
        row = {"perplexity": perplexity(lm, test, show_progress=False).perplexity}
        for task in ("cloze", "choice"):
            rows = score_builtin(lm, task, max_items=args.task_items, batch_size=16, show_progress=False)
            row[f"{task}_acc"] = next(float(r["value"]) for r in rows if r["metric"] == "acc")
        acc = recall_accuracy(lm, tok, pairs=RECALL_PAIRS, items=args.recall_items, seed=0, show_progress=False)
        row.update({f"recall{p}_acc": float(v) for p, v in acc.groupby("pairs").correct.mean().items()})
        return row

    t0 = time.perf_counter()
    base = scores(dense)
    print("dense", {k: round(v, 3) for k, v in base.items()}, flush=True)
    runs, models = [], {}
    for s in SPARSITIES:
        for method in METHODS:
            lm = LoadedModel(copy.deepcopy(dense.model), tok, dense.registry, f"{method}@{s}")
            kw = {} if method == "wanda" else {"mode": "mask"}
            prune(lm, method, sparsity=s, windows=cal, show_progress=False, **kw)
            row = {"method": method, "sparsity": s, **scores(lm)}
            row["ppl_ratio"] = row["perplexity"] / base["perplexity"]
            runs.append(row)
            models[(method, s)] = lm
            print(method, s, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}, flush=True)
    frame = pd.DataFrame(runs)
    frame.to_csv(RESULTS / "runs.csv", index=False)

    # Damage per objective: perplexity ratio, accuracy lost (dense minus pruned).
    objectives = [c for c in base if c.endswith("_acc")]
    damage = frame[["method", "sparsity"]].copy()
    damage["perplexity"] = frame.ppl_ratio
    for c in objectives:
        damage[c] = base[c] - frame[c]
    orderings = {str(s): {c: list(part.sort_values(c, kind="stable").method) for c in ["perplexity", *objectives]}
                 for s, part in damage.groupby("sparsity")}  # fmt: skip
    tau = {c: float(kendalltau(damage.perplexity, damage[c]).statistic) for c in objectives}

    # The explainer at 50%: a verdict per objective.
    explanations = []
    for method in METHODS:
        for objective, windows in (("text", val), ("recall:8", recall_val)):
            e = explain(dense, models[(method, 0.5)], windows, label=method, sparsity=0.5, top_layers=2,
                        show_progress=False)  # fmt: skip
            explanations.append({"objective": objective, **e.summary()})
            print(f"\n{method} 50% on {objective}: {e.verdict}. {e.text}", flush=True)
    pd.DataFrame(explanations).to_csv(RESULTS / "explanations.csv", index=False)

    record = {
        "model": args.model,
        "dense": base,
        "runs": runs,
        "orderings": orderings,
        "kendall_tau_vs_perplexity": tau,
        "explanations": [{k: v for k, v in e.items() if k != "explanation"} for e in explanations],
        "definitions": {
            "perplexity": perplexity(dense, test, show_progress=False).definition,
            **{f"{t}_acc": objective_definition(t, args.task_items) for t in ("cloze", "choice")},
            "recall": recall_definition(args.recall_items, 0, 256) + f"; pairs {list(RECALL_PAIRS)}",
            "calibration": "32 train windows of 256 tokens, seed 0",
            "explain": "text: 8 validation windows of 256 tokens (seed 0); recall:8: 32 items of 8 pairs (seed 0)",
        },
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "versions": versions(),
    }
    atomic_write_text(RESULTS / "recall.json", json.dumps(record, indent=2, default=float) + "\n")
    cols = ["perplexity", *objectives]
    print("\n" + frame.set_index(["sparsity", "method"])[cols].round(3).to_string())
    for s, per in orderings.items():
        print(f"\nleast to most damaged at {s}:")
        for c, order in per.items():
            print(f"  {c:12s} {' < '.join(order)}")
    print("\nKendall tau vs perplexity damage:", {k: round(v, 2) for k, v in tau.items()})


if __name__ == "__main__":
    main()

"""Probe estimates against the exact sweep: speed and agreement of every estimator, on the trained models.

Usage: python benchmarks/bench_estimate.py [--models default,default-mamba1,default-hybrid,recall,recall@recall]
                                           [--windows 8] [--samples 1,2,4,8] [--layer-kinds zero,mean,resample]

For each model (``recall@recall``: the ``recall`` model scored on its associative-recall objective), the same probes
(every component and unit, every kind, sparsities 0.25/0.5/0.75; the probe sweep's defaults) on the same windows
(8 validation windows of 256 tokens, seed 0): the exact cached sweep, then each estimator (``fisher`` with K=2,
``empirical``, ``linear``, ``local``, and ``fisher+layer``: fisher with the kinds of ``--layer-kinds`` read at their
layer's output), one after the other in this process; on the first model also ``fisher`` with
each K of ``--samples``. Agreement of each estimate with the exact ``delta_nll`` (and of fisher's ``kl`` with the
exact ``kl``), per kind and over all probes: Spearman and Kendall rank correlations, the overlap of the 10 most
damaging probes, the share of the exact damage of the 10 most damaging probes that the estimate's 10 most damaging
ones hold, and ``cover``: how many of the estimate's most damaging probes one must measure exactly to hold every
probe at least as damaging as the exact 10th (what the report's ``--exact top:K`` needs). Writes
benchmarks/results/estimate.json (and estimate.csv: every probe's numbers) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KEY = ["layer", "component", "index", "kind", "sparsity"]
ESTIMATORS = ("fisher", "empirical", "linear", "local")


def agreement(exact, estimate) -> dict:
    """Spearman, Kendall, top-10 overlap, share of the top-10 damage held, and cover of two damage series on the
    same probes (pandas Series indexed alike)."""
    from scipy.stats import kendalltau, spearmanr

    top = min(10, len(exact))
    mine = estimate.sort_values(ascending=False, kind="stable")
    overlap = len(set(exact.nlargest(top).index) & set(mine.index[:top])) / top if top else float("nan")
    held = float(exact[mine.index[:top]].sum() / exact.nlargest(top).sum()) if top else float("nan")
    worst = set(exact[exact >= exact.nlargest(top).min()].index) if top else set()
    position = [mine.index.get_loc(k) + 1 for k in worst]
    row = {"n": len(exact), "spearman": None, "kendall": None, "top10": round(overlap, 2), "held": round(held, 3),
           "cover": max(position, default=0)}  # fmt: skip
    if len(exact) >= 3:
        row["spearman"] = round(float(spearmanr(exact, estimate).statistic), 3)
        row["kendall"] = round(float(kendalltau(exact, estimate).statistic), 3)
    return row


SHORT = {"default": "default", "default-mamba1": "mamba1", "default-hybrid": "hybrid", "recall": "recall",
         "recall@recall": "recall_task"}  # fmt: skip


def summarize(payload: dict) -> None:
    """Add the docs' tables to ``payload``: ``summary`` (each model and estimator over all probes) and ``kinds``
    (Spearman of each estimator per kind, one column per model)."""
    summary, kinds = [], {}
    for spec, model in payload["models"].items():
        name = SHORT.get(spec, spec)
        for label, rows in model["agreement"].items():
            summary.append({"model": spec, "estimator": label, "speedup": model["speedup"][label],
                            "seconds": model["seconds"][label], **rows["all"]})  # fmt: skip
            for kind, row in rows.items():
                if kind != "all":
                    kinds.setdefault((label, kind), {"estimator": label, "kind": kind})[name] = row["spearman"]
                    kinds[(label, kind)][f"n_{name}"] = row["n"]
    payload["summary"] = summary
    payload["kinds"] = [{**{SHORT.get(s, s): "-" for s in payload["models"]}, **row} for row in kinds.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="default,default-mamba1,default-hybrid,recall,recall@recall")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--samples", default="1,2,4,8")
    parser.add_argument("--layer-kinds", default="zero,mean,resample")
    parser.add_argument("--task-items", type=int, default=16, help="items of a task objective (recall@recall)")
    parser.add_argument("--out", default=str(RESULTS / "estimate.json"))
    parser.add_argument("--tables-only", action="store_true", help="only recompute the docs' tables of --out")
    args = parser.parse_args()
    if args.tables_only:
        payload = json.loads(Path(args.out).read_text())
        summarize(payload)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        return

    import pandas as pd
    import torch

    from sensitivity import load_corpus, load_model
    from sensitivity.core.output import versions
    from sensitivity.probes import probe

    corpus = load_corpus()
    payload = {"benchmark": "probe estimates vs the exact cached sweep", "windows": args.windows, "seqlen": 256,
               "models": {}, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}  # fmt: skip
    for i, spec in enumerate(args.models.split(",")):
        name, _, task = spec.partition("@")
        lm = load_model(name)
        objective = {"task": task, "task_items": args.task_items} if task else {}
        runs, kls, seconds = {}, {}, {}
        labels = [("exact", {}), *((e, {"estimate": True, "estimator": e}) for e in ESTIMATORS),
                  ("fisher+layer", {"estimate": True, "layer_kinds": args.layer_kinds.split(",")})]
        if i == 0:
            labels += [(f"fisher K={k}", {"estimate": True, "samples": int(k)}) for k in args.samples.split(",")
                       if int(k) != 2]  # fmt: skip
        for label, opts in labels:
            start = time.perf_counter()
            df = probe(lm, corpus, windows=args.windows, calib_windows=args.windows, show_progress=False,
                       **objective, **opts)  # fmt: skip
            seconds[label] = time.perf_counter() - start
            names = None
            for metric, into in (("delta_nll", runs), ("kl", kls)):
                part = df[df.metric == metric]
                names = part[KEY].astype("string").fillna("-").agg(" ".join, axis=1)  # e.g. "0 dt - zero -"
                into[label] = pd.Series(part.value.to_numpy(), index=pd.Index(names, name="probe"))
        exact = runs["exact"]
        kinds = exact.index.str.split(" ").str[3]
        model = {"objective": task or "text", "probes": len(exact),
                 "seconds": {k: round(v, 2) for k, v in seconds.items()},
                 "speedup": {k: round(seconds["exact"] / v, 1) for k, v in seconds.items() if k != "exact"},
                 "agreement": {}}  # fmt: skip
        for label in runs:
            if label == "exact":
                continue
            est = runs[label]
            rows = {"all": agreement(exact, est)}
            for kind in dict.fromkeys(kinds):
                rows[kind] = agreement(exact[kinds == kind], est[kinds == kind])
            model["agreement"][label] = rows
        model["agreement_kl"] = {"fisher": {"all": agreement(kls["exact"], kls["fisher"])}}
        payload["models"][spec] = model
        print(f"\n{spec}: {len(exact)} probes; exact {seconds['exact']:.1f} s; "
              + ", ".join(f"{k} {seconds[k]:.1f} s ({model['speedup'][k]}x)" for k in model["speedup"]))  # fmt: skip
        print(f"{'kind':<10}{'n':>5}" + "".join(f"{e:>22}" for e in model["agreement"]))
        for kind in model["agreement"]["fisher"]:
            cells = [model["agreement"][e][kind] for e in model["agreement"]]
            print(f"{kind:<10}{cells[0]['n']:>5}" + "".join(f"{c['spearman']!s:>8} t{c['top10']!s:>4} c{c['cover']:>4}"
                                                             for c in cells))  # fmt: skip
        print(f"fisher kl vs exact kl: {model['agreement_kl']['fisher']['all']}")
        table = pd.DataFrame({**runs, "exact kl": kls["exact"], "fisher kl": kls["fisher"]}).rename_axis("probe")
        table = table.reset_index()
        table.insert(0, "model", spec)
        write(payload, table, Path(args.out), versions())
    print(f"wrote {args.out} and its .csv (delta_nll per probe: exact and each estimator; kl: exact, fisher)")


def write(payload: dict, table, out: Path, versions: dict) -> None:
    """Merge one model's results into ``out`` (and its CSV), written atomically: the models of an earlier run with
    the same windows are kept unless this run measured them again."""
    import pandas as pd

    from sensitivity.core.output import atomic_write_text

    model = table.model.iloc[0]
    csv = out.with_suffix(".csv")
    if out.is_file() and csv.is_file() and json.loads(out.read_text()).get("windows") == payload["windows"]:
        old = json.loads(out.read_text())
        payload["models"] = {**{k: v for k, v in old["models"].items() if k not in payload["models"]},
                             **payload["models"]}  # fmt: skip
        before = pd.read_csv(csv)
        table = pd.concat([before[before.model != model], table])
    summarize(payload)
    payload["versions"] = versions
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(csv, table.to_csv(index=False))


if __name__ == "__main__":
    main()

"""What the report costs on a tiny hybrid against a tiny pure Mamba-2, with default options.

Usage: python benchmarks/bench_report.py [--repeats 2]

``sensitivity report`` (every stage: probes, attribution, schedules, the grid of pruners, the explainer, figures)
on the built-in tiny random models ``tiny:mamba2`` and ``tiny:bamba`` (Mamba-2 mixers and attention, each with an
MLP: more components, so more probes), default options, each into a fresh directory; minimum wall time of
``--repeats`` runs of each, alternated in one process. Also counts the probes each report ran. Writes
benchmarks/results/report.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = ("tiny:mamba2", "tiny:bamba")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import pandas as pd

    from sensitivity.core.output import atomic_write_text, versions
    from sensitivity.jobs import run
    from sensitivity.report.pipeline import ReportSpec

    times: dict[str, list[float]] = {m: [] for m in MODELS}
    probes: dict[str, int] = {}
    for _ in range(args.repeats):
        for model in MODELS:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                run(ReportSpec(model=model, out=str(Path(tmp) / "report")), show_progress=False)
                times[model].append(time.perf_counter() - start)
                found = list((Path(tmp) / "report").rglob("probes.csv"))
                probes[model] = sum(len(pd.read_csv(f)[["layer", "component", "kind", "sparsity"]]
                                        .drop_duplicates()) for f in found)  # fmt: skip
    rows = [{"model": m, "seconds": round(min(times[m]), 1), "all_runs_s": [round(t, 1) for t in times[m]],
             "probe_rows": probes[m]} for m in MODELS]  # fmt: skip
    pure = rows[0]["seconds"]
    for row in rows:
        row["ratio_to_pure"] = round(row["seconds"] / pure, 2)
    record = {"benchmark": "report on tiny models, default options", "repeats": args.repeats, "rows": rows,
              "threads": os.environ.get("OMP_NUM_THREADS"), "versions": versions()}  # fmt: skip
    atomic_write_text(RESULTS / "report.json", json.dumps(record, indent=2) + "\n")
    print("| model | report (s) | x pure | probes |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| `{row['model']}` | {row['seconds']} | {row['ratio_to_pure']} | {row['probe_rows']} |")


if __name__ == "__main__":
    main()

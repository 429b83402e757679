"""What the load-time checks cost: ``load_model`` with every check, without the non-finite weight check, and
without any of the checks issue 14 added (checkpoint files, tensor shapes, finite weights), side by side in one
process.

Usage: python benchmarks/bench_load.py [--model default] [--repeats 7]

Writes benchmarks/results/load.json and prints a table (median seconds of ``repeats`` loads each, interleaved).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from unittest import mock

import sensitivity.core.loading as loading
from sensitivity.core.output import versions

RESULTS = Path(__file__).parent / "results" / "load.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def unchecked():
        with mock.patch.object(loading, "check_source", lambda name: None), \
                mock.patch.object(loading, "_check_shapes", lambda *a: None):  # fmt: skip
            return loading.load_model(args.model, allow_nonfinite=True)

    settings = {
        "all checks": lambda: loading.load_model(args.model),
        "without the finite-weight check": lambda: loading.load_model(args.model, allow_nonfinite=True),
        "without any load-time check": unchecked,
    }
    unchecked()  # warm the file cache and imports
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, load in settings.items():
            start = time.perf_counter()
            load()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["without any load-time check"])
    rows = [{"setting": name, "median_s": statistics.median(t), "ratio": statistics.median(t) / base, "runs": t}
            for name, t in times.items()]  # fmt: skip
    lm = loading.load_model(args.model)
    record = {"benchmark": "load_model with and without the load-time checks", "model": args.model,
              "params": lm.n_params, "repeats": args.repeats, "cpus": os.cpu_count(), "rows": rows,
              "versions": versions()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"| load_model({args.model!r}), {lm.n_params:,} parameters | median s | ratio |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['median_s']:.3f} | {row['ratio']:.2f}x |")


if __name__ == "__main__":
    main()

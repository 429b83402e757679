"""Wall time of `sensitivity evaluate` on each shipped model, cold (a fresh process, as a user runs it).

Usage: python benchmarks/bench_zoo.py [--repeats 2]

Runs ``sensitivity evaluate --model NAME --json`` (default data: the built-in corpus' test split, seqlen 512) in a
child process per repeat, with glibc defaults and with the malloc tuning of ``make test``, and records the wall
time including Python start-up and imports. The target for the default model is under 60 s on 2 cores. Writes
benchmarks/results/zoo.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sensitivity.core.output import atomic_write_text, versions
from sensitivity.zoo import list_models

RESULTS = Path(__file__).parent / "results" / "zoo.json"
MALLOC = {
    "glibc-default": {},
    "malloc-tuned": {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"},
}


def run_once(name: str, env: dict) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "sensitivity", "evaluate", "--model", name, "--json"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=True)
    return time.perf_counter() - start, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for model in list_models():
        for setting, env in MALLOC.items():
            times, out = [], {}
            for _ in range(args.repeats):
                seconds, out = run_once(model.name, env)
                times.append(seconds)
            rows.append(
                {
                    "model": model.name,
                    "arch": model.card["arch"],
                    "malloc": setting,
                    "seconds_median": statistics.median(times),
                    "seconds": times,
                    "perplexity": out["perplexity"],
                    "card_perplexity": model.card["test_perplexity"],
                    "tokens": out["tokens"],
                    "definition": out["definition"],
                }
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "sensitivity evaluate (cold process) on the shipped models", "rows": rows,
               "cpus": os.cpu_count(), "versions": versions()}  # fmt: skip
    atomic_write_text(RESULTS, json.dumps(payload, indent=2) + "\n")
    print(f"{'model':<16}{'malloc':<15}{'wall s':>8}{'tokens':>9}{'ppl':>9}{'card ppl':>10}")
    for r in rows:
        print(
            f"{r['model']:<16}{r['malloc']:<15}{r['seconds_median']:>8.1f}{r['tokens']:>9}"
            f"{r['perplexity']:>9.2f}{r['card_perplexity']:>10.2f}"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

"""How fast a bad flag is refused: the wall time of ``sensitivity prune --sparsity 2`` (refused: exit 2, one line)
against ``sensitivity --help`` and a bare ``python -c pass``, each a fresh process, interleaved, alone on the machine.

Usage: python benchmarks/bench_refusal.py [--repeats 9]

Writes benchmarks/results/refusal.json and prints a table (median seconds of ``repeats`` runs each). The target of
issue 29 is a refusal under 1 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sensitivity.core.output import versions

RESULTS = Path(__file__).parent / "results" / "refusal.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    cli = shutil.which("sensitivity") or str(Path(sys.executable).with_name("sensitivity"))
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "sensitivity --help": [cli, "--help"],
        "sensitivity prune --sparsity 2 (refused)": [cli, "prune", "--sparsity", "2"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    expected = {"python -c pass": 0, "sensitivity --help": 0, "sensitivity prune --sparsity 2 (refused)": 2}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(args.repeats + 1):  # the first round warms the file cache and is not counted
        for name, argv in commands.items():
            start = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, env=env)
            seconds = time.perf_counter() - start
            if done.returncode != expected[name]:
                raise SystemExit(f"{name}: exit {done.returncode}, expected {expected[name]}: {done.stderr[-300:]}")
            if i:
                times[name].append(seconds)
    refusal = subprocess.run(commands["sensitivity prune --sparsity 2 (refused)"], capture_output=True, text=True,
                             env=env).stderr.strip()  # fmt: skip
    help_s = statistics.median(times["sensitivity --help"])
    rows = [{"command": name, "median_s": statistics.median(t), "ratio_to_help": statistics.median(t) / help_s,
             "runs": t} for name, t in times.items()]  # fmt: skip
    record = {"benchmark": "wall time of a refused bad flag against --help, fresh processes", "refusal": refusal,
              "repeats": args.repeats, "cpus": os.cpu_count(), "target_s": 1.0, "rows": rows,
              "versions": versions()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"refusal: {refusal}")
    print("| command | median s | / --help |")
    print("|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['median_s']:.2f} | {row['ratio_to_help']:.2f} |")


if __name__ == "__main__":
    main()

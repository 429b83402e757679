"""How fast a bad flag is refused: the wall time of ``sensitivity prune --sparsity 2`` (refused: exit 2, one line)
against ``sensitivity --help`` and a bare ``python -c pass``, each a fresh process, interleaved, alone on the machine.

Usage: python benchmarks/bench_refusal.py [--repeats 9] [--compare DIR]

``--compare DIR`` times the same commands of another checkout of the package (``DIR/sensitivity``, e.g. a
``git worktree`` of an earlier commit) in the same interleaved rounds. Writes benchmarks/results/refusal.json and
prints a table (median seconds of ``repeats`` runs each). The target of issue 29 is a refusal under 1 s on 2 cores.
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

from sensitivity.core.output import versions

RESULTS = Path(__file__).parent / "results" / "refusal.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to time side by side")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    checkouts = {"this": here, **({"compared": args.compare.resolve()} if args.compare else {})}
    cli = [sys.executable, "-m", "sensitivity"]
    commands, expected, envs, cwds = {"python -c pass": [sys.executable, "-c", "pass"]}, {"python -c pass": 0}, {}, {}
    for label, root in checkouts.items():
        for what, argv, code in (("--help", ["--help"], 0), ("prune --sparsity 2 (refused)", ["prune", "--sparsity",
                                                                                               "2"], 2)):  # fmt: skip
            name = f"sensitivity {what}" + (f" [{label}: {root.name}]" if args.compare else "")
            commands[name], expected[name] = [*cli, *argv], code
            envs[name] = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
            cwds[name] = root  # python -m puts the working directory first on sys.path
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(args.repeats + 1):  # the first round warms the file cache and is not counted
        for name, argv in commands.items():
            start = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, env=envs.get(name, os.environ),
                                  cwd=cwds.get(name))
            seconds = time.perf_counter() - start
            if done.returncode != expected[name]:
                raise SystemExit(f"{name}: exit {done.returncode}, expected {expected[name]}: {done.stderr[-300:]}")
            if i:
                times[name].append(seconds)
    refused = next(n for n in commands if "refused" in n)
    refusal = subprocess.run(commands[refused], capture_output=True, text=True, env=envs[refused],
                             cwd=cwds[refused]).stderr.strip()  # fmt: skip
    help_s = statistics.median(times[next(n for n in commands if "--help" in n)])
    rows = [{"command": name, "median_s": statistics.median(t), "ratio_to_help": statistics.median(t) / help_s,
             "runs": t} for name, t in times.items()]  # fmt: skip
    record = {"benchmark": "wall time of a refused bad flag against --help, fresh processes", "refusal": refusal,
              "checkouts": {label: str(root) for label, root in checkouts.items()},
              "repeats": args.repeats, "cpus": os.cpu_count(), "target_s": 1.0, "rows": rows,
              "versions": versions()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"refusal: {refusal}")
    print("| command | median s | / --help (this checkout) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['median_s']:.2f} | {row['ratio_to_help']:.2f} |")


if __name__ == "__main__":
    main()

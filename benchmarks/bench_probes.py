"""The cached and batched probe sweeps against the naive full-forward sweep on the shipped default model.

Usage: python benchmarks/bench_probes.py [--model default] [--windows 4] [--seqlen 256] [--kinds zero,resample,...]

Each sweep runs in its own child process (so peak RSS is its own) over the same probes: every component and unit
of every layer, kinds ``zero, resample, bypass, remove`` by default. All must give the same numbers (checked to
1e-5; the largest difference is reported). Targets: cached at least 2x, batched at least 3x faster than naive.
Writes benchmarks/results/probes.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "probes.json"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}


def child(args) -> None:
    """Run one sweep; print its timings, peak RSS and values as JSON."""
    import torch

    from sensitivity import load_model
    from sensitivity.probes import probe

    lm = load_model(args.model)
    start = time.perf_counter()
    df = probe(lm, None, kinds=args.kinds.split(","), windows=args.windows, calib_windows=args.windows,
               seqlen=args.seqlen, sweep=args.sweep, show_progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "probes": len(df) // 3,
                      "threads": torch.get_num_threads(), "values": df.value.tolist()}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--kinds", default="zero,resample,bypass,remove")
    parser.add_argument("--sweep", default=None, help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.sweep:
        return child(args)
    from sensitivity.core.output import atomic_write_text, versions

    runs = {}
    for sweep in ("naive", "cached", "batched"):
        cmd = [sys.executable, __file__, "--model", args.model, "--windows", str(args.windows), "--seqlen",
               str(args.seqlen), "--kinds", args.kinds, "--sweep", sweep]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC}, check=True)
        runs[sweep] = json.loads(proc.stdout.strip().splitlines()[-1])
    diffs = {s: max(abs(a - b) for a, b in zip(runs["naive"]["values"], runs[s]["values"])) for s in runs}
    diff = max(diffs.values())
    rows = [
        {"sweep": s, "seconds": r["seconds"], "per_probe_s": r["seconds"] / r["probes"],
         "peak_rss_mb": r["peak_rss_mb"], "speedup": runs["naive"]["seconds"] / r["seconds"], "probes": r["probes"]}
        for s, r in runs.items()
    ]  # fmt: skip
    payload = {"benchmark": "probe sweep: cached residual stream and batched suffix vs naive full forward",
               "model": args.model, "windows": args.windows, "seqlen": args.seqlen, "kinds": args.kinds,
               "max_abs_diff": diff, "max_abs_diff_by_sweep": diffs,
               "rows": rows, "cpus": os.cpu_count(), "threads": runs["cached"]["threads"],
               "versions": versions()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(payload, indent=2) + "\n")
    print(f"{args.model}: {rows[0]['probes']} probes ({args.kinds}) on {args.windows} x {args.seqlen} tokens")
    print(f"{'sweep':<8}{'total s':>9}{'s/probe':>9}{'peak RSS MB':>13}{'speed-up':>10}")
    for r in rows:
        print(f"{r['sweep']:<8}{r['seconds']:>9.1f}{r['per_probe_s']:>9.3f}{r['peak_rss_mb']:>13.0f}"
              f"{r['speedup']:>9.2f}x")  # fmt: skip
    print(f"max |sweep - naive|: {', '.join(f'{s} {d:.2e}' for s, d in diffs.items() if s != 'naive')}; "
          f"wrote {RESULTS}")  # fmt: skip
    if diff > 1e-5:
        raise SystemExit("the sweeps disagree")


if __name__ == "__main__":
    main()

"""The probe sweep on Ray against in process, on the shipped default model.

Usage: python benchmarks/bench_ray.py [--model default] [--windows 4] [--seqlen 256] [--kinds zero,wanda,magnitude]

One sweep (every component and unit of every layer; the kinds given, WANDA and magnitude at 50%; cached) four
ways, one after the other on this machine: in process with 2 threads; on Ray with one worker of 2 CPUs (the
overhead of the backend); in process with 1 thread; on Ray with two single-threaded workers. The Ray runs join a
local cluster started once before them (its start is timed separately: a job that starts its own pays it once).
Outputs must be byte-identical at equal threads per process (1-thread in process against two 1-thread workers,
2-thread in process against one 2-CPU worker). An untimed in-process sweep of one layer warms up first. From the
two-worker run's shard times it predicts the wall time on N workers (the driver hands each free worker the next
layer, in plan order). Writes benchmarks/results/ray.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "ray.json"


def predict(setup: float, shards: list[float], workers: int) -> float:
    """Wall time of ``shards`` (seconds each, in plan order) handed out to ``workers`` that each first spend
    ``setup`` seconds: every free worker takes the next shard."""
    free = [setup] * workers
    for t in shards:
        i = min(range(workers), key=free.__getitem__)
        free[i] += t
    return max(free)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--kinds", default="zero,wanda,magnitude")
    args = parser.parse_args()

    import ray
    import torch

    from sensitivity import load_model
    from sensitivity.core.output import atomic_write_text, versions
    from sensitivity.probes import probe

    lm = load_model(args.model)
    options = dict(kinds=args.kinds.split(","), sparsities=[0.5], windows=args.windows, calib_windows=args.windows,
                   seqlen=args.seqlen, show_progress=False)  # fmt: skip
    tmp = Path(tempfile.mkdtemp())
    probe(lm, None, **{**options, "kinds": ["zero"], "layers": [lm.registry.n_layers - 1]})  # warm-up, untimed
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cluster_start = time.perf_counter() - t0
    runs = [("in process, 2 threads", 2, {}), ("Ray, 1 worker x 2 CPUs", 2, dict(backend="ray", workers=1,
            worker_cpus=2)), ("in process, 1 thread", 1, {}), ("Ray, 2 workers x 1 CPU", 1, dict(backend="ray",
            workers=2, worker_cpus=1))]  # fmt: skip
    rows = []
    for i, (name, threads, execution) in enumerate(runs):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        df = probe(lm, None, out=tmp / str(i), **options, **execution)
        seconds = time.perf_counter() - start
        manifest = json.loads((tmp / str(i) / "manifest.json").read_text())
        csv = (tmp / str(i) / "probes.csv").read_bytes()
        rows.append({"run": name, "threads": threads, "seconds": seconds, "probes": len(df) // 3, "csv": csv,
                     "execution": manifest["execution"]})  # fmt: skip
    ray.shutdown()
    same = {"2 threads: in process == 1 worker": rows[0]["csv"] == rows[1]["csv"],
            "1 thread: in process == 2 workers": rows[2]["csv"] == rows[3]["csv"]}  # fmt: skip
    for r in rows:
        r.pop("csv")
    rows[1]["overhead"] = rows[1]["seconds"] / rows[0]["seconds"] - 1
    rows[3]["speedup_vs_one_process_2_threads"] = rows[0]["seconds"] / rows[3]["seconds"]
    two = rows[3]["execution"]
    setup = max(two["setup_seconds"])
    layers = {n: predict(setup, two["shard_seconds"], n) for n in (1, 2, 4, 8)}
    payload = {"benchmark": "probe sweep on Ray against in process", "model": args.model, "windows": args.windows,
               "seqlen": args.seqlen, "kinds": args.kinds, "sparsity": 0.5, "cluster_start_s": cluster_start,
               "byte_identical": same, "rows": rows,
               "predicted_s_by_workers": layers,
               "prediction": "1-thread workers; set-up = the slowest worker's model load, calibration and dense pass; "
                             "each free worker takes the next layer's probes (the layers are the shards)",
               "cpus": os.cpu_count(), "versions": {**versions(), "ray": ray.__version__}}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(payload, indent=2) + "\n")
    print(f"{args.model}: {rows[0]['probes']} probes ({args.kinds}, 50%) on {args.windows} x {args.seqlen} tokens; "
          f"local Ray cluster start {cluster_start:.1f} s (not in the times below)")  # fmt: skip
    print(f"| {'run':<24} | {'wall s':>7} | {'vs in process, 2 threads':>24} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 26}|")
    for r in rows:
        print(f"| {r['run']:<24} | {r['seconds']:>7.1f} | {rows[0]['seconds'] / r['seconds']:>23.2f}x |")
    print("byte-identical:", same)
    print("predicted wall s on N 1-thread workers:", {n: round(t, 1) for n, t in layers.items()})


if __name__ == "__main__":
    main()

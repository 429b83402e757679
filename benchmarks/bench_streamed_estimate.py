"""A whole 1.3B checkpoint probed by estimates, layer-streamed: every probe the default sweep plans, all 48 layers.

Usage: python benchmarks/bench_streamed_estimate.py [--dir /tmp/mamba2-1.3b] [--estimator fisher] [--samples 2]

The random Mamba-2 of ``bench_streamed.py`` (the mamba2-1.3b configuration, 5.4 GB of float32 safetensors;
generated once) is swept streamed with the estimator on 4 held-out and 4 calibration windows of 128 tokens, 2
windows per forward, in a child process (its wall time and peak RSS). Then, as ``bench_streamed.py`` does, the
exact streamed sweep of layers 46-47 (components dt, B, x, out_proj and the mixer; kinds zero and mean) and the
estimates of the same probes, compared (Spearman). Writes benchmarks/results/streamed_estimate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_streamed import CONFIG, PROBE, _peak_mb, ensure_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "streamed_estimate.json"
WINDOWS = dict(windows=4, calib_windows=4, seqlen=128, batch_size=2)


def child(args) -> None:
    """One sweep in this process; prints its seconds, peak RSS and probe count as JSON."""
    from sensitivity.probes import probe

    est = {"estimate": True, "estimator": args.estimator}
    if args.estimator == "fisher":
        est["samples"] = args.samples
    kw = {"all": dict(**WINDOWS, **est), "estimate-2": dict(PROBE, **est), "exact-2": dict(PROBE)}[args.task]
    start = time.perf_counter()
    df = probe(args.dir, None, out=args.out, streamed=True, show_progress=args.task == "all", **kw)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_mb(), "probes": len(df) // 3}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/mamba2-1.3b")
    parser.add_argument("--estimator", default="fisher")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--task", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        return child(args)
    import pandas as pd
    from scipy.stats import spearmanr

    from sensitivity.core.output import atomic_write_text, versions

    src = ensure_checkpoint(Path(args.dir))
    runs, work = {}, src.parent
    for task in ("all", "estimate-2", "exact-2"):
        out = work / f"probe-{task}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, __file__, "--dir", str(src), "--estimator", args.estimator, "--samples",
               str(args.samples), "--task", task, "--out", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            sys.exit(f"{task} failed ({proc.returncode})")
        runs[task] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(task, runs[task])

    def damage(task: str) -> pd.Series:
        df = pd.read_csv(work / f"probe-{task}" / "probes.csv")
        df = df[df.metric == "delta_nll"]
        return df.set_index(["layer", "component", "kind"]).value

    exact, est = damage("exact-2"), damage("estimate-2")
    everything = pd.read_csv(work / "probe-all" / "probes.csv")
    everything = everything[everything.metric == "delta_nll"]
    rho = float(spearmanr(exact, est.reindex(exact.index)).statistic)
    payload = {"benchmark": "a random mamba2-1.3b: every probe of all 48 layers estimated, layer-streamed",
               "config": CONFIG, "estimator": args.estimator, "samples": args.samples, "windows": WINDOWS,
               "runs": runs, "probes": runs["all"]["probes"],
               "probes_by_kind": everything.kind.value_counts().to_dict(),
               "layers_46_47": {"probes": len(exact), "spearman": round(rho, 3), "exact": exact.round(5).tolist(),
                                "estimate": est.reindex(exact.index).round(5).tolist(),
                                "index": [" ".join(map(str, k)) for k in exact.index]},
               "target": {"seconds": 1800, "peak_rss_mb": 2048}, "cpus": os.cpu_count(),
               "versions": versions()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(payload, indent=2) + "\n")
    a = runs["all"]
    print(f"all 48 layers: {a['probes']} probes estimated ({args.estimator}) in {a['seconds'] / 60:.1f} min, "
          f"peak RSS {a['peak_rss_mb']:.0f} MB; layers 46-47: exact {runs['exact-2']['seconds']:.0f} s, estimate "
          f"{runs['estimate-2']['seconds']:.0f} s, Spearman {rho:.3f} over {len(exact)} probes")  # fmt: skip


if __name__ == "__main__":
    main()

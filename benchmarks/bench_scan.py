"""Forward+backward time: transformers' CPU reference path vs the instrumented path, side by side in one run.

Usage: python benchmarks/bench_scan.py [--batch 8] [--seqlen 256] [--hidden 256] [--layers 4] [--repeats 3]

Each allocator setting (glibc defaults, and the malloc tuning that ``make test`` uses) runs in its own child
process, since glibc reads it at start-up. Writes benchmarks/results/scan.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Mamba2Config, MambaConfig
from transformers import logging as hf_logging

from sensitivity.core import instrument
from sensitivity.core.output import atomic_write_text, versions

RESULTS = Path(__file__).parent / "results" / "scan.json"
MALLOC = {
    "glibc-default": {},
    "malloc-tuned": {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"},
}


def configs(hidden: int, layers: int) -> dict:
    common = dict(vocab_size=8192, hidden_size=hidden, num_hidden_layers=layers, state_size=16, use_cache=False)
    return {
        "mamba": MambaConfig(**common, expand=2),
        "mamba2": Mamba2Config(**common | {"state_size": 64}, expand=2, head_dim=64,
                               num_heads=2 * hidden // 64, n_groups=1, chunk_size=256),
    }


def step_seconds(model, ids, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(ids, labels=ids, use_cache=False).loss.backward()
        times.append(time.perf_counter() - start)
    return times


def measure(args) -> list[dict]:
    """All (arch, path) timings in this process."""
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = torch.randint(0, 8192, (args.batch, args.seqlen))
    tokens = args.batch * args.seqlen
    rows = []
    for arch, config in configs(args.hidden, args.layers).items():
        hf = AutoModelForCausalLM.from_config(config).train()
        paths = {"hf-reference": hf, "instrumented (auto)": instrument(copy.deepcopy(hf)),
                 "instrumented-chunked": instrument(copy.deepcopy(hf), scan="chunked"),
                 "instrumented-sequential": instrument(copy.deepcopy(hf), scan="sequential")}
        base = None
        for path, model in paths.items():
            repeats = args.hf_repeats if (path == "hf-reference" and arch == "mamba") else args.repeats
            step_seconds(model, ids[:1, :16], 1)  # warm-up
            secs = statistics.median(step_seconds(model, ids, repeats))
            base = base or secs
            rows.append({"arch": arch, "path": path, "seconds": secs, "tokens_per_s": tokens / secs,
                         "speedup_vs_hf": base / secs, "repeats": repeats})
            print(f"{arch:7s} {path:24s} {secs:8.2f} s {base / secs:6.1f}x", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-repeats", type=int, default=1, help="repeats for the (slow) HF Mamba-1 path")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    rows = []
    for setting, extra in MALLOC.items():
        env = {k: v for k, v in os.environ.items() if k not in MALLOC["malloc-tuned"]} | extra
        print(f"[{setting}]", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        rows += [{"malloc": setting, **r} for r in json.loads(out.splitlines()[-1])]
    result = {
        "benchmark": "forward+backward of a causal-LM loss, median seconds per step",
        "shape": {"batch": args.batch, "seqlen": args.seqlen, "hidden": args.hidden, "layers": args.layers,
                  "vocab": 8192},
        "threads": torch.get_num_threads(),
        "malloc_settings": MALLOC,
        "versions": versions(),
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    print("| arch | path | malloc | s/step | tokens/s | speed-up vs HF |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['path']} | {r['malloc']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['speedup_vs_hf']:.1f}x |")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()

"""Pruning, probing and evaluating a checkpoint larger than the memory they may use: layer-streamed against in
memory, on a random 1.3B Mamba-2.

Usage: python benchmarks/bench_streamed.py [--dir /tmp/mamba2-1.3b] [--windows 8] [--seqlen 128] [--batch-size 2]

Generates (once) a random-weight Mamba-2 with the mamba2-1.3b configuration (d_model 2048, 48 layers, state 128,
head_dim 64, vocabulary 50,288, tied embeddings: about 1.3B parameters, 5.2 GB in float32), saved in 1 GB
safetensors shards with the default model's tokenizer (its ids fit the vocabulary). Then, each in its own child
process (peak RSS is that process's), streamed and in memory (load, run, save):

* WANDA 50% with 8 calibration windows of 128 tokens; then the perplexity of the pruned checkpoint on 8 test
  windows of 128 tokens, streamed;
* state pruning 25% by the Taylor score (per-window gradients, 4 windows of 128 tokens);
* a probe sweep of the last two layers (components dt, B, x, out_proj and the mixer; kinds zero and mean; 4
  held-out and 4 calibration windows of 128 tokens).

All run 2 windows per forward (a block's forward on 8 x 128 tokens holds about 800 MB of intermediates at this
width). Each streamed result must equal the in-memory one (identical tensors; the same probes.csv bytes). Writes
benchmarks/results/streamed.json and prints a table.
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

RESULTS = Path(__file__).parent / "results" / "streamed.json"
CONFIG = dict(hidden_size=2048, num_hidden_layers=48, state_size=128, expand=2, head_dim=64, num_heads=64,
              n_groups=1, conv_kernel=4, chunk_size=256, vocab_size=50288, tie_word_embeddings=True,
              residual_in_fp32=True, rms_norm=True, use_bias=False, use_conv_bias=True)  # fmt: skip


def generate(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Mamba2Config

    from sensitivity import load_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Mamba2Config(**CONFIG))
    model.save_pretrained(path, max_shard_size="1GB")
    load_model("default").tokenizer.save_pretrained(path)


def ensure_checkpoint(src: Path) -> Path:
    """The random 1.3B checkpoint at ``src``, generated (and timed) if it is not there yet."""
    if not (src / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        generate(src)
        print(f"generated {src} in {time.perf_counter() - t0:.0f} s")
    return src


PROBE = dict(layers=[46, 47], components=["dt", "B", "x", "out_proj", "mixer"], kinds=["zero", "mean"], windows=4,
             calib_windows=4, seqlen=128, batch_size=2)  # fmt: skip
STATE = dict(sparsity=0.25, score="taylor", windows=4)


def child(args) -> None:
    """One task in this process; prints its seconds, peak RSS and result as JSON."""
    from transformers import AutoTokenizer

    from sensitivity import load_model
    from sensitivity.data import calibration_windows, eval_windows, load_corpus

    corpus = load_corpus()
    start = time.perf_counter()
    result: dict = {}
    streamed = args.task.endswith("-streamed")
    if args.task == "evaluate-streamed":
        from sensitivity.core.streamed import StreamedCheckpoint
        from sensitivity.eval.perplexity import streamed_perplexity

        ckpt = StreamedCheckpoint(args.out)
        windows = eval_windows(corpus, ckpt.lm.tokenizer, args.seqlen, split="test", max_windows=args.windows)
        ppl = streamed_perplexity(ckpt, windows, batch_size=args.batch_size, show_progress=False)
        result = {"perplexity": ppl.perplexity, "definition": ppl.definition}
    elif args.task.startswith("probe"):
        from sensitivity.probes import probe

        probe(args.dir if streamed else load_model(args.dir), corpus, out=args.out, streamed=streamed,
              show_progress=False, **PROBE)  # fmt: skip
    else:
        from sensitivity.pruning import prune
        from sensitivity.pruning.streamed import prune_streamed

        tokenizer = AutoTokenizer.from_pretrained(args.dir)
        method, kw = ("wanda", {"sparsity": 0.5}) if args.task.startswith("wanda") else \
            ("state", {"sparsity": STATE["sparsity"], "score": STATE["score"]})  # fmt: skip
        n = args.windows if method == "wanda" else STATE["windows"]
        windows = calibration_windows(corpus, tokenizer, n, args.seqlen, seed=0)
        if streamed:
            prune_streamed(args.dir, method, args.out, windows=windows, batch_size=args.batch_size,
                           show_progress=False, **kw)  # fmt: skip
        else:
            prune(load_model(args.dir), method, windows=windows, batch_size=args.batch_size, show_progress=False,
                  **kw).save(args.out)  # fmt: skip
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": _peak_mb(), **result}))


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM, MB): unlike ``getrusage``'s ``ru_maxrss``, which Linux carries over an exec
    from the forked parent (a child of the process that generated the checkpoint would report its 6 GB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/mamba2-1.3b")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--task", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        return child(args)
    import torch
    from safetensors.torch import load_file

    from sensitivity.core.output import atomic_write_text, versions

    src = ensure_checkpoint(Path(args.dir))
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    runs, work = {}, src.parent
    tasks = [("wanda-streamed", "wanda50-streamed"), ("evaluate-streamed", "wanda50-streamed"),
             ("wanda-memory", "wanda50-memory"), ("state-streamed", "state25-streamed"),
             ("state-memory", "state25-memory"), ("probe-streamed", "probe-streamed"),
             ("probe-memory", "probe-memory")]  # fmt: skip
    for task, out in tasks:
        out = work / out
        if not task.startswith("evaluate") and out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, __file__, "--dir", str(src), "--windows", str(args.windows), "--seqlen",
               str(args.seqlen), "--batch-size", str(args.batch_size), "--task", task, "--out", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        runs[task] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(task, runs[task])

    def tensors(path: Path) -> dict:
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    def same(a: Path, b: Path) -> bool:
        x, y = tensors(a), tensors(b)
        return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)

    identical = {"wanda": same(work / "wanda50-streamed", work / "wanda50-memory"),
                 "state": same(work / "state25-streamed", work / "state25-memory"),
                 "probe": (work / "probe-streamed" / "probes.csv").read_bytes()
                 == (work / "probe-memory" / "probes.csv").read_bytes()}  # fmt: skip
    params = sum(t.numel() for t in tensors(src).values())
    n_probes = (len((work / "probe-streamed" / "probes.csv").read_text().splitlines()) - 1) // 3
    payload = {"benchmark": "a random mamba2-1.3b pruned, probed and evaluated layer-streamed against in memory",
               "config": CONFIG, "params": params, "checkpoint_bytes": size,
               "calibration": f"WANDA {args.windows} x {args.seqlen} tokens of the train split, seed 0; state "
                              f"pruning {STATE['windows']} x {args.seqlen}",
               "state": STATE, "probe": {**PROBE, "probes": n_probes}, "batch_size": args.batch_size,
               "malloc": "glibc defaults (no MALLOC_* tuning)", "identical": identical, "runs": runs,
               "target_peak_rss_mb": 1536, "cpus": os.cpu_count(), "versions": versions()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(payload, indent=2) + "\n")
    print(f"random mamba2-1.3b: {params:,} parameters, {size / 1e9:.2f} GB of safetensors; identical: {identical}")
    print(f"| {'run':<44} | {'streamed s':>10} | {'peak MB':>7} | {'in memory s':>11} | {'peak MB':>7} |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 9}|{'-' * 13}|{'-' * 9}|")
    for key, name in (("wanda", "WANDA 50% (8 x 128)"), ("state", "state 25%, Taylor (4 x 128)"),
                      ("probe", f"probe sweep, layers 46-47 ({n_probes} probes)"),
                      ("evaluate", "perplexity of WANDA's result")):
        s, m = runs[f"{key}-streamed"], runs.get(f"{key}-memory")
        tail = f" {m['seconds']:>11.1f} | {m['peak_rss_mb']:>7.0f} |" if m else f" {'':>11} | {'':>7} |"
        print(f"| {name:<44} | {s['seconds']:>10.1f} | {s['peak_rss_mb']:>7.0f} |{tail}")

if __name__ == "__main__":
    main()

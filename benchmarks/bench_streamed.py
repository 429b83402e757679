"""WANDA on a checkpoint larger than the memory it may use: layer-streamed against in memory, on a random 1.3B Mamba-2.

Usage: python benchmarks/bench_streamed.py [--dir /tmp/mamba2-1.3b] [--windows 8] [--seqlen 128] [--batch-size 2]

Generates (once) a random-weight Mamba-2 with the mamba2-1.3b configuration (d_model 2048, 48 layers, state 128,
head_dim 64, vocabulary 50,288, tied embeddings: about 1.3B parameters, 5.2 GB in float32), saved in 1 GB
safetensors shards with the default model's tokenizer (its ids fit the vocabulary). Then, each in its own child
process (peak RSS is that process's): WANDA 50% with 8 calibration windows of 128 tokens, streamed; perplexity of
the pruned checkpoint on 8 test windows of 128 tokens, streamed; the same WANDA in memory (load, prune, save). All
run 2 windows per forward (a block's forward on 8 x 128 tokens holds about 800 MB of intermediates at this width).
The two pruned checkpoints must hold identical tensors. Writes benchmarks/results/streamed.json and prints a table.
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


def child(args) -> None:
    """One task in this process; prints its seconds, peak RSS and result as JSON."""
    from sensitivity.data import calibration_windows, eval_windows, load_corpus

    corpus = load_corpus()
    start = time.perf_counter()
    result: dict = {}
    if args.task == "evaluate":
        from sensitivity.core.streamed import StreamedCheckpoint
        from sensitivity.eval.perplexity import streamed_perplexity

        ckpt = StreamedCheckpoint(args.out)
        windows = eval_windows(corpus, ckpt.lm.tokenizer, args.seqlen, split="test", max_windows=args.windows)
        ppl = streamed_perplexity(ckpt, windows, batch_size=args.batch_size, show_progress=False)
        result = {"perplexity": ppl.perplexity, "definition": ppl.definition}
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.dir)
        windows = calibration_windows(corpus, tokenizer, args.windows, args.seqlen, seed=0)
        if args.task == "streamed":
            from sensitivity.pruning.streamed import prune_streamed

            prune_streamed(args.dir, "wanda", args.out, sparsity=0.5, windows=windows, batch_size=args.batch_size,
                           show_progress=False)  # fmt: skip
        else:
            from sensitivity import load_model
            from sensitivity.pruning import prune

            lm = load_model(args.dir)
            prune(lm, "wanda", sparsity=0.5, windows=windows, batch_size=args.batch_size,
                  show_progress=False).save(args.out)  # fmt: skip
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, **result}))


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

    src = Path(args.dir)
    if not (src / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        generate(src)
        print(f"generated {src} in {time.perf_counter() - t0:.0f} s")
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    runs = {}
    for task, out in (("streamed", src.parent / "wanda50-streamed"), ("evaluate", src.parent / "wanda50-streamed"),
                      ("in-memory", src.parent / "wanda50-memory")):  # fmt: skip
        if task != "evaluate" and out.exists():
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

    a, b = tensors(src.parent / "wanda50-streamed"), tensors(src.parent / "wanda50-memory")
    identical = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    params = sum(t.numel() for t in a.values())
    payload = {"benchmark": "WANDA 50% on a random mamba2-1.3b: layer-streamed against in memory",
               "config": CONFIG, "params": params, "checkpoint_bytes": size,
               "calibration": f"{args.windows} x {args.seqlen} tokens of the train split, seed 0",
               "batch_size": args.batch_size, "malloc": "glibc defaults (no MALLOC_* tuning)",
               "identical_tensors": identical, "runs": runs, "target_peak_rss_mb": 1536,
               "cpus": os.cpu_count(), "versions": versions()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(payload, indent=2) + "\n")
    print(f"random mamba2-1.3b: {params:,} parameters, {size / 1e9:.2f} GB of safetensors; identical: {identical}")
    print(f"| {'run':<34} | {'wall s':>7} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 13}|")
    for task, name in (("streamed", "WANDA 50%, streamed"), ("in-memory", "WANDA 50%, in memory (load, save)"),
                       ("evaluate", "perplexity of the result, streamed")):  # fmt: skip
        print(f"| {name:<34} | {runs[task]['seconds']:>7.1f} | {runs[task]['peak_rss_mb']:>11.0f} |")


if __name__ == "__main__":
    main()

"""The CUDA path, checked on a GPU: the instrumented forward and the kernels against the CPU, and their speed.

Usage: python benchmarks/gpu_check.py [--seqlen 1024] [--batch 8]   (needs a CUDA GPU; exits 2 without one)

1. Every tiny architecture and the shipped default: logits of the instrumented forward on CUDA against the CPU
   (float32; the largest absolute difference).
2. Where mamba-ssm and causal-conv1d are installed (the [cuda] extra): the HF forward through their kernels
   (``hf_forward``) against the instrumented forward on CUDA.
3. The default model's test perplexity (8 windows of 512) and a probe sweep of two layers on CUDA against the CPU.
4. Time of one forward of a random Mamba-2 of the mamba2-130m shape (``--batch`` x ``--seqlen`` tokens): the
   instrumented forward and, where installed, the kernels (median of 5 after a warm-up, CUDA-synchronised).

Writes benchmarks/results/gpu_check.json and prints every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gpu_check.json"
TINY = ["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba", "tiny:bamba", "tiny:granitemoehybrid", "tiny:nemotron-h",
        "tiny:jamba", "tiny:falcon-h1", "tiny:zamba2"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(2)
    from transformers import AutoModelForCausalLM, Mamba2Config

    from sensitivity import load_model
    from sensitivity.core.instrumented import hf_forward, instrument, kernels_available
    from sensitivity.core.output import atomic_write_text, versions
    from sensitivity.data import eval_windows, load_corpus
    from sensitivity.eval import perplexity
    from sensitivity.probes import probe

    cuda = torch.device("cuda")
    kernels = kernels_available(cuda)
    report: dict = {"device": torch.cuda.get_device_name(0), "kernels": kernels, "logits": {}, "versions": versions()}
    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(0))  # (B, L)
    for name in [*TINY, "default"]:
        cpu, gpu = load_model(name), load_model(name, device="cuda")
        with torch.no_grad():
            ref = cpu.model(input_ids=ids, use_cache=False).logits  # (B, L, V)
            got = gpu.model(input_ids=ids.to(cuda), use_cache=False).logits.cpu()
            row = {"instrumented_cuda_vs_cpu": float((got - ref).abs().max())}
            if kernels:
                with hf_forward(gpu.model):
                    fast = gpu.model(input_ids=ids.to(cuda), use_cache=False).logits.cpu()
                row["kernels_vs_instrumented_cuda"] = float((fast - got).abs().max())
        report["logits"][name] = row
        print(name, row)
    corpus = load_corpus()
    cpu, gpu = load_model("default"), load_model("default", device="cuda")
    windows = eval_windows(corpus, cpu.tokenizer, 512, split="test", max_windows=8)
    p_cpu = perplexity(cpu, windows, show_progress=False)
    p_gpu = perplexity(gpu, windows, show_progress=False)
    report["perplexity"] = {"cpu": p_cpu.perplexity, "cuda": p_gpu.perplexity, "definition": p_cpu.definition}
    options = dict(layers=[0, 7], kinds=["zero", "wanda"], sparsities=[0.5], windows=4, calib_windows=4, seqlen=256,
                   show_progress=False)  # fmt: skip
    a, b = probe(cpu, corpus, **options), probe(gpu, corpus, **options)
    report["probes_max_abs_diff"] = float((a.value - b.value).abs().max())
    print("perplexity", report["perplexity"], "probes max |diff|", report["probes_max_abs_diff"])

    config = Mamba2Config(hidden_size=768, num_hidden_layers=24, state_size=128, expand=2, head_dim=64,
                          num_heads=24, n_groups=1, vocab_size=50288, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(cuda).eval()
    instrument(model)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), device=cuda)  # (B, L)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    with torch.no_grad():
        speed = {"instrumented_s": timed(lambda: model(input_ids=x, use_cache=False))}
        if kernels:
            with hf_forward(model):
                speed["kernels_s"] = timed(lambda: model(input_ids=x, use_cache=False))
    report["speed"] = {"model": "random Mamba-2, mamba2-130m shape", "tokens": f"{args.batch} x {args.seqlen}",
                       **speed}  # fmt: skip
    print("speed", report["speed"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps({**report, "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()

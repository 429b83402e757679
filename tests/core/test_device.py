"""The device option: cpu, cuda, auto; the HF forward (the kernels' path on CUDA) against the instrumented one; the
CUDA checks, skipped where there is no GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sensitivity.core import load_model
from sensitivity.core.hooks import capture, hook_name
from sensitivity.core.instrumented import hf_forward, is_instrumented, kernels_available
from sensitivity.core.loading import resolve_device
from sensitivity.core.spec import SpecError

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'; allowed: cpu, cuda, auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' is not available here \(torch.cuda.is_available\(\) is "
                                             "False\\); allowed: cpu, auto"):  # fmt: skip
            resolve_device("cuda")
        assert not kernels_available(torch.device("cpu"))


@pytest.mark.parametrize("name", ["tiny:mamba", "tiny:mamba2", "tiny:bamba", "tiny:jamba"])
def test_hf_forward_equals_the_instrumented_one_and_fires_no_hooks(name, ids):
    lm = load_model(name)
    point = hook_name(0, "x" if lm.registry.arch != "mamba" else "u")
    with torch.no_grad(), capture(lm, [point]) as acts:
        ref = lm.model(input_ids=ids, use_cache=False).logits  # (B, L, V)
        assert len(acts[point]) == 1
        with hf_forward(lm.model):
            assert not is_instrumented(lm.model)
            plain = lm.model(input_ids=ids, use_cache=False).logits
        assert len(acts[point]) == 1 and is_instrumented(lm.model)
    assert torch.allclose(plain, ref, atol=1e-5, rtol=1e-4)


def test_a_job_on_cuda_without_one_is_refused_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from sensitivity.jobs import run
    from sensitivity.probes.job import ProbeSpec

    with pytest.raises(SpecError, match="^device: device 'cuda' is not available here"):
        run(ProbeSpec(model="tiny:mamba", data="sample", device="cuda", out=str(tmp_path / "p")))
    cmd = [sys.executable, "-m", "sensitivity", "evaluate", "--model", "tiny:mamba", "--data", "sample", "--device",
           "cuda"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--device: device 'cuda' is not available here" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "p").exists()


@GPU
@pytest.mark.parametrize("name", ["tiny:mamba", "tiny:mamba2", "tiny:bamba", "tiny:zamba2"])
def test_instrumented_forward_on_cuda_equals_cpu(name, ids):
    cpu, gpu = load_model(name), load_model(name, device="cuda")
    with torch.no_grad():
        ref = cpu.model(input_ids=ids, use_cache=False).logits
        got = gpu.model(input_ids=ids.cuda(), use_cache=False).logits.cpu()
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


@GPU
def test_perplexity_and_probes_on_cuda_equal_cpu():
    from sensitivity.data import eval_windows, load_corpus
    from sensitivity.eval import perplexity
    from sensitivity.probes import probe

    cpu, gpu = load_model("tiny:mamba2"), load_model("tiny:mamba2", device="cuda")
    windows = eval_windows(load_corpus("sample"), cpu.tokenizer, 64, split="test", max_windows=4)
    assert perplexity(gpu, windows).nll == pytest.approx(perplexity(cpu, windows).nll, rel=1e-4)
    options = dict(kinds=["zero", "wanda"], sparsities=[0.5], windows=2, calib_windows=2, seqlen=32,
                   show_progress=False)  # fmt: skip
    a, b = probe(cpu, "sample", **options), probe(gpu, "sample", **options)
    assert (a.value - b.value).abs().max() < 1e-3

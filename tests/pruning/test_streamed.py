"""Streamed mode: magnitude and WANDA read one block at a time write the same tensors as the in-memory path, and
streamed perplexity equals the loaded model's; the source checkpoint is never touched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sensitivity.core import load_model
from sensitivity.core.spec import SpecError
from sensitivity.core.streamed import STREAMED_ARCHS, StreamedCheckpoint
from sensitivity.data import calibration_windows, eval_windows, load_corpus
from sensitivity.eval import perplexity
from sensitivity.eval.perplexity import streamed_perplexity
from sensitivity.pruning import prune
from sensitivity.pruning.streamed import prune_streamed

STREAMED = ["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba", "tiny:bamba", "tiny:granitemoehybrid",
            "tiny:nemotron-h", "tiny:jamba", "tiny:falcon-h1", "tiny:zamba2"]  # fmt: skip
RUNS = [pytest.param("wanda", {}, marks=pytest.mark.compat),  # the compatibility subset (make test-latest)
        ("wanda", {"sequential": True}), ("wanda", {"structure": "2:4"}), ("magnitude", {}),
        ("magnitude", {"compare": "tensor", "exclude": "none"})]  # fmt: skip


def _save(name: str, path: Path) -> Path:
    lm = load_model(name)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the tiny init, so that scores differ from layer to layer
        for p in lm.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _digest(path: Path) -> str:
    h = hashlib.blake2b()
    for f in sorted(path.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module", params=STREAMED)
def checkpoint(request, tmp_path_factory):
    return request.param, _save(request.param, tmp_path_factory.mktemp("src") / "model")


def test_the_streamed_families_are_the_tested_ones():
    assert {load_model(n).arch for n in STREAMED} == set(STREAMED_ARCHS)


@pytest.mark.parametrize(("method", "options"), RUNS)
def test_streamed_pruning_writes_the_in_memory_tensors(checkpoint, tmp_path, one_thread, method, options):
    name, src = checkpoint
    before = _digest(src)
    windows = calibration_windows(load_corpus("sample"), load_model(name).tokenizer, 4, 32, seed=0)
    sparsity = None if "structure" in options else 0.5
    memory = load_model(str(src))
    prune(memory, method, sparsity=sparsity, windows=windows, show_progress=False, **options)
    record = prune_streamed(src, method, tmp_path / "out", sparsity=sparsity, windows=windows, show_progress=False,
                            **options)  # fmt: skip
    memory.model.save_pretrained(tmp_path / "memory")  # the checkpoint's names (experts one by one, prefixes)
    got, want = _tensors(tmp_path / "out"), _tensors(tmp_path / "memory")
    assert set(got) == set(_tensors(src)) == set(want)  # the source's names (tied tensors stored once)
    assert all(torch.equal(got[k], want[k]) for k in got), [k for k in got if not torch.equal(got[k], want[k])]
    zeros = sum(int((t == 0).sum()) for t in got.values())
    assert zeros > 0.15 * sum(t.numel() for t in got.values()) and record["params_after"]["nonzero"] == sum(
        int(t.count_nonzero()) for t in got.values())
    assert _digest(src) == before
    manifest = json.loads((tmp_path / "out" / "pruning_manifest.json").read_text())
    assert manifest["streamed"] is True and manifest["method"] == method
    reloaded, state = load_model(str(tmp_path / "out")), memory.model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in reloaded.model.state_dict().items())


def test_streamed_perplexity_equals_the_loaded_models(checkpoint, one_thread):
    name, src = checkpoint
    lm = load_model(str(src))
    windows = eval_windows(load_corpus("sample"), lm.tokenizer, 64, split="test", max_windows=5)
    streamed = streamed_perplexity(src, windows, batch_size=2, show_progress=False)
    loaded = perplexity(lm, windows, batch_size=2, show_progress=False)
    assert streamed.tokens == loaded.tokens and streamed.definition == loaded.definition
    assert streamed.nll == pytest.approx(loaded.nll, rel=1e-6, abs=1e-6)


def test_a_block_is_in_memory_only_inside_its_with(tmp_path):
    ckpt = StreamedCheckpoint(_save("tiny:mamba2", tmp_path / "m"))
    blocks = ckpt.lm.registry.blocks(ckpt.lm.model)
    assert all(p.is_meta for p in blocks.parameters())
    with ckpt.block(1) as block:
        assert not any(p.is_meta for p in block.parameters()) and all(p.is_meta for p in blocks[0].parameters())
    assert all(p.is_meta for p in blocks.parameters())
    assert not ckpt.lm.model.get_input_embeddings().weight.is_meta


def test_streamed_refusals(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"has model_type 'gpt2'; allowed model types: mamba, mamba2, .*, zamba2$"):
        StreamedCheckpoint(tmp_path / "gpt2")
    src = _save("tiny:zamba2", tmp_path / "z")
    with pytest.raises(ValueError, match="streamed mode reads a local checkpoint directory; 'tiny:mamba' is not one"):
        StreamedCheckpoint("tiny:mamba")
    allowed = "magnitude, wanda, state, head, headdim"
    with pytest.raises(SpecError, match=f"method: 'blocks' does not run streamed; allowed: {allowed}"):
        prune_streamed(src, "blocks", tmp_path / "out", sparsity=0.5)
    with pytest.raises(SpecError, match="windows: wanda needs calibration windows"):
        prune_streamed(_save("tiny:mamba", tmp_path / "m"), "wanda", tmp_path / "out", sparsity=0.5)
    assert not (tmp_path / "out").exists()


def _sensitivity(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sensitivity", *argv], capture_output=True, text=True, timeout=600)


def test_cli_streamed_prune_and_evaluate(tmp_path):
    src = _save("tiny:mamba2", tmp_path / "src")
    common = ["--method", "wanda", "--sparsity", "0.5", "--data", "sample", "--calib-windows", "4", "--seqlen", "32"]
    streamed = _sensitivity("prune", "--model", str(src), *common, "--streamed", "--out", str(tmp_path / "s"))
    assert streamed.returncode == 0, streamed.stderr
    loaded = _sensitivity("prune", "--model", str(src), *common, "--out", str(tmp_path / "m"))
    assert loaded.returncode == 0, loaded.stderr
    s, m = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert all(torch.equal(s[k], m[k]) for k in s)
    ev = _sensitivity("evaluate", "--model", str(tmp_path / "s"), "--data", "sample", "--seqlen", "64", "--streamed",
                      "--json")  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    plain = _sensitivity("evaluate", "--model", str(tmp_path / "s"), "--data", "sample", "--seqlen", "64", "--json")
    a, b = json.loads(ev.stdout), json.loads(plain.stdout)
    assert a["streamed"] is True and a["nll"] == pytest.approx(b["nll"], rel=1e-6) and a["tokens"] == b["tokens"]
    bad = _sensitivity("prune", "--model", str(src), "--method", "blocks", "--sparsity", "0.5", "--streamed",
                       "--out", str(tmp_path / "x"))  # fmt: skip
    assert bad.returncode == 2 and "'blocks' does not run streamed" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()

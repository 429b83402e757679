"""Streamed state, head and head-dim pruning write the in-memory path's checkpoint: the same removed units, the same
tensors (shrunk or masked) and the same rewritten config, on every family that streams."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sensitivity.core import load_model
from sensitivity.core.spec import SpecError
from sensitivity.data import calibration_windows, load_corpus
from sensitivity.pruning import prune
from sensitivity.pruning.streamed import prune_streamed

STREAMED = ["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba", "tiny:bamba", "tiny:granitemoehybrid",
            "tiny:nemotron-h", "tiny:jamba", "tiny:falcon-h1", "tiny:zamba2"]  # fmt: skip
MAMBA1 = {"tiny:mamba", "tiny:falcon-mamba", "tiny:jamba"}
RUNS = [
    ("state", 0.25, {"score": "magnitude"}),  # shrinks
    ("state", 0.5, {}),  # taylor: gradients back-propagated block by block
    ("state", "per-layer", {"score": "random"}),  # masks
    ("head", 0.5, {"score": "flap", "bias_compensation": True, "mode": "mask"}),
    ("head", 0.5, {"score": "taylor"}),
    ("headdim", 0.5, {"score": "magnitude"}),
]


def _save(name: str, path):
    lm = load_model(name)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # away from the tiny init, so that unit scores differ
        for p in lm.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=STREAMED)
def checkpoint(request, tmp_path_factory):
    return request.param, _save(request.param, tmp_path_factory.mktemp("src") / "model")


@pytest.mark.parametrize(("unit", "sparsity", "options"), RUNS, ids=[f"{u}-{o.get('score', 'default')}-{s}"
                                                                     for u, s, o in RUNS])  # fmt: skip
def test_streamed_units_write_the_in_memory_checkpoint(checkpoint, tmp_path, one_thread, unit, sparsity, options):
    name, src = checkpoint
    if unit != "state" and name in MAMBA1:
        pytest.skip("heads need Mamba-2 mixers")
    memory = load_model(str(src))
    if sparsity == "per-layer":  # a different count in every SSM layer: masked
        sparsity = [0.25 * (i % 3) for i in range(memory.registry.n_layers)]
        sparsity = [s if "ssm" in memory.registry.units[i] else 0.0 for i, s in enumerate(sparsity)]
    windows = calibration_windows(load_corpus("sample"), memory.tokenizer, 4, 32, seed=0)
    if name == "tiny:zamba2" and options.get("bias_compensation"):  # its flag adds biases to the shared MLP
        with pytest.raises(SpecError, match="options.bias_compensation: FLAP's bias compensation switches "
                                            "add_bias_linear on, which adds model.layers.1.shared_transformer"):
            prune_streamed(src, unit, tmp_path / "streamed", sparsity=sparsity, windows=windows, **options)
        assert not (tmp_path / "streamed").exists()
        return
    result = prune(memory, unit, sparsity=sparsity, windows=windows, seed=3, show_progress=False, **options)
    result.save(tmp_path / "memory")
    record = prune_streamed(src, unit, tmp_path / "streamed", sparsity=sparsity, windows=windows, seed=3,
                            show_progress=False, **options)  # fmt: skip
    want, got = result.manifest["structured"], record["structured"]
    assert got["removed"] == want["removed"] and any(want["removed"].values())
    assert (got["mode"], got["mode_reason"], got["config_changes"]) == (want["mode"], want["mode_reason"],
                                                                         want["config_changes"])  # fmt: skip
    a, b = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "memory")
    assert set(a) == set(b)
    exact = [k for k in a if not (k.endswith("out_proj.bias") and options.get("bias_compensation"))]
    assert all(torch.equal(a[k], b[k]) for k in exact), [k for k in exact if not torch.equal(a[k], b[k])]
    for k in set(a) - set(exact):  # FLAP's compensation: the same statistics summed block by block
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    config = lambda d: {k: v for k, v in json.loads((d / "config.json").read_text()).items()
                        if k != "transformers_version"}  # fmt: skip
    assert config(tmp_path / "streamed") == config(tmp_path / "memory")
    assert record["params_after"]["params"] == sum(t.numel() for t in b.values())  # stored entries
    reloaded = load_model(str(tmp_path / "streamed"))
    assert reloaded.n_params == memory.n_params


def test_streamed_taylor_scores_come_from_the_in_memory_gradients(tmp_path, one_thread):
    """The Fisher of a streamed taylor score against the whole model's (back-propagation per block, same sums)."""
    from sensitivity.attribution import weight_scores
    from sensitivity.core.streamed import StreamedCheckpoint
    from sensitivity.pruning.streamed import _fisher

    src = _save("tiny:bamba", tmp_path / "m")
    lm = load_model(str(src))
    windows = calibration_windows(load_corpus("sample"), lm.tokenizer, 3, 32, seed=1)
    layers = [i for i in range(lm.registry.n_layers) if "ssm" in lm.registry.units[i]]
    want = weight_scores(lm, windows, "fisher", components=("B", "C"), layers=layers, show_progress=False)
    got = _fisher(StreamedCheckpoint(src), "state", windows, layers, show_progress=False)
    assert set(got) == {tuple(k) for k in want}
    for k, v in want.items():
        torch.testing.assert_close(got[tuple(k)], v, rtol=1e-4, atol=1e-9)


def test_streamed_unit_refusals(tmp_path):
    src = _save("tiny:mamba", tmp_path / "m")
    with pytest.raises(SpecError, match="pruning method 'head' does not apply to mamba models"):
        prune_streamed(src, "head", tmp_path / "out", sparsity=0.5, score="magnitude")
    with pytest.raises(SpecError, match="windows"):
        prune_streamed(src, "state", tmp_path / "out", sparsity=0.5, score="taylor")
    with pytest.raises(SpecError, match="sparsity: 1.0 is out of range; allowed: 0 <= value < 1"):
        prune_streamed(src, "state", tmp_path / "out", sparsity=1.0, score="magnitude")
    with pytest.raises(SpecError, match=r"options.mode: 'shrink' needs the same number .* per-layer counts \[2, 4\]"):
        prune_streamed(src, "state", tmp_path / "out", sparsity=[0.25, 0.5], score="magnitude", mode="shrink")
    assert not (tmp_path / "out").exists()


def test_cli_streamed_state_pruning_equals_in_memory(tmp_path):
    import subprocess
    import sys

    src = _save("tiny:mamba2", tmp_path / "src")
    common = ["--model", str(src), "--method", "state", "--sparsity", "0.25", "--data", "sample", "--calib-windows",
              "3", "--seqlen", "32"]  # fmt: skip
    run = lambda *a: subprocess.run([sys.executable, "-m", "sensitivity", "prune", *common, *a], capture_output=True,
                                    text=True, timeout=600)  # fmt: skip
    streamed, memory = run("--streamed", "--out", str(tmp_path / "s")), run("--out", str(tmp_path / "m"))
    assert streamed.returncode == 0 and memory.returncode == 0, streamed.stderr + memory.stderr
    assert "units       state scored by taylor, mode shrink" in streamed.stdout
    s, m = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert set(s) == set(m) and all(torch.equal(s[k], m[k]) for k in s)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["state_size"] == 12

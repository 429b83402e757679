"""The streamed probe sweep (one block in memory, residual streams in memory-mapped files) writes the cached sweep's
CSV byte for byte, on every family that streams; it resumes like the in-memory sweep and refuses what it cannot do."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sensitivity.core import load_model
from sensitivity.core.spec import SpecError
from sensitivity.data import load_corpus
from sensitivity.probes import probe

SMALL = dict(windows=3, calib_windows=2, seqlen=32, batch_size=2, show_progress=False)
STREAMED = ["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba", "tiny:bamba", "tiny:granitemoehybrid",
            "tiny:nemotron-h", "tiny:jamba", "tiny:falcon-h1", "tiny:zamba2"]  # fmt: skip


def _save(name: str, path):
    lm = load_model(name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", STREAMED)
def test_streamed_sweep_writes_the_cached_sweeps_csv(name, tmp_path, one_thread):
    src = _save(name, tmp_path / "m")
    lm = load_model(str(src))
    layers = [lm.registry.n_layers - 2, lm.registry.n_layers - 1]  # a layer range: the first blocks only run
    comps = (*lm.registry.component_names, "mixer", "head") if "H" in lm.registry.dims else None
    kw = dict(layers=layers, components=comps, sparsities=(0.5,), **SMALL)
    memory = probe(lm, load_corpus("sample"), out=tmp_path / "memory", **kw)
    streamed = probe(str(src), load_corpus("sample"), out=tmp_path / "streamed", streamed=True, **kw)
    assert len(memory) > 60 and set(memory.kind) >= {"zero", "mean", "resample", "wanda", "magnitude"}
    assert (tmp_path / "streamed" / "probes.csv").read_bytes() == (tmp_path / "memory" / "probes.csv").read_bytes()
    assert streamed.equals(memory)


def test_streamed_sweep_resumes_an_in_memory_one(tmp_path, one_thread):
    """Streaming is how a sweep runs, not what it computes: a sweep started in memory finishes streamed."""
    src = _save("tiny:mamba2", tmp_path / "m")
    lm = load_model(str(src))
    kw = dict(components=["dt", "B"], kinds=["zero", "mean"], **SMALL)
    full = probe(lm, load_corpus("sample"), out=tmp_path / "full", **kw)
    probe(lm, load_corpus("sample"), out=tmp_path / "part", layers=None, **kw)
    rows = (tmp_path / "part" / "probes.csv").read_text().splitlines()
    (tmp_path / "part" / "probes.csv").write_text("\n".join(rows[: 1 + 3 * 5]) + "\n")  # 5 probes finished
    again = probe(str(src), load_corpus("sample"), out=tmp_path / "part", streamed=True, **kw)
    assert again.equals(full)
    assert (tmp_path / "part" / "probes.csv").read_bytes() == (tmp_path / "full" / "probes.csv").read_bytes()


@pytest.mark.parametrize(("options", "match"), [
    ({"sweep": "batched"}, "streamed: a streamed sweep is cached and in process; sweep=batched is not"),
    ({"backend": "ray"}, "streamed: a streamed sweep is cached and in process; backend=ray is not"),
])  # fmt: skip
def test_streamed_sweep_refusals(tmp_path, options, match):
    src = _save("tiny:mamba", tmp_path / "m")
    with pytest.raises(SpecError, match=match):
        probe(str(src), streamed=True, **options, **SMALL)
    with pytest.raises(SpecError, match="model: streamed mode reads a local checkpoint directory; 'tiny:mamba'"):
        probe("tiny:mamba", streamed=True, **SMALL)


def test_cli_streamed_probe(tmp_path):
    src = _save("tiny:bamba", tmp_path / "m")
    args = ["--data", "sample", "--windows", "2", "--calib-windows", "2", "--seqlen", "32", "--layers", "2,3",
            "--components", "dt,x", "--kinds", "zero,mean"]  # fmt: skip
    run = lambda *a: subprocess.run([sys.executable, "-m", "sensitivity", "probe", "--model", str(src), *args, *a],
                                    capture_output=True, text=True, timeout=600)  # fmt: skip
    streamed, memory = run("--streamed", "--out", str(tmp_path / "s")), run("--out", str(tmp_path / "m2"))
    assert streamed.returncode == 0 and memory.returncode == 0, streamed.stderr + memory.stderr
    assert (tmp_path / "s" / "probes.csv").read_bytes() == (tmp_path / "m2" / "probes.csv").read_bytes()
    bad = run("--streamed", "--sweep", "naive", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not (tmp_path / "x").exists()
    assert "a streamed sweep is cached and in process; sweep=naive is not" in bad.stderr


@pytest.mark.parametrize(("name", "estimator"), [("tiny:mamba2", "fisher"), ("tiny:bamba", "fisher"),
                                                ("tiny:zamba2", "fisher"), ("tiny:mamba", "local")])  # fmt: skip
def test_streamed_estimates_write_the_in_memory_csv(name, estimator, tmp_path, one_thread):
    src = _save(name, tmp_path / "m")
    lm = load_model(str(src))
    layers = [lm.registry.n_layers - 2, lm.registry.n_layers - 1]
    kw = dict(layers=layers, sparsities=(0.5,), estimate=True, estimator=estimator, **SMALL)
    memory = probe(lm, load_corpus("sample"), out=tmp_path / "memory", **kw)
    streamed = probe(str(src), load_corpus("sample"), out=tmp_path / "streamed", streamed=True, **kw)
    assert len(memory) > 60 and memory.estimated.all() and memory.value.notna().sum() > len(memory) // 2
    assert (tmp_path / "streamed" / "probes.csv").read_bytes() == (tmp_path / "memory" / "probes.csv").read_bytes()
    assert streamed.equals(memory)

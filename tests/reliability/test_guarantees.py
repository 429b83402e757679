"""What is guaranteed beyond one-line errors: no code from pickles or YAML, bounded YAML, non-finite numbers named,
one writer per output, sources never touched, plain statements of what is scored, stored dtypes kept."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sensitivity import allocate, eval_windows, load_corpus, load_model, perplexity, probe, prune
from sensitivity.allocation import Schedule
from sensitivity.core.finite import NonFiniteError, first_nonfinite
from sensitivity.core.output import OutputDir, atomic_write_texts
from sensitivity.core.spec import SpecError, load_yaml
from sensitivity.jobs import load_spec

from .conftest import MARKER, cli, listing


def _python_api_cases(ws: Path) -> list:
    """(call, parts of the message); each call must raise a ValueError whose message is one line with the parts."""
    lm = load_model("tiny:mamba2")
    return [
        (lambda: load_model(ws / "truncated"), ["truncated/model.safetensors", "not a complete safetensors file"]),
        (lambda: load_model(ws / "pickled"), ["pytorch_model.bin", "never loaded", "safetensors"]),
        (lambda: load_model(ws / "noweights"), ["has no weights"]),
        (lambda: load_model(ws / "badjson"), ["config.json", "not valid JSON"]),
        (lambda: load_model(ws / "wrongshape"), ["out_proj.weight", "shape"]),
        (lambda: load_model(ws / "nan"), ["out_proj.weight", "non-finite", "allow_nonfinite"]),
        (lambda: load_model(ws / "llama"), ["'llama'", "allowed model types"]),
        (lambda: load_model("tiny:mamba2", dtype="int8"), ["'int8'", "float32"]),
        (lambda: prune(lm, "wanda", sparsity=1.5), ["1.5", "< 1"]),
        (lambda: prune(lm, "lottery", sparsity=0.5), ["'lottery'", "wanda"]),
        (lambda: prune(lm, "magnitude", sparsity=0.5, structure="3:2"), ["3:2"]),
        (lambda: prune(lm, "magnitude"), ["sparsity", "schedule"]),
        (lambda: probe(lm, ws / "text.txt", kinds=["shred"]), ["'shred'", "zero"]),
        (lambda: probe(lm, ws / "text.txt", layers=[9]), ["9", "0..1"]),
        (lambda: probe(lm, ws / "empty.txt"), ["empty.txt", "contains no text"]),
        (lambda: allocate(lm, "depth", 0.5, depth_spread=5.0), ["depth_spread", "5"]),
        (lambda: allocate(lm, "sensitivity", 0.5, probes=ws / "binary.csv"), ["binary.csv", "not a CSV"]),
        (lambda: allocate(lm, "sensitivity", 0.5, probes=ws / "wrongcols.csv"), ["wrongcols.csv", "column"]),
        (lambda: allocate(lm, "uniform", 1.0), ["1", "budget"]),
        (lambda: Schedule.from_yaml(ws / "bomb.yaml"), ["aliases"]),
        (lambda: Schedule.from_yaml(ws / "pyobj-meta.yaml"), ["python/object"]),
        (lambda: Schedule.from_yaml(ws / "binary.yaml"), ["binary.yaml", "not UTF-8"]),
        (lambda: load_spec(ws / "pyobj.yaml"), ["python/object"]),
        (lambda: load_spec(ws / "empty.yaml"), ["empty.yaml", "empty"]),
        (lambda: load_spec(ws / "existing-dir"), ["existing-dir", "is a directory"]),
        (lambda: load_corpus(str(ws / "binary.txt")), ["binary.txt", "UTF-8"]),
        (lambda: eval_windows(load_corpus(str(ws / "text.txt")), lm.tokenizer, 16, split="dev"), ["'dev'", "'all'"]),
        (lambda: OutputDir(ws / "file.txt", "probe", {}).check(), ["file.txt", "is a file"]),
        (lambda: OutputDir("/dev/null/x", "probe", {}).check(), ["/dev/null", "not a directory"]),
        (lambda: OutputDir(ws / "existing-dir", "probe", {}).check(), ["existing-dir", "holds no sensitivity output"]),
    ]


N_PYTHON_CASES = 30


@pytest.mark.parametrize("i", range(N_PYTHON_CASES))
def test_python_api_refuses_bad_input_in_one_line(workspace, i):
    cases = _python_api_cases(workspace)
    assert len(cases) == N_PYTHON_CASES
    call, said = cases[i]
    before = listing(workspace)
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for part in said:
        assert part in message, f"{part!r} not in: {message}"
    assert listing(workspace) == before
    assert not (workspace / MARKER).exists()


# ---- code never runs from inputs ----------------------------------------------------------------------------------


def test_a_pickle_checkpoint_is_never_unpickled(workspace, monkeypatch):
    monkeypatch.chdir(workspace)  # where the pickle's payload would touch its marker
    for call in (lambda: load_model("pickled"), lambda: cli("evaluate", "--model", "pickled", "--data", "text.txt")):
        try:
            call()
        except ValueError:
            pass
        assert not (workspace / MARKER).exists()
    assert "os" in (workspace / "pickled" / "pytorch_model.bin").read_bytes().decode("latin-1")  # the payload is real


def test_python_object_yaml_never_runs(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    for path in ("pyobj.yaml", "pyobj-meta.yaml"):
        for read in (load_yaml, load_spec, Schedule.from_yaml):
            with pytest.raises(SpecError, match="python/object"):
                read(Path(path))
    assert not (workspace / MARKER).exists()


@pytest.mark.parametrize("where", ["top", "meta"])
def test_a_yaml_bomb_is_refused_within_a_second(tmp_path, where):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    text = "\n".join(lines) if where == "top" else "schedule:\n  meta:\n" + "".join(f"    {x}\n" for x in lines)
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 2000  # expands to 10^9 strings
    for read in (load_yaml, load_spec, Schedule.from_yaml):
        started = time.perf_counter()
        with pytest.raises(SpecError, match="aliases"):
            read(path)
        assert time.perf_counter() - started < 1.0


# ---- non-finite numbers ---------------------------------------------------------------------------------------------


def test_nonfinite_weights_are_named_and_can_be_allowed(workspace):
    with pytest.raises(NonFiniteError, match=r"backbone\.layers\.0\.mixer\.out_proj\.weight \(8,192 entries\)"):
        load_model(workspace / "nan")
    lm = load_model(workspace / "nan", allow_nonfinite=True)
    assert torch.isnan(lm.model.backbone.layers[0].mixer.out_proj.weight).all()


@pytest.mark.parametrize("tensor,value,where", [
    ("backbone.layers.1.mixer.dt_bias", float("nan"), "layer 1, hook point dt"),
    ("backbone.layers.0.mixer.in_proj.weight", float("inf"), "layer 0, hook point "),
    ("backbone.norm_f.weight", float("nan"), "the logits"),
])  # fmt: skip
def test_the_first_nonfinite_activation_is_named(tensor, value, where):
    lm = load_model("tiny:mamba2")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, L)
    assert first_nonfinite(lm.model, ids) is None
    with torch.no_grad():
        lm.model.get_parameter(tensor).fill_(value)
    found = first_nonfinite(lm.model, ids)
    assert found is not None and found.startswith(where), found
    # independently: the hook point named is the first whose captured activation is not finite
    with pytest.raises(NonFiniteError, match="the first non-finite activation is at " + where.split(",")[0]):
        perplexity(lm, eval_windows(load_corpus("sample"), lm.tokenizer, 16, max_windows=2), show_progress=False)


def test_a_nonfinite_loss_during_a_job_is_named_by_layer_and_hook_point(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    jobs = {
        "the loss": ["evaluate", "--model", "nan"],
        "the dense loss of the held-out windows": ["probe", "--model", "nan", "--windows", "2", "--calib-windows", "2",
                                                   "--components", "dt", "--kinds", "zero", "--out", "nan-probe"],
        "the loss objective of window 0": ["attribute", "--model", "nan", "--windows", "2", "--methods", "taylor",
                                           "--out", "nan-attribute"],
        "the dense model's loss": ["explain", "--dense", "nan", "--method", "magnitude", "--sparsity", "0.5",
                                   "--windows", "2", "--out", "nan-explain"],
    }  # fmt: skip
    for what, argv in jobs.items():
        before = listing(workspace)
        code, _, err = cli(*argv, "--allow-nonfinite", "--data", "text.txt", "--seqlen", "16")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{what} is nan: the first non-finite activation is at layer 0, hook point out" in err
        assert listing(workspace) == before


# ---- one writer -----------------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_in_process(workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with OutputDir(tmp_path / "busy", "probe", {"job": "probe"}):
        code, _, err = cli("probe", "--model", str(workspace / "good"), "--data", str(workspace / "text.txt"),
                           "--seqlen", "16", "--out", "busy")  # fmt: skip
    assert code == 2 and err.strip() == ("sensitivity probe: error: argument --out: busy is being written by another "
                                         "process; wait for it to finish or choose another directory")  # fmt: skip


def test_two_probe_processes_on_one_output_give_one_clear_error(workspace, tmp_path):
    argv = [sys.executable, "-m", "sensitivity", "probe", "--model", str(workspace / "good"), "--data",
            str(workspace / "text.txt"), "--seqlen", "32", "--windows", "2", "--calib-windows", "2", "--out", "p"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = tmp_path / "p" / "manifest.json"
    deadline = time.monotonic() + 120
    while not manifest.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first run finished before it could be paused; give it more work"
    first.send_signal(signal.SIGSTOP)  # paused mid-run, holding its lock, however fast this machine is
    try:
        second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert second.stderr.strip() == ("sensitivity probe: error: argument --out: p is being written by another process; "
                                     "wait for it to finish or choose another directory")  # fmt: skip
    assert json.loads(manifest.read_text())["status"] == "complete"
    assert not [p.name for p in (tmp_path / "p").iterdir() if p.name.endswith(".tmp")]


def test_overwrite_never_replaces_a_directory_of_something_else(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    before = listing(workspace)
    for argv in (["prune", "--model", "good", "--method", "magnitude", "--sparsity", "0.5"],
                 ["explain", "--dense", "good", "--method", "magnitude", "--sparsity", "0.5"]):  # fmt: skip
        code, _, err = cli(*argv, "--data", "text.txt", "--out", "existing-dir", "--overwrite")
        assert code == 2 and "holds no" in err and "never replaced" in err, err
    assert listing(workspace) == before


def test_several_files_are_written_all_or_none(tmp_path):
    (tmp_path / "a.yaml").write_text("old\n")
    with pytest.raises(ValueError, match="cannot write"):
        atomic_write_texts({tmp_path / "a.yaml": "new\n", Path("/proc/no-such/b.yaml"): "new\n"})
    assert (tmp_path / "a.yaml").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml"]


# ---- plain statements and kept dtypes ---------------------------------------------------------------------------


def test_evaluate_says_which_part_of_a_file_it_scores_and_split_all_scores_all(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    code, out, _ = cli("evaluate", "--model", "good", "--data", "text.txt", "--seqlen", "64", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["split"] == "test" and result["split_note"].startswith("the last 10% of text.txt")
    code, out, _ = cli("evaluate", "--model", "good", "--data", "text.txt", "--seqlen", "64", "--split", "all",
                       "--json")  # fmt: skip
    every = json.loads(out)
    text = (workspace / "text.txt").read_text()
    ids = torch.tensor(list(text.encode()))  # the byte tokenizer: one token per byte
    n = len(ids) // 64
    assert (every["split"], every["windows"], every["tokens"]) == ("all", n, n * 63)
    lm = load_model(workspace / "good")
    logits = lm.model(ids[: n * 64].view(n, 64)).logits[:, :-1].float()  # (B, L-1, V)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[: n * 64].view(n, 64)[:, 1:]
                                            .reshape(-1))  # fmt: skip
    assert every["nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert math.isclose(every["perplexity"], math.exp(every["nll"]))


def _dtypes(path: Path) -> set[str]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_a_pruned_float16_checkpoint_stays_float16_unless_asked(workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    common = ["prune", "--model", str(workspace / "half"), "--method", "magnitude", "--sparsity", "0.5"]
    assert cli(*common, "--out", "kept")[0] == 0
    assert cli(*common, "--save-dtype", "float32", "--out", "wide")[0] == 0
    assert _dtypes(workspace / "half") == _dtypes(tmp_path / "kept") == {"F16"}
    assert _dtypes(tmp_path / "wide") == {"F32"}
    source, kept = (workspace / "half" / "model.safetensors").stat().st_size, (tmp_path / "kept" / "model.safetensors")
    assert kept.stat().st_size == source
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["dtype"] == "float16"
    pruned = load_model(tmp_path / "kept", dtype="float16")
    weight = pruned.model.backbone.layers[0].mixer.out_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert pruned.model.get_output_embeddings().weight is pruned.model.get_input_embeddings().weight  # still tied

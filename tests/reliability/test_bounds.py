"""Inputs that never end or never fit, and outputs that are not ours: each refused with its bound, exit 2, one line,
nothing written (issue 29's cases), and the paths that make it so checked against independent computations."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch

from sensitivity.core import loading
from sensitivity.core.distributed import Execution, _stderr_into, check_resources
from sensitivity.core.spec import MAX_COUNT, SpecError
from sensitivity.core.streamed import StreamedCheckpoint
from sensitivity.data.windows import MAX_CALIBRATION_TOKENS

from .conftest import cli, listing

FAST = ["--seqlen", "16", "--data", "text.txt"]


def refused(workspace, monkeypatch, *argv) -> str:
    """Run ``sensitivity ARGV`` in the workspace; assert a clean refusal; return its one line."""
    monkeypatch.chdir(workspace)
    before = listing(workspace)
    code, _, err = cli(*argv)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert listing(workspace) == before
    return err.strip()


def test_every_count_has_a_ceiling(workspace, monkeypatch):
    assert MAX_COUNT == MAX_CALIBRATION_TOKENS == 67_108_864
    line = refused(workspace, monkeypatch, "probe", "--model", "good", *FAST, "--windows", "1000000000", "--out", "n")
    assert line == ("sensitivity probe: error: argument --windows: 1000000000 is out of range; allowed: 1 <= value <= "
                    "67,108,864")  # fmt: skip
    line = refused(workspace, monkeypatch, "report", "--model", "good", "--long-seqlen", "1000000000", "--out", "n")
    assert "argument --long-seqlen: 1000000000 is out of range; allowed: 2 <= value <= 67,108,864" in line


def test_recall_items_are_bounded_by_their_tokens(workspace, monkeypatch):
    """10M items of 65 tokens (16 pairs: 1 + 4 x 16) are 650M tokens: refused before anything loads (it ran until
    the kernel killed it)."""
    line = refused(workspace, monkeypatch, "probe", "--model", "good", *FAST, "--task", "recall", "--task-items",
                   "10000000", "--out", "n")  # fmt: skip
    assert line == ("sensitivity probe: error: argument --task-items: 10,000,000 recall items of 65 tokens (16 pairs) "
                    "are 650,000,000 tokens; at most 67,108,864 tokens of task items (items x item length) are built")


@pytest.mark.parametrize("args,said", [
    (["--tasks", "recall:99999"], "argument --task-items: 200 recall items of 399,997 tokens"),
    (["--tasks", "recall:40"], "argument --tasks: recall with 40 pairs needs 40 distinct keys; allowed: 1 to 31"),
    (["--tasks", "recall", "--recall-pairs", "4,40"], "argument --recall-pairs: recall with 40 pairs"),
    (["--recall-pairs", "0"], "argument --recall-pairs: 0: 0 is out of range; allowed: 1 <= value"),
    (["--tasks", "cloze", "--long-seqlen", "100000"], "argument --long-seqlen: 100,000 is longer than split 'test' "
                                                      "of text.txt (7,244 tokens); allowed: 2 to 7,244"),
])  # fmt: skip
def test_report_refuses_its_objective_options_before_writing(workspace, monkeypatch, args, said):
    """These failed after the report had written its first stages (or were silently ignored)."""
    line = refused(workspace, monkeypatch, "report", "--model", "good", *FAST, *args, "--out", "n")
    assert said in line, line


def test_recall_pairs_beyond_the_key_pool_name_the_flag(workspace, monkeypatch):
    line = refused(workspace, monkeypatch, "probe", "--model", "good", *FAST, "--task", "recall:40", "--out", "n")
    assert line == ("sensitivity probe: error: argument --task: recall with 40 pairs needs 40 distinct keys; allowed: "
                    "1 to 31 pairs (the whole-word tokens of this model's tokenizer)")  # fmt: skip


def test_evaluate_scores_recall_at_the_pairs_asked(workspace, monkeypatch):
    """``--tasks recall:8`` is the recall scorer at 8 pairs: the same accuracy as recall_accuracy called directly."""
    from sensitivity.core import load_model
    from sensitivity.eval import recall_accuracy

    monkeypatch.chdir(workspace)
    code, out, err = cli("evaluate", "--model", "good", *FAST, "--tasks", "recall:8", "--limit", "6", "--json")
    assert code == 0, err
    import json

    rows = json.loads(out)["tasks"]
    assert [r["metric"] for r in rows] == ["acc@pairs=8"]
    lm = load_model("good")
    direct = recall_accuracy(lm, lm.tokenizer, pairs=[8], items=6, seed=0, show_progress=False)
    assert rows[0]["value"] == pytest.approx(float(direct.correct.mean()), abs=1e-12)
    assert rows[0]["n"] == 6 * 8
    line = refused(workspace, monkeypatch, "evaluate", "--model", "good", *FAST, "--tasks", "recall:0")
    assert "'recall:0' is not a built-in task (cloze, choice, recall, long, recall:P)" in line


def test_a_model_that_does_not_fit_is_refused_from_its_config(workspace, monkeypatch):
    """The bytes named are the parameters a real load holds (tied ones once) times 4 (float32)."""
    lm = loading.load_model(str(workspace / "good"))
    weights = sum(p.numel() for p in lm.model.parameters()) * 4
    monkeypatch.setattr(loading, "available_memory", lambda: weights - 1)
    line = refused(workspace, monkeypatch, "evaluate", "--model", "good", *FAST)
    assert line.startswith(f"sensitivity evaluate: error: argument --model: model 'good' needs {weights / 1e6:.1f} "
                           "MB for its weights as float32 (mamba2: hidden_size=64, num_hidden_layers=2, "
                           "vocab_size=257); this machine has ")  # fmt: skip
    assert line.endswith("allowed: a model whose weights fit (or --streamed, which holds one block at a time)")
    monkeypatch.setattr(loading, "available_memory", lambda: weights)
    loading.load_model(str(workspace / "good"))  # exactly enough


def test_a_streamed_model_needs_only_its_largest_block_to_fit(workspace, monkeypatch):
    lm = loading.load_model(str(workspace / "good"))
    blocks = lm.registry.blocks(lm.model)
    inside = {id(p) for b in blocks for p in b.parameters()}
    outside = sum(p.numel() for p in lm.model.parameters() if id(p) not in inside)
    need = (outside + max(sum(p.numel() for p in b.parameters()) for b in blocks)) * 4
    assert need < sum(p.numel() for p in lm.model.parameters()) * 4
    monkeypatch.setattr(loading, "available_memory", lambda: need)
    StreamedCheckpoint(workspace / "good")
    monkeypatch.setattr(loading, "available_memory", lambda: need - 1)
    with pytest.raises(ValueError, match=f"needs {need / 1e6:.1f} MB for its largest block as float32"):
        StreamedCheckpoint(workspace / "good")


def test_a_streamed_shape_mismatch_is_named_before_anything_is_built(workspace, monkeypatch):
    """A config far larger than its weights: the shape message, not an allocator error (it tried 16 TB)."""
    import json
    import shutil

    huge = workspace.parent / "huge-streamed"
    shutil.copytree(workspace / "good", huge)
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "hidden_size": 1_000_000, "num_heads": 125_000}))
    with pytest.raises(ValueError, match=r"embeddings.weight has shape \[257, 64\]; the config needs \[257, 1000000\]"):
        StreamedCheckpoint(huge)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_checkpoint_without_tokenizer_files_has_no_tokenizer(workspace, monkeypatch, streamed):
    """transformers builds an empty tokenizer for it (every text 0 tokens: the message was about the corpus)."""
    import shutil

    bare = workspace.parent / f"bare-{streamed}"
    if not bare.exists():
        bare.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(workspace / "good" / name, bare / name)
    line = refused(workspace, monkeypatch, "evaluate", "--model", str(bare), *FAST, *(["--streamed"] * streamed))
    assert line == f"sensitivity evaluate: error: argument --model: {str(bare)!r} has no tokenizer; save one next to " \
                   "its config"  # fmt: skip


def test_overwrite_replaces_only_what_the_toolkit_wrote(workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(workspace)
    paper = tmp_path / "paper.tex"
    paper.write_text("\\documentclass{article}\n")
    base = ["schedule", "--model", "good", *FAST, "--method", "uniform", "--budget", "0.5", "--overwrite"]
    line = refused(workspace, monkeypatch, *base, "--out", str(paper))
    assert line == (f"sensitivity schedule: error: argument --out: {paper} exists and has no '# sparsity schedule:' "
                    "header: it is not an output of sensitivity, and overwrite replaces only those; choose another "
                    "file")  # fmt: skip
    assert paper.read_text() == "\\documentclass{article}\n"
    ours, recipe = tmp_path / "s.yaml", tmp_path / "r.yaml"
    assert cli(*base, "--out", str(ours), "--recipe", str(recipe))[0] == 0
    line = refused(workspace, monkeypatch, *base, "--out", str(ours), "--recipe", str(paper))
    assert "argument --recipe:" in line and "'# llm-compressor recipe from a sensitivity schedule'" in line
    assert cli(*base[:-2], "0.4", "--overwrite", "--out", str(ours), "--recipe", str(recipe))[0] == 0
    assert "overall 0.4" in ours.read_text().splitlines()[0] and "overall 0.4" in recipe.read_text()


def test_overwrite_of_an_agreement_needs_its_manifest(workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(workspace)
    assert cli("probe", "--model", "good", *FAST, "--windows", "2", "--calib-windows", "2", "--kinds", "zero",
               "--out", str(tmp_path / "p"), "--top", "0")[0] == 0  # fmt: skip
    assert cli("attribute", "--model", "good", *FAST, "--methods", "act_norm", "--out", str(tmp_path / "a"))[0] == 0
    table = tmp_path / "mine.csv"
    table.write_text("a,b\n1,2\n")
    args = ["agreement", "--probes", str(tmp_path / "p"), "--attribution", str(tmp_path / "a"), "--overwrite"]
    line = refused(workspace, monkeypatch, *args, "--out", str(table))
    assert line.endswith(f"argument --out: {table} exists and has no {tmp_path / 'mine.manifest.json'} naming job "
                         "'agreement': it is not an output of sensitivity, and overwrite replaces only those; choose "
                         "another file"), line
    assert table.read_text() == "a,b\n1,2\n"
    assert cli(*args[:-1], "--out", str(tmp_path / "ours.csv"))[0] == 0
    assert cli(*args, "--out", str(tmp_path / "ours.csv"))[0] == 0  # its own output: replaced


def test_options_that_would_be_ignored_are_refused(workspace, monkeypatch):
    line = refused(workspace, monkeypatch, "probe", "--model", "good", *FAST, "--estimator", "local", "--out", "n")
    assert line == ("sensitivity probe: error: argument --estimator: 'local' chooses how estimate estimates; it needs "
                    "estimate (without it every probe is measured exactly)")  # fmt: skip
    line = refused(workspace, monkeypatch, "schedule", "--model", "good", *FAST, "--method", "unit", "--unit-offset",
                   "attention=0.1", "--budget", "0.5", "--out", "u.yaml")  # fmt: skip
    assert line == ("sensitivity schedule: error: argument --unit-offset: 'attention': this mamba2 model has no "
                    "attention weights in the schedule; allowed unit kinds: ssm")  # fmt: skip


def test_explain_takes_a_device(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    code, out, _ = cli("explain", "--dense", "good", "--method", "wanda", "--sparsity", "0.5", "--device", "auto",
                       "--out", "n", "--print-spec")  # fmt: skip
    assert code == 0 and "device: auto" in out
    if not torch.cuda.is_available():
        line = refused(workspace, monkeypatch, "explain", "--dense", "good", "--method", "wanda", "--sparsity", "0.5",
                       "--device", "cuda", "--out", "n")  # fmt: skip
        assert "argument --device" in line and "cuda" in line


@pytest.mark.parametrize("fields,resources,said", [
    ({"worker_cpus": 64}, {"CPU": 2.0}, "worker_cpus: 64 CPUs per worker; this machine has 2; allowed: 1 to 2"),
    ({"worker_gpus": 1}, {"CPU": 2.0}, "worker_gpus: 1 GPUs per worker; this machine has 0; allowed: 0"),
    ({"worker_gpus": 2, "address": "h:1"}, {"CPU": 8.0, "GPU": 1.0},
     "worker_gpus: 2 GPUs per worker; the cluster at 'h:1' has 1; allowed: 0 to 1"),
    ({"workers": 1000}, {"CPU": 2.0}, "workers: 1000 workers of 1 CPUs and 0 GPUs do not fit on this machine (2 "
                                      "CPUs, 0 GPUs); allowed: 1 to 2"),
    ({"workers": 3, "worker_gpus": 0.5}, {"CPU": 16.0, "GPU": 1.0}, "workers: 3 workers of 1 CPUs and 0.5 GPUs do "
     "not fit on this machine (16 CPUs, 1 GPUs); allowed: 1 to 2"),
])  # fmt: skip
def test_workers_the_cluster_cannot_place_are_refused(fields, resources, said):
    """Ray waits forever for an actor no node can hold: the requested resources are checked against the cluster's."""
    with pytest.raises(SpecError) as e:
        check_resources(Execution(backend="ray", **fields), resources)
    assert str(e.value) == said


def test_workers_that_fit_are_accepted():
    check_resources(Execution(backend="ray", workers=2, worker_cpus=1), {"CPU": 2.0})
    check_resources(Execution(backend="ray", workers=2, worker_gpus=0.5), {"CPU": 4.0, "GPU": 1.0})
    check_resources(Execution(backend="ray"), {"CPU": 1.0})


def test_ray_start_up_lines_are_logged_not_printed(capfd):
    """What Ray's native code writes to file descriptor 2 while joining (GCS retries, its token warning) goes to the
    log; a refusal stays one line."""
    lines: list[str] = []
    with _stderr_into(lines):
        os.write(2, b"[W gcs_client.cc:210] Failed to get cluster ID from GCS server: Unauthenticated\n")
        os.write(2, b"WARNING authentication_token_setup.py:85 -- Token authentication is enabled\n")
    os.write(2, b"after\n")
    assert lines == ["[W gcs_client.cc:210] Failed to get cluster ID from GCS server: Unauthenticated",
                     "WARNING authentication_token_setup.py:85 -- Token authentication is enabled"]
    assert capfd.readouterr().err == "after\n"


def test_a_closed_pipe_ends_the_command_quietly(workspace, monkeypatch):
    """``sensitivity ... | head``: the reader leaves; no 'internal error', status 141 as for SIGPIPE."""
    from sensitivity.cli.main import main

    monkeypatch.chdir(workspace)
    read, write = os.pipe()
    os.close(read)
    saved = os.dup(1)
    stream = io.TextIOWrapper(os.fdopen(write, "wb", buffering=0), write_through=True)
    monkeypatch.setattr(sys, "stdout", stream)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    try:
        code = main(["zoo", "list"])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert code == 141
    assert err.getvalue() == ""


@pytest.mark.parametrize("job,args", [
    ("probe", ["--model", "good", *FAST]), ("attribute", ["--model", "good", *FAST]),
    ("prune", ["--model", "good", *FAST, "--method", "magnitude", "--sparsity", "0.5"]),
    ("explain", ["--dense", "good", *FAST, "--method", "magnitude", "--sparsity", "0.5"]),
    ("report", ["--model", "good", *FAST]), ("grid", ["--models", "good", *FAST]),
    ("evaluate", ["--model", "good", *FAST]),
    ("schedule", ["--model", "good", *FAST, "--method", "uniform", "--budget", "0.5"]),
])  # fmt: skip
def test_an_output_name_the_file_system_cannot_hold_is_refused(workspace, monkeypatch, job, args):
    """A 300-byte name was an ``OSError: File name too long`` (exit 1)."""
    line = refused(workspace, monkeypatch, job, *args, "--out", "a" * 300)
    assert line == (f"sensitivity {job}: error: argument --out: {'a' * 24}... is a name of 300 bytes; allowed: at most "
                    "255 (the file system's limit)")  # fmt: skip

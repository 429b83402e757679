"""Exact resume: a run killed (SIGKILL) and rerun into the same directory writes what an uninterrupted run writes,
byte for byte; the same seed writes the same bytes; pruning never changes its source checkpoint.

A killed run is ``python -m sensitivity JOB ...`` in a subprocess, killed once a file it writes shows it has reached
a point (the filesystem polled every 20 ms, 2 ms for the short-lived staging directory of a checkpoint; nothing in
the library waits or signals). The rerun (the same command line) and the uninterrupted reference run in this
process, through the CLI's ``main``: a subprocess would add seconds of imports to each. Outputs compare byte for
byte, except manifests, which compare as JSON without their volatile keys (wall times, timestamps, whether and how
much was resumed, output paths), and the rendered report (report.md, report.html: they show the run's timings and
creation time), which must exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sensitivity.core import load_model
from sensitivity.pruning import METHODS

from .conftest import _save, cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
POLL = 0.02  # seconds between looks at the output
TIMEOUT = 300
VOLATILE = frozenset({"timings", "seconds", "created", "started", "resumed", "resumed_with", "out", "execution"})
"""Manifest keys that differ between runs of the same spec: wall times, when, resumed or not, where, and how this
run's work was spread (workers, threads, restarts and shard times)."""
UNCOMPARED = frozenset({"report.html", "report.md"})
"""Rendered with the run's timings and creation time: they must exist, their bytes may differ."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(f"word{i % 97} and more{i % 13}." for i in range(4000)) + "\n")
    return str(path)


def _args(job: str, corpus: str) -> list[str]:
    """The command line of each job, small enough for seconds on a CPU."""
    common = ["--model", "tiny:mamba2", "--data", corpus, "--seqlen", "16"]
    return {
        "probe": ["probe", *common, "--windows", "2", "--calib-windows", "2", "--kinds", "zero,wanda",
                  "--sparsities", "0.5"],
        "attribute": ["attribute", *common, "--windows", "2"],
        "prune": ["prune", *common, "--calib-windows", "2", "--method", "wanda", "--sparsity", "0.5"],
        "report": ["report", *common, "--probe-windows", "2", "--probe-kinds", "wanda", "--probe-sparsities", "0.5",
                   "--attribution-windows", "1", "--calib-windows", "1", "--eval-windows", "1", "--eval-seqlen", "16",
                   "--sparsities", "0.5", "--structured-sparsities", "0.5", "--explain-windows", "1"],
    }[job]  # fmt: skip


def _in_process(*argv: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        code, _, err = cli(*argv)
    assert code == 0, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Callable[[str], Path]:
    """The output of an uninterrupted run of a job (run on first use, in this process)."""
    done: dict[str, Path] = {}

    def get(job: str) -> Path:
        if job not in done:
            out = tmp_path_factory.mktemp(f"reference-{job}") / "out"
            _in_process(*_args(job, corpus), "--out", str(out))
            done[job] = out
        return done[job]

    return get


def _command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "sensitivity", *argv]


def _kill_when(argv: list[str], reached: Callable[[], bool], delay: float = 0.0, poll: float = POLL) -> bool:
    """Run the CLI in a subprocess and SIGKILL it ``delay`` seconds after ``reached()`` first holds (checked every
    ``poll`` seconds). Returns whether it was killed (False: it finished before the point was seen)."""
    proc = subprocess.Popen(_command(*argv), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None:
            if reached():
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            assert time.monotonic() < deadline, "the run neither reached the kill point nor finished"
            time.sleep(poll)
        err = proc.stderr.read().decode()
        assert proc.returncode == 0, err
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _rerun(argv: list[str]) -> None:
    _in_process(*argv)


def _manifest(path: Path) -> dict:
    manifest = path / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


def _status(path: Path) -> str | None:
    try:
        return _manifest(path).get("status")
    except json.JSONDecodeError:  # never: manifests are replaced atomically
        raise AssertionError(f"{path}/manifest.json is half written") from None


def _rows(csv: Path) -> int:
    return max(len(csv.read_text().splitlines()) - 1, 0) if csv.is_file() else 0


def _stable(value):
    """A manifest without its volatile keys (and without temporary files in its list of outputs)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _files(root: Path) -> dict[str, object]:
    """Every file under ``root`` by relative path: its bytes, a manifest's stable JSON, or None (rendered)."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(root))
        if path.name in ("manifest.json", "pruning_manifest.json"):
            out[rel] = _stable(json.loads(path.read_text()))
        elif rel in UNCOMPARED:
            out[rel] = None
        else:
            out[rel] = path.read_bytes()
    return out


def _assert_same(resumed: Path, reference: Path) -> None:
    got, want = _files(resumed), _files(reference)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"differ from an uninterrupted run: {differ}"


# -- kill points: (name, the file condition, delay after it, what the killed run must have left) -------------------
def _probe_points(out: Path, total: int):
    csv = out / "probes.csv"
    return {
        "running": (lambda: _status(out) == "running", 0.0),  # calibrated, dense NLL measured, no probe written
        "first-probe": (csv.is_file, 0.0),
        "half": (lambda: _rows(csv) >= total // 2, 0.0),
    }


@pytest.mark.parametrize("point", ["running", "first-probe", "half"])
def test_probe_killed_and_rerun_writes_what_an_uninterrupted_run_writes(point, tmp_path, corpus, reference):
    ref = reference("probe")
    total = _rows(ref / "probes.csv")
    out = tmp_path / "out"
    argv = [*_args("probe", corpus), "--out", str(out)]
    reached, delay = _probe_points(out, total)[point]
    assert _kill_when(argv, reached, delay), "finished before the kill point"
    finished = _rows(out / "probes.csv")
    assert _status(out) == "running" and finished < total  # killed mid-sweep
    _rerun(argv)
    manifest = _manifest(out)
    assert manifest["status"] == "complete" and manifest["resumed_with"] == finished // 3  # 3 metrics a probe
    _assert_same(out, ref)


@pytest.mark.parametrize("delay", [0.0, 0.2], ids=["started", "mid-run"])
def test_attribute_killed_and_rerun_writes_what_an_uninterrupted_run_writes(delay, tmp_path, corpus, reference):
    ref = reference("attribute")
    out = tmp_path / "out"
    argv = [*_args("attribute", corpus), "--out", str(out)]
    killed = _kill_when(argv, lambda: _status(out) == "running", delay)
    if delay == 0.0:  # killed within a poll of its start; attributing two windows takes far longer
        assert killed and _status(out) == "running" and not (out / "attribution.csv").exists()
    _rerun(argv)
    assert _status(out) == "complete"
    _assert_same(out, ref)


@pytest.mark.parametrize("point", ["staging", "config"])
def test_prune_killed_and_rerun_writes_what_an_uninterrupted_run_writes(point, tmp_path, corpus, reference):
    ref = reference("prune")
    out = tmp_path / "out"
    stage = tmp_path / ".out.tmp"
    argv = [*_args("prune", corpus), "--out", str(out)]
    # the staging directory lives about 0.1 s: created, then config.json, the weights, the tokenizer, the manifest
    reached = stage.is_dir if point == "staging" else (stage / "config.json").is_file
    assert _kill_when(argv, reached, poll=0.002), "finished before the kill point"
    assert stage.is_dir() and not out.exists()  # killed while writing the checkpoint: nothing published
    _rerun(argv)
    assert not stage.exists()
    _assert_same(out, ref)


def _report_points(out: Path):
    return {
        "probes": (out / "probes" / "probes.csv").is_file,
        "grid": (out / "data" / "grid.csv").is_file,
        "explain": lambda: any((out / "explain").glob("*/explanation.json")),
    }


@pytest.mark.slow
@pytest.mark.parametrize("point", ["probes", "grid", "explain"])
def test_report_killed_and_rerun_writes_what_an_uninterrupted_run_writes(point, tmp_path, corpus, reference):
    ref = reference("report")
    out = tmp_path / "out"
    argv = [*_args("report", corpus), "--out", str(out)]
    assert _kill_when(argv, _report_points(out)[point]), "finished before the kill point"
    assert _status(out) == "running" and not (out / "report.html").exists()
    _rerun(argv)
    assert _status(out) == "complete" and _manifest(out)["resumed"] is True
    for name in UNCOMPARED:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    _assert_same(out, ref)


# -- the same seed twice -------------------------------------------------------------------------------------------
def _chain(root: Path, corpus: str, monkeypatch) -> None:
    """Probe, attribute, their agreement, a sensitivity schedule and recipe from the probes, magnitude and WANDA
    checkpoints, an evaluation and an explanation of the WANDA one, in ``root``, with relative output paths (a
    schedule records its spec, outputs included)."""
    root.mkdir()
    monkeypatch.chdir(root)
    common = ["--model", "tiny:mamba2", "--data", corpus, "--seqlen", "16"]
    _in_process("probe", *common, "--windows", "2", "--calib-windows", "2", "--kinds", "wanda", "--sparsities",
                "0.25,0.5", "--out", "p")  # fmt: skip
    _in_process("attribute", *common, "--windows", "2", "--out", "a")
    _in_process("agreement", "--probes", "p", "--attribution", "a")
    _in_process("schedule", *common, "--method", "sensitivity", "--probes", "p", "--budget", "0.4", "--out",
                "s.yaml", "--recipe", "r.yaml")  # fmt: skip
    for method in ("magnitude", "wanda"):
        _in_process("prune", *common, "--calib-windows", "2", "--method", method, "--sparsity", "0.5", "--out",
                    method)  # fmt: skip
    _in_process("evaluate", "--model", "wanda", "--data", corpus, "--seqlen", "16", "--max-windows", "4", "--out",
                "e")  # fmt: skip
    _in_process("explain", "--dense", "tiny:mamba2", "--pruned", "wanda", "--data", corpus, "--seqlen", "16",
                "--windows", "2", "--out", "x")  # fmt: skip


def test_the_same_seed_writes_the_same_bytes(tmp_path, corpus, monkeypatch):
    for name in ("first", "second"):
        _chain(tmp_path / name, corpus, monkeypatch)
    files = ["p/probes.csv", "a/attribution.csv", "p/agreement.csv", "s.yaml", "r.yaml", "e/evaluation.json"]
    files += [f"{m}/{f}" for m in ("magnitude", "wanda") for f in ("model.safetensors", "config.json")]
    files += [f"x/{f}" for f in ("explanation.json", "explanation.md", "drift.csv", "patching.csv", "dynamics.csv",
                                 "samples.csv", "states.csv")]  # fmt: skip
    for name in files:
        first, second = (tmp_path / "first" / name).read_bytes(), (tmp_path / "second" / name).read_bytes()
        assert first == second, name
    probes = (tmp_path / "first" / "p" / "probes.csv").read_text()
    assert probes.count("\n") > 10 and "wanda" in probes


# -- the source checkpoint -----------------------------------------------------------------------------------------
def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}  # fmt: skip


def test_pruning_never_changes_its_source_checkpoint(tmp_path, corpus):
    source = _save(load_model("tiny:mamba2", instrument=False), tmp_path / "source")
    before = _hashes(source)
    assert "model.safetensors" in before and "config.json" in before
    for method in METHODS:
        out = tmp_path / f"pruned-{method}"
        _in_process("prune", "--model", str(source), "--data", corpus, "--seqlen", "16", "--calib-windows", "2",
                    "--method", method, "--sparsity", "0.5", "--out", str(out))  # fmt: skip
        assert (out / "pruning_manifest.json").is_file(), method
        assert _hashes(source) == before, method
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["source", *(f"pruned-{m}" for m in METHODS)])

"""The output layer: atomic files, locked directories that resume only the same spec, whole-directory publishing,
and two real processes on one output directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sensitivity.core.output import OutputDir, OutputError, atomic_write_text, publish_dir

SPEC = {"job": "probe", "model": "m", "seed": 0, "out": "x"}


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.csv"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    atomic_write_text(path, "old\n")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_same_spec_resumes_other_spec_or_job_is_refused(tmp_path):
    out = tmp_path / "run"
    with OutputDir(out, "probe", SPEC) as d:
        assert d.previous is None
        d.write_text("probes.csv", "x\n")
        d.manifest(status="complete")
    with OutputDir(out, "probe", {**SPEC, "out": "elsewhere"}) as d:  # where it writes is not part of its identity
        assert d.previous["status"] == "complete"
    with pytest.raises(OutputError, match=r"holds a probe run with other settings \(seed\); use another directory"):
        OutputDir(out, "probe", {**SPEC, "seed": 1}).__enter__()
    with pytest.raises(OutputError, match="holds the output of a 'probe' job, not 'report'"):
        OutputDir(out, "report", SPEC).__enter__()
    with pytest.raises(OutputError, match="on other inputs"):
        OutputDir(out, "probe", SPEC, inputs={"windows_sha256": "abc"}).__enter__()
    assert (out / "probes.csv").read_text() == "x\n"  # every refusal left the output as it was
    with OutputDir(out, "probe", {**SPEC, "seed": 1}, overwrite=True) as d:
        assert d.previous is None and list(out.iterdir()) == []


def test_a_directory_holding_something_else_is_never_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is not empty and holds no sensitivity output"):
            OutputDir(tmp_path, "probe", SPEC, overwrite=overwrite).__enter__()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file; allowed: a directory"):
        OutputDir(tmp_path / "file", "probe", SPEC).__enter__()
    with pytest.raises(OutputError, match="cannot create /dev/null/x: /dev/null is not a directory"):
        OutputDir("/dev/null/x", "probe", SPEC).__enter__()


def test_a_second_writer_is_refused_while_the_first_holds_the_directory(tmp_path):
    out = tmp_path / "run"
    with OutputDir(out, "probe", SPEC) as first:
        first.manifest(status="running")
        with pytest.raises(OutputError, match="is being written by another process; wait for it to finish"):
            OutputDir(out, "probe", SPEC).__enter__()
    with OutputDir(out, "probe", SPEC) as again:  # released on exit
        assert again.previous["status"] == "running"


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), OutputDir(out, "probe", SPEC):
        raise RuntimeError("the model did not load")
    assert not out.exists()


def test_publish_dir_appears_whole_and_refuses_a_second_publisher(tmp_path):
    out = tmp_path / "ckpt"
    with publish_dir(out) as stage:
        (stage / "config.json").write_text("{}")
        assert not out.exists()  # nothing until it is complete
        with pytest.raises(OutputError, match="is being written by another process"), publish_dir(out):
            pass
    assert [p.name for p in out.iterdir()] == ["config.json"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt"]  # fmt: skip
    with pytest.raises(OutputError, match="ckpt is not empty; choose another directory or overwrite it"):
        with publish_dir(out):
            pass
    with pytest.raises(KeyboardInterrupt), publish_dir(tmp_path / "killed") as stage:
        (stage / "half").write_text("x")
        raise KeyboardInterrupt
    assert not (tmp_path / "killed").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _probe(out, *extra):
    return [sys.executable, "-m", "sensitivity", "probe", "--model", "tiny:mamba2", "--data", "sample",
            "--seqlen", "64", "--windows", "4", "--out", str(out), *extra]  # fmt: skip


def test_two_processes_on_one_output_directory_give_one_clear_error_and_an_intact_output(tmp_path):
    reference = subprocess.run(_probe(tmp_path / "reference"), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "shared"
    first = subprocess.Popen(_probe(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.json"
    deadline = time.time() + 300
    while not (manifest.is_file() and json.loads(manifest.read_text()).get("status") == "running"):
        assert time.time() < deadline and first.poll() is None, "the first run never started its sweep"
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # hold it mid-sweep, lock held, so the second surely meets it
    try:
        second = subprocess.run(_probe(out), capture_output=True, text=True, timeout=600)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr.strip() == f"sensitivity probe: error: argument --out: {out} is being written by another " \
                                    "process; wait for it to finish or choose another directory"
    assert (out / "probes.csv").read_bytes() == (tmp_path / "reference" / "probes.csv").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "probes.csv"]


def test_an_output_made_before_a_field_was_added_resumes_when_it_has_its_default(tmp_path):
    from sensitivity.core.spec import Spec

    class Old(Spec):
        model: str = "m"
        out: str = "x"

    class New(Old):
        careful: bool = False

    with OutputDir(tmp_path / "o", "probe", Old()) as out:
        out.manifest(status="complete")
    with OutputDir(tmp_path / "o", "probe", New()) as out:  # the new field at its default: the same run
        assert out.previous is not None and out.previous["spec"] == {"model": "m", "out": "x"}
    with pytest.raises(OutputError, match=r"holds a probe run with other settings \(careful\)"):
        OutputDir(tmp_path / "o", "probe", New(careful=True)).check()
    with pytest.raises(OutputError, match=r"other settings \(model\)"):
        OutputDir(tmp_path / "o", "probe", New(model="other")).check()

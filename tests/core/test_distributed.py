"""Ray backend: a probe sweep on a local Ray cluster writes byte-identical CSVs to one in-process run with the same
threads per process, also after a worker is killed mid-run; models reach workers by name or as safetensors bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sensitivity.core import load_model
from sensitivity.core.distributed import Execution, ModelSource, run_shards, weights_digest
from sensitivity.core.loading import as_loaded
from sensitivity.core.spec import SpecError
from sensitivity.probes import probe

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module

SMALL = dict(windows=4, calib_windows=2, seqlen=32, batch_size=2, show_progress=False)
RAY = dict(backend="ray", workers=2, worker_cpus=1)


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU Ray cluster for the module (jobs join it instead of starting their own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def threads1():
    """The in-process reference runs with one thread, as each Ray worker does (worker_cpus=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _csv(path: Path) -> bytes:
    return (path / "probes.csv").read_bytes()


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tiny:mamba2", dict(kinds=["zero", "resample", "wanda"], sparsities=[0.5])),
        ("tiny:mamba", dict(kinds=["zero", "mean", "magnitude"], sparsities=[0.5], sweep="batched", stack=2)),
        ("tiny:bamba", dict(kinds=["zero", "wanda", "remove"], sparsities=[0.5], layers=[0, 1, 3])),
        ("tiny:mamba2", dict(kinds=["zero", "wanda"], sparsities=[0.5], estimate=True)),
    ],
)
def test_ray_sweep_is_byte_identical_to_in_process(cluster, threads1, tmp_path, name, options):
    lm = load_model(name)
    probe(lm, "sample", out=tmp_path / "local", **options, **SMALL)
    df = probe(lm, "sample", out=tmp_path / "ray", **options, **SMALL, **RAY)
    assert _csv(tmp_path / "ray") == _csv(tmp_path / "local")
    assert len(df) > 30 and df.value.notna().any()
    run = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert run["execution"]["backend"] == "ray"
    assert run["execution"]["workers"] == (1 if options.get("estimate") else 2)  # estimates: one shard
    assert run["execution"]["restarts"] == 0 and run["spec"]["backend"] == "ray"
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert local["execution"] == {**local["execution"], "backend": "local", "threads": 1}
    if not options.get("estimate"):
        assert run["dense_nll"] == local["dense_nll"]


def _worker_pids() -> list[int]:
    """Processes of this machine running a sensitivity Ray worker (their title is ray::_Worker...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and title.startswith(b"ray::_Worker"):
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_a_killed_worker_is_replaced_and_the_output_is_unchanged(cluster, threads1, tmp_path):
    lm = load_model("tiny:mamba2")
    options = dict(kinds=["zero", "mean", "resample", "wanda", "magnitude"], sparsities=[0.25, 0.5, 0.75])
    probe(lm, "sample", out=tmp_path / "local", **options, **SMALL)
    errors = []
    run = threading.Thread(target=lambda: _catch(errors, probe, lm, "sample", out=tmp_path / "ray", **options,
                                                 **SMALL, **RAY))  # fmt: skip
    run.start()
    deadline, killed = time.monotonic() + 60, None
    while killed is None and time.monotonic() < deadline and run.is_alive():
        if pids := _worker_pids():  # each worker has its first shard: killing one now loses that shard
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    run.join(timeout=300)
    assert not errors, errors
    assert killed is not None
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["execution"]["restarts"] >= 1
    assert _csv(tmp_path / "ray") == _csv(tmp_path / "local")


def _catch(errors: list, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # reported by the test's assert
        errors.append(repr(e))


def test_a_resumed_run_may_change_backend(cluster, threads1, tmp_path):
    """Where a run goes is not part of its identity: a sweep started in process resumes on Ray, same bytes."""
    lm = load_model("tiny:mamba")
    options = dict(kinds=["zero", "wanda"], sparsities=[0.5])
    probe(lm, "sample", out=tmp_path / "whole", **options, **SMALL)
    probe(lm, "sample", out=tmp_path / "mixed", layers=[0], **options, **SMALL)  # another spec: its own directory
    first = probe(lm, "sample", out=tmp_path / "resumed", **options, **SMALL)
    csv = tmp_path / "resumed" / "probes.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[: 1 + 3 * 5]) + "\n")  # the first five probes finished
    df = probe(lm, "sample", out=tmp_path / "resumed", **options, **SMALL, **RAY)
    assert _csv(tmp_path / "resumed") == _csv(tmp_path / "whole")
    assert json.loads((tmp_path / "resumed" / "manifest.json").read_text())["resumed_with"] == 5
    assert df.equals(first)


def test_a_model_built_in_memory_reaches_the_workers_as_safetensors(cluster, threads1, tmp_path):
    lm = load_model("tiny:falcon-mamba")
    bare = as_loaded(lm.model)  # no source to load again from
    bare.tokenizer = lm.tokenizer
    assert bare.source is None and ModelSource.of(bare).weights is not None
    probe(bare, "sample", out=tmp_path / "local", kinds=["zero"], **SMALL)
    probe(bare, "sample", out=tmp_path / "ray", kinds=["zero"], **SMALL, **RAY)
    assert _csv(tmp_path / "ray") == _csv(tmp_path / "local")


def test_a_model_changed_after_loading_is_refused_by_the_workers(cluster, tmp_path):
    lm = load_model("tiny:mamba")
    with torch.no_grad():
        lm.model.lm_head.weight[0, 0] += 1.0
    with pytest.raises(RuntimeError, match="weights differ from the driver's"):
        probe(lm, "sample", out=tmp_path / "ray", kinds=["zero"], **SMALL, **RAY)
    assert not (tmp_path / "ray" / "probes.csv").exists()


def test_model_source_rebuild_equals_the_original():
    """The safetensors path (tied embeddings kept once) gives the same weights, digest and forward."""
    lm = load_model("tiny:mamba2")
    source = ModelSource.of(as_loaded(lm.model))
    again = source.model()
    assert weights_digest(again.model) == weights_digest(lm.model) == source.digest
    ids = torch.arange(40).reshape(2, 20)  # (B, L)
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


class _Squares:
    """A shard job for run_shards' own tests: the square of each number, and which process computed it."""

    def __init__(self, lm, payload):
        self.offset = payload

    def run(self, shard):
        if shard == 13:
            raise ValueError("13 is unlucky")
        return shard * shard + self.offset, os.getpid()


def test_run_shards_returns_every_shard_once_and_raises_a_shards_own_error(cluster):
    lm = load_model("tiny:mamba")
    got = {}
    stats = run_shards(lm, _Squares, 1, list(range(6)), Execution(**RAY), lambda s, r: got.setdefault(s, r))
    assert {s: v for s, (v, _) in got.items()} == {s: s * s + 1 for s in range(6)}
    assert len({pid for _, pid in got.values()} - {os.getpid()}) == 2 and stats.workers == 2
    with pytest.raises(ValueError, match="13 is unlucky"):
        run_shards(lm, _Squares, 0, [12, 13], Execution(**RAY), lambda s, r: None)


def test_ray_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SpecError, match=r"backend: 'ray' needs Ray: pip install 'sensitivity\[distributed\]'"):
        run_shards(load_model("tiny:mamba"), _Squares, 0, [1], Execution(backend="ray"), lambda s, r: None)


def test_bad_execution_options():
    with pytest.raises(SpecError, match="backend: 'spark' is invalid; allowed: one of 'local' or 'ray'"):
        Execution(backend="spark")
    with pytest.raises(SpecError, match="workers: 0 is out of range; allowed: 1 <= value <= 67,108,864"):
        Execution(workers=0)


def _sensitivity(*argv: str) -> subprocess.CompletedProcess:
    """The command line in a child process with one torch thread (as each worker has)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sensitivity", *argv], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip


@pytest.mark.compat
def test_cli_probe_on_ray_writes_the_in_process_bytes(tmp_path):
    """``--backend ray --workers 2`` starts a local cluster for the job (none is running in this test)."""
    common = ["probe", "--model", "tiny:mamba2", "--data", "sample", "--kinds", "zero,wanda", "--sparsities", "0.5",
              "--windows", "3", "--calib-windows", "2", "--seqlen", "32"]  # fmt: skip
    local = _sensitivity(*common, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    run = _sensitivity(*common, "--out", str(tmp_path / "ray"), "--backend", "ray", "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert _csv(tmp_path / "ray") == _csv(tmp_path / "local")
    assert "ray" in json.loads((tmp_path / "ray" / "manifest.json").read_text())["execution"]["backend"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backend", "spark"], "--backend: 'spark' is invalid; allowed: one of 'local' or 'ray'"),
        (["--backend", "ray", "--workers", "0"], "--workers: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        (["--backend", "ray", "--worker-gpus", "-1"], "--worker-gpus: -1.0 is out of range; allowed: value >= 0"),
        (["--backend", "ray", "--address", "127.0.0.1:9"], "--address: no Ray cluster answers at '127.0.0.1:9'"),
    ],
)
def test_cli_bad_execution_flags_exit_2_and_write_nothing(tmp_path, flags, message):
    run = _sensitivity("probe", "--model", "tiny:mamba", "--data", "sample", "--windows", "2", "--seqlen", "16",
                       "--out", str(tmp_path / "p"), *flags)  # fmt: skip
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "p").exists()


def test_ray_grid_is_byte_identical_to_in_process(cluster, threads1, tmp_path):
    """The grid's cells (and the probes behind its sensitivity schedule) on two workers: the same grid.csv."""
    from sensitivity.jobs import run
    from sensitivity.report.job import GridSpec

    common = dict(models=["tiny:mamba2"], data="sample", sparsities=[0.5], structured_sparsities=[0.5],
                  allocators=["sensitivity", "owl"], calib_windows=2, seqlen=32, probe_windows=2,
                  probe_sparsities=[0.5, 0.9], eval_seqlen=64, eval_windows=2)  # fmt: skip
    local = run(GridSpec(**common, out=str(tmp_path / "local")), show_progress=False).value
    run(GridSpec(**common, out=str(tmp_path / "ray"), **RAY), show_progress=False)
    for name in ("grid.csv", "probes/tiny:mamba2/probes.csv"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert len(local) == 9 and local.perplexity.notna().all()
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["execution"]["tiny:mamba2"]["workers"] == 2


def test_ray_report_writes_the_in_process_probes_and_grid(cluster, threads1, tmp_path):
    from sensitivity.report import build_report

    tiny = dict(model="tiny:mamba", data="sample", probe_windows=2, calib_windows=2, eval_windows=2, eval_seqlen=64,
                explain_windows=2, attribution_windows=2, seqlen=32, sparsities=[0.5], structured_sparsities=[0.5],
                probe_kinds=["zero", "wanda"], probe_sparsities=[0.5], show_progress=False)  # fmt: skip
    build_report(tmp_path / "local", **tiny)
    build_report(tmp_path / "ray", **tiny, **RAY)
    for name in ("probes", "grid", "schedule", "verdicts"):
        got, want = (tmp_path / d / "data" / f"{name}.csv" for d in ("ray", "local"))
        assert got.read_bytes() == want.read_bytes(), name
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["execution"]["grid"]["backend"] == "ray" and manifest["spec"]["workers"] == 2


def test_ray_attribution_equals_in_process(cluster, threads1, tmp_path):
    """Methods reading the same statistics run together on one worker; the table is the in-process one."""
    from sensitivity.attribution import attribute
    from sensitivity.data import calibration_windows, load_corpus

    lm = load_model("tiny:bamba")
    windows = calibration_windows(load_corpus("sample"), lm.tokenizer, 2, 32, seed=0)
    methods = ["act_norm", "taylor", "fisher", "gblm", "grad_x_act", "integrated_gradients"]
    local = attribute(lm, windows, methods=methods, n_steps=4, show_progress=False)
    remote = attribute(lm, windows, methods=methods, n_steps=4, show_progress=False, **RAY)
    assert remote.equals(local) and set(local.kind) == set(methods) and len(local) > 100

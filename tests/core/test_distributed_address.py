"""Joining a running cluster by address, as on several machines: ``ray start --head`` in its own processes (token
authentication on, Ray's default since 2.59), then a job with ``--address`` writes the in-process bytes. Runs after
test_distributed.py's module cluster is shut down, since ``ray stop`` stops every Ray process of the user."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sensitivity.core.distributed import Execution, _connect
from sensitivity.core.spec import SpecError

ray = pytest.importorskip("ray")
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_job_joins_a_cluster_started_with_ray_start(tmp_path):
    port, token = _free_port(), secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1"}
    head = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--disable-usage-stats",
            "--include-dashboard=false"]
    start = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr
        common = [sys.executable, "-m", "sensitivity", "probe", "--model", "tiny:mamba2", "--data", "sample",
                  "--kinds", "zero,wanda", "--sparsities", "0.5", "--windows", "3", "--calib-windows", "2",
                  "--seqlen", "32"]  # fmt: skip
        local = subprocess.run([*common, "--out", str(tmp_path / "local")], env=env, capture_output=True, text=True,
                               timeout=600)  # fmt: skip
        joined = subprocess.run([*common, "--out", str(tmp_path / "joined"), "--backend", "ray", "--address",
                                 f"127.0.0.1:{port}", "--workers", "2"], env=env, capture_output=True, text=True,
                                timeout=600)  # fmt: skip
        assert local.returncode == 0 and joined.returncode == 0, local.stderr + joined.stderr
        assert (tmp_path / "joined" / "probes.csv").read_bytes() == (tmp_path / "local" / "probes.csv").read_bytes()
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_a_refused_connection_names_token_authentication(monkeypatch):
    """Without RAY_AUTH_MODE=token a driver cannot join a cluster that uses tokens; Ray only says it failed."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def refuse(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1")

    monkeypatch.setattr(ray, "init", refuse)
    with socket.socket() as server:  # something answers at the address, as a head node would
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(SpecError, match=r"address: cannot join the Ray cluster at .*: Failed to connect .*; if "
                                            r"the cluster uses token authentication .* run with RAY_AUTH_MODE=token"):
            _connect(ray, Execution(backend="ray", address=address))
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        with pytest.raises(SpecError) as err:
            _connect(ray, Execution(backend="ray", address=address))
        assert "token" not in str(err.value)

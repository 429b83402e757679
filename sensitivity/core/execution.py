"""Where a job runs (:class:`Execution`: this process, or Ray workers), as spec fields; the runner that uses them
is :mod:`sensitivity.core.distributed`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

from .spec import Count, Spec, _not_bool, _range

__all__ = ["BACKENDS", "EXECUTION_FIELDS", "GPUs", "Execution"]

BACKENDS = ("local", "ray")
GPUs = Annotated[float, BeforeValidator(_not_bool), _range(0, None)]
"""GPUs per worker: a number >= 0 (a fraction shares one GPU between workers)."""
EXECUTION_FIELDS = ("backend", "address", "workers", "worker_cpus", "worker_gpus")
"""Spec fields that say where a job runs, not what it computes: a run resumes another whatever their values."""


class Execution(Spec):
    """Where a job runs. Every field is left out of the identity a resumed run must match."""

    backend: Literal["local", "ray"] = "local"
    """local: this process; ray: Ray actors (pip install 'sensitivity[distributed]'), each loading the model once."""
    address: str | None = None
    """With backend ray: the cluster to join ('auto' or host:port of ``ray start --head``); default: start a local
    one on this machine for the job."""
    workers: Count | None = None
    """With backend ray: how many workers (default: as many as the cluster's CPUs hold at worker_cpus each)."""
    worker_cpus: Count = 1
    """With backend ray: CPUs per worker, and its torch threads."""
    worker_gpus: GPUs = 0.0
    """With backend ray: GPUs per worker (a fraction shares one); workers with a GPU load the model on it."""

    def execution(self) -> dict[str, Any]:
        """The execution fields alone (to pass to the stages a job runs)."""
        return {k: getattr(self, k) for k in EXECUTION_FIELDS}

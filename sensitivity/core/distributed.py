"""Where a job's independent pieces run: in this process, or on Ray workers (the ``[distributed]`` extra).

A stage splits its work into shards (the probes of one layer, one cell of a pruning grid) and describes it by a
*shard job*: a class built once per worker from ``(model, payload)`` (the stage's spec, windows and plan; it does
the set-up every shard shares, such as calibration statistics or the cached dense residual stream) and called on
one shard at a time. :func:`run_shards` runs it in this process, or on ``workers`` Ray actors that each load the
model once; results reach the caller's ``on_result`` in the driver, which writes them through the stage's output
directory as they arrive (so resume and the directory lock work as in one process).

A worker that dies (killed, out of memory, its node lost) is replaced by a fresh actor and its shard is run again;
the shard's numbers do not depend on which worker ran it. torch's CPU kernels sum in an order that depends on the
thread count, so a run is reproducible bit for bit at a fixed number of threads per process: a Ray worker uses
``worker_cpus`` threads, and its outputs are byte-identical to an in-process run with that many threads.

Workers load the model with the driver's :attr:`LoadedModel.source` and check that their weights hash to the
driver's; a model that has none (built in memory) is sent to them as safetensors bytes. Nothing is unpickled from
disk; Ray's own serialisation carries the specs and windows between processes of one cluster.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .execution import BACKENDS, EXECUTION_FIELDS, Execution
from .loading import LoadedModel, load_model
from .spec import SpecError

__all__ = ["BACKENDS", "EXECUTION_FIELDS", "Execution", "ModelSource", "ShardStats", "check_resources", "cluster",
           "run_shards"]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Times a shard is started before a run gives up on it (a shard that kills every worker it meets)."""


@dataclass(frozen=True)
class ModelSource:
    """How a worker gets the driver's model: load it again (``load``) or rebuild it from ``config`` and
    safetensors ``weights``; ``digest`` is what its weights must hash to."""

    digest: str
    load: dict | None = None
    config: dict | None = None
    weights: bytes | None = None

    @classmethod
    def of(cls, lm: LoadedModel) -> ModelSource:
        digest = weights_digest(lm.model)
        if lm.source is not None:
            return cls(digest, load=dict(lm.source))
        from safetensors.torch import save

        return cls(digest, config=lm.model.config.to_dict(), weights=save(_unique_state(lm.model)))

    def model(self, device: str | torch.device = "cpu") -> LoadedModel:
        """The model, on ``device``, checked against the driver's weights.

        Raises:
            RuntimeError: If the weights loaded differ from the driver's (the model was changed after loading).
        """
        if self.load is not None:
            lm = load_model(self.load["name"], dtype=self.load["dtype"], revision=self.load.get("revision"),
                            allow_nonfinite=self.load.get("allow_nonfinite", False), device=device)  # fmt: skip
        else:
            lm = _rebuild(self.config, self.weights, device)
        if weights_digest(lm.model) != self.digest:
            raise RuntimeError(f"a worker loaded {lm.name!r} but its weights differ from the driver's (was the model "
                               "changed after loading?); save it with save_pretrained and pass the directory")
        return lm


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once (the first name), contiguous, on the CPU."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous().cpu()
    return out


def weights_digest(model: torch.nn.Module) -> str:
    """A BLAKE2b digest of every unique tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(_unique_state(model).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _rebuild(config: dict, weights: bytes, device) -> LoadedModel:
    from safetensors.torch import load
    from transformers import AutoConfig, AutoModelForCausalLM

    from .instrumented import instrument
    from .registry import build_registry

    cfg = AutoConfig.for_model(**config)
    state = load(weights)
    model = AutoModelForCausalLM.from_config(cfg, dtype=next(iter(state.values())).dtype)
    model.load_state_dict(state, strict=False)  # tied tensors were sent once; the digest check covers the rest
    model.tie_weights()
    model = model.to(device).eval()
    instrument(model)
    return LoadedModel(model=model, tokenizer=None, registry=build_registry(model.config), name=type(model).__name__)


@dataclass
class _Local:
    """The in-process counterpart of a worker: the model and the job in progress."""

    lm: LoadedModel
    job: tuple[str, Any] | None = None


class _Worker:
    """A Ray actor: one copy of the model, the shard job of the run in progress, and a shard at a time."""

    def __init__(self, source: ModelSource, threads: int, device: str) -> None:
        torch.set_num_threads(threads)
        self.source, self.device = source, device
        self.lm: LoadedModel | None = None  # loaded by the first run: its errors reach the driver as they are
        self.job: tuple[str, Any] | None = None

    def run(self, job_id: str, job_cls: type, payload: Any, shard: Any) -> Any:
        if self.lm is None:
            self.lm = self.source.model(self.device)
        return _timed(self, job_id, job_cls, payload, shard)


def _timed(holder, job_id: str, job_cls: type, payload: Any, shard: Any) -> tuple[Any, float, float]:
    """``holder``'s job (built on first use) run on ``shard``: (result, set-up seconds, shard seconds)."""
    setup = 0.0
    if holder.job is None or holder.job[0] != job_id:
        t0 = time.perf_counter()
        holder.job = (job_id, job_cls(holder.lm, payload))
        setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = holder.job[1].run(shard)
    return result, setup, time.perf_counter() - t0


@dataclass
class ShardStats:
    """How a run of shards went: where it ran, on how many workers with how many threads, the workers replaced
    after dying, the wall time, and each worker's set-up and each shard's time (seconds, in shard order)."""

    backend: str
    workers: int
    threads: int
    restarts: int = 0
    seconds: float = 0.0
    setup_seconds: list[float] = field(default_factory=list)
    shard_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.__dict__, "setup_seconds": [round(t, 3) for t in self.setup_seconds],
                "shard_seconds": [round(t, 3) for t in self.shard_seconds]}  # fmt: skip


def _ray():
    try:
        import ray
    except ImportError:
        raise SpecError("'ray' needs Ray: pip install 'sensitivity[distributed]'", "backend") from None
    return ray


@contextmanager
def _stderr_into(lines: list[str]) -> Iterator[None]:
    """Send what this process and its native libraries write to standard error (file descriptor 2) into ``lines``
    instead of the terminal while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += [line for line in sink.read().decode(errors="replace").splitlines() if line.strip()]


def _connect(ray, execution: Execution) -> bool:
    """Join the cluster ``execution`` names, or start a local one; True when this call started it."""
    if ray.is_initialized():
        check_resources(execution, ray.cluster_resources())
        return False
    if execution.address not in (None, "auto"):
        host, _, port = execution.address.rpartition("://")[2].rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError):
            raise SpecError(f"no Ray cluster answers at {execution.address!r}; allowed: 'auto' or the host:port "
                            "that 'ray start --head' printed", "address") from None  # fmt: skip
    said: list[str] = []
    try:
        with _stderr_into(said):  # Ray's start-up lines (its token warning, GCS retries): logged, not printed
            if execution.address is None:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address=execution.address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        hint = ""
        if execution.address is not None and os.environ.get("RAY_AUTH_MODE") != "token":
            hint = ("; if the cluster uses token authentication (the default of 'ray start' since Ray 2.59), run "
                    "with RAY_AUTH_MODE=token and its token (~/.ray/auth_token or RAY_AUTH_TOKEN)")  # fmt: skip
        gcs = [line.partition("GCS server: ")[2] for line in said if "GCS server: " in line]
        why = f" (the cluster said: {gcs[-1].strip()})" if gcs else ""
        raise SpecError(f"cannot join the Ray cluster at {execution.address!r}: {str(e).splitlines()[0]}{why}{hint}",
                        "address") from None  # fmt: skip
    finally:
        for line in said:
            logger.info("ray: %s", line)
    try:
        check_resources(execution, ray.cluster_resources())
    except SpecError:
        ray.shutdown()
        raise
    return True


def check_resources(execution: Execution, resources: dict[str, float]) -> None:
    """Refuse workers the cluster cannot place (Ray would wait for them forever): each needs ``worker_cpus`` CPUs
    and ``worker_gpus`` GPUs, and ``workers`` of them must fit at once.

    Args:
        execution: The requested workers.
        resources: ``ray.cluster_resources()`` of the joined cluster.

    Raises:
        SpecError: Naming the field, what was asked and what the cluster has.
    """
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    where = "this machine" if execution.address is None else f"the cluster at {execution.address!r}"
    if execution.worker_cpus > cpus:
        raise SpecError(f"{execution.worker_cpus} CPUs per worker; {where} has {cpus:g}; allowed: 1 to {cpus:g}",
                        "worker_cpus")  # fmt: skip
    if execution.worker_gpus > gpus:
        raise SpecError(f"{execution.worker_gpus:g} GPUs per worker; {where} has {gpus:g}" +
                        (f"; allowed: 0 to {gpus:g}" if gpus else "; allowed: 0"), "worker_gpus")  # fmt: skip
    if execution.workers is not None:
        fit = int(cpus // execution.worker_cpus)
        if execution.worker_gpus > 0:
            fit = min(fit, int(gpus // execution.worker_gpus))
        if execution.workers > fit:
            raise SpecError(f"{execution.workers} workers of {execution.worker_cpus} CPUs and "
                            f"{execution.worker_gpus:g} GPUs do not fit on {where} ({cpus:g} CPUs, {gpus:g} GPUs); "
                            f"allowed: 1 to {fit}", "workers")  # fmt: skip


@contextmanager
def cluster(execution: Execution) -> Iterator[None]:
    """Join (or start) the Ray cluster of ``execution`` for a job's whole run, so that its stages share one; does
    nothing for the local backend or when Ray is already initialised."""
    if execution.backend == "local":
        yield
        return
    ray = _ray()
    started = _connect(ray, execution)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_shards(
    lm: LoadedModel,
    job_cls: type,
    payload: Any,
    shards: Sequence[Any],
    execution: Execution,
    on_result: Callable[[Any, Any], None],
) -> ShardStats:
    """Run ``job_cls(lm, payload).run(shard)`` for every shard, here or on Ray workers, calling
    ``on_result(shard, result)`` in this process as each one finishes (in order here; as they arrive on Ray).

    Args:
        lm: The model (Ray workers load their own copy of it).
        job_cls: A class importable by the workers (defined at module level), built as ``job_cls(lm, payload)`` once
            per worker; its ``run(shard)`` returns a shard's result.
        payload: What ``job_cls`` needs besides the model (sent once to each Ray worker).
        shards: The pieces of work, each run exactly once (again after its worker died).
        execution: Where to run.
        on_result: Called with each shard and its result.

    Returns:
        :class:`ShardStats`.

    Raises:
        SpecError: Ray missing or its cluster unreachable.
        RuntimeError: A shard whose worker died :data:`MAX_ATTEMPTS` times.
        Exception: Whatever a shard raised (the original exception, also from a Ray worker).
    """
    start = time.perf_counter()
    if execution.backend == "local":
        stats = ShardStats("local", 1, torch.get_num_threads(), shard_seconds=[0.0] * len(shards))
        holder = _Local(lm)
        for i, shard in enumerate(shards):
            result, setup, stats.shard_seconds[i] = _timed(holder, "local", job_cls, payload, shard)
            if setup:
                stats.setup_seconds.append(setup)
            on_result(shard, result)
        stats.seconds = time.perf_counter() - start
        return stats
    ray = _ray()
    started = _connect(ray, execution)
    workers: list = []
    try:
        source = ModelSource.of(lm)
        device = "cuda" if execution.worker_gpus > 0 else "cpu"
        n = execution.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // execution.worker_cpus))
        n = max(1, min(n, len(shards)))
        actor = ray.remote(_Worker).options(num_cpus=execution.worker_cpus, num_gpus=execution.worker_gpus,
                                            max_restarts=0)  # fmt: skip
        spawn = lambda: actor.remote(source, execution.worker_cpus, device)
        workers = [spawn() for _ in range(n)]
        payload_ref, job_id = ray.put(payload), os.urandom(8).hex()
        stats = ShardStats("ray", n, execution.worker_cpus, shard_seconds=[0.0] * len(shards))
        pending, inflight, attempts = deque(range(len(shards))), {}, [0] * len(shards)

        def submit(w: int) -> None:
            i = pending.popleft()
            attempts[i] += 1
            inflight[workers[w].run.remote(job_id, job_cls, payload_ref, shards[i])] = (w, i)

        for w in range(n):
            if pending:
                submit(w)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            w, i = inflight.pop(ref)
            try:
                result, setup, stats.shard_seconds[i] = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if attempts[i] >= MAX_ATTEMPTS:
                    raise RuntimeError(f"shard {i} of {len(shards)}: its worker died {attempts[i]} times "
                                       f"({str(e).splitlines()[0]})") from None  # fmt: skip
                logger.warning("a worker died (%s); replacing it and running its shard again",
                               str(e).splitlines()[0])  # fmt: skip
                ray.kill(workers[w])
                workers[w] = spawn()
                stats.restarts += 1
                pending.appendleft(i)
                submit(w)
                continue
            except ray.exceptions.RayTaskError as e:
                raise e.cause from None
            if setup:
                stats.setup_seconds.append(setup)
            on_result(shards[i], result)
            if pending:
                submit(w)
        stats.seconds = time.perf_counter() - start
        return stats
    finally:
        for w in workers:
            ray.kill(w)
        if started:
            ray.shutdown()


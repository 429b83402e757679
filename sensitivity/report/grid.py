"""The pruning grid: every method at every sparsity on one model, each evaluated by test perplexity (and by the
accuracy on each task objective asked for, a column each).

A run is a :class:`GridRun` record (method, sparsity, the allocator of its schedule, its N:M structure); tables
carry those as columns and a display ``label`` (``"wanda+sensitivity"``, ``"wanda 2:4"``) that is never parsed.
The report's grid stage and the ``grid`` job (the paper's question on the shipped models) both run grids here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..allocation import Schedule
from ..core.distributed import Execution, ShardStats, run_shards
from ..core.jobs import Inputs
from ..core.loading import LoadedModel
from ..data import Windows
from ..eval import objective_scores, perplexity
from ..pruning import METHODS, PruneResult, applicable_units, prune

__all__ = ["DENSE", "GridJob", "GridPayload", "GridRun", "grid_row", "plan_grid", "prune_run", "run_grid_rows"]

logger = logging.getLogger(__name__)

DENSE = "dense"
"""The ``method`` of the unpruned reference row."""


@dataclass(frozen=True)
class GridRun:
    """One cell of a pruning grid.

    Attributes:
        method: A pruning method (:data:`sensitivity.pruning.METHODS`), or ``"dense"``.
        sparsity: Its sparsity (for a schedule: the schedule's budget; for N:M: the implied one).
        allocator: The allocator of its schedule (``sensitivity``, ``owl``, ``depth``), or None for one sparsity.
        structure: Its N:M structure (``"2:4"``), or None.
    """

    method: str
    sparsity: float
    allocator: str | None = None
    structure: str | None = None

    @property
    def label(self) -> str:
        """The display name: ``wanda``, ``wanda+sensitivity``, ``wanda 2:4``."""
        return self.method + (f"+{self.allocator}" if self.allocator else "") + (
            f" {self.structure}" if self.structure else "")

    def record(self) -> dict:
        """The run's columns of a grid row: ``label``, ``method``, ``allocator``, ``structure`` (``""`` when
        None) and ``sparsity``."""
        return {"label": self.label, "method": self.method, "allocator": self.allocator or "",
                "structure": self.structure or "", "sparsity": self.sparsity}  # fmt: skip


def plan_grid(registry, sparsities: Sequence[float], structured: Sequence[float], *,
              allocators: Sequence[str] = ("sensitivity",), nm: str | None = "2:4") -> list[GridRun]:  # fmt: skip
    """The runs of a grid on a model of ``registry``'s architecture, the dense reference first: magnitude, WANDA
    and WANDA on each allocator's schedule at every sparsity, WANDA ``nm``, then every structured unit the
    architecture has at every ``structured`` sparsity."""
    runs = [GridRun(DENSE, 0.0)]
    for s in sparsities:
        runs += [GridRun("magnitude", s), GridRun("wanda", s), *(GridRun("wanda", s, a) for a in allocators)]
    if nm is not None:
        n, m = map(int, nm.split(":"))
        runs.append(GridRun("wanda", 1 - n / m, structure=nm))
    runs += [GridRun(u, s) for u in applicable_units(registry) for s in structured]
    return runs


def prune_run(lm: LoadedModel, run: GridRun, calib: Windows, schedule: Callable[[str, float], Schedule], *,
              seed: int = 0, mask: bool = False) -> PruneResult:  # fmt: skip
    """Prune ``lm`` (in place) as ``run`` says: magnitude compared per tensor (its usual baseline), WANDA per row,
    structured units scored by their defaults (Taylor for states, FLAP for heads and head channels); ``mask``
    zeroes structured units instead of shrinking (equal shapes, as the explainer's patching needs)."""
    entry = METHODS[run.method]
    options: dict = {}
    if run.method == "magnitude":
        options["compare"] = "tensor"
    if run.structure is not None:
        options["structure"] = run.structure
    if mask and "mode" in entry.options.model_fields:
        options["mode"] = "mask"
    target = {"schedule": schedule(run.allocator, run.sparsity)} if run.allocator else (
        {} if run.structure else {"sparsity": run.sparsity})
    windows = calib if entry.needs_calibration(entry.validate(options)) else None
    return prune(lm, run.method, windows=windows, seed=seed, show_progress=False, **target, **options)


def grid_row(inputs: Inputs, model: str, run: GridRun, test: Windows, calib: Windows,
             schedule: Callable[[str, float], Schedule], *, seed: int = 0, dtype: str = "float32",
             timings: dict[str, float] | None = None, tasks: Sequence[str] = (), task_items: int = 200) -> dict:
    """Prune a fresh copy of ``model`` as ``run`` says and measure its test perplexity, and its accuracy on each
    objective of ``tasks`` (a column each, :func:`~sensitivity.eval.objective_column`): one grid row.

    The row holds only what the run computed (equal on every run with the same seed); its wall times, ``prune_s``
    and ``eval_s`` (seconds), go into ``timings`` when given (jobs keep them in their manifest).
    """
    start = time.perf_counter()
    if run.method == DENSE:
        lm = inputs.model(model, dtype)
        counts = {"params": lm.n_params, "nonzero": lm.n_params}
    else:
        lm = inputs.fresh(model, dtype)
        counts = prune_run(lm, run, calib, schedule, seed=seed).manifest["params_after"]
    prune_s = time.perf_counter() - start
    ppl = perplexity(lm, test, show_progress=False)
    scores = objective_scores(lm, lm.tokenizer, tasks, items=task_items, seed=seed) if tasks else {}
    if timings is not None:
        timings.update(prune_s=round(prune_s, 3), eval_s=round(time.perf_counter() - start - prune_s, 3))
    logger.info("grid %s %.2f: ppl %.3f", run.label, run.sparsity, ppl.perplexity)
    return {**run.record(), "perplexity": ppl.perplexity, "nll": ppl.nll, "tokens": ppl.tokens,
            "params": counts["params"], "nonzero": counts["nonzero"], **scores}  # fmt: skip


@dataclass
class GridPayload:
    """What a grid's runs need besides the model: its test and calibration windows, the schedules of its runs on
    one (computed once, by the driver) and how to score."""

    model: str
    dtype: str
    test: Windows
    calib: Windows
    schedules: dict[tuple[str, float], Schedule]
    seed: int = 0
    tasks: tuple[str, ...] = ()
    task_items: int = 200


class GridJob:
    """The shard job of a grid (:func:`sensitivity.core.distributed.run_shards`): one :class:`GridRun` a shard,
    pruning a fresh copy of the model -> ``(row, timings)``."""

    def __init__(self, lm: LoadedModel, payload: GridPayload) -> None:
        self.p, self.inputs = payload, Inputs()
        self.inputs.add(payload.model, lm, payload.dtype)

    def run(self, run: GridRun) -> tuple[dict, dict[str, float]]:
        p, seconds = self.p, {}
        row = grid_row(self.inputs, p.model, run, p.test, p.calib, lambda a, b: p.schedules[(a, b)], seed=p.seed,
                       dtype=p.dtype, timings=seconds, tasks=p.tasks, task_items=p.task_items)  # fmt: skip
        return row, seconds


def run_grid_rows(lm: LoadedModel, runs: Sequence[GridRun], payload: GridPayload, execution: Execution,
                  schedule: Callable[[str, float], Schedule],
                  on_row: Callable[[GridRun, dict, dict[str, float]], None]) -> ShardStats:  # fmt: skip
    """Run ``runs`` of a grid on ``lm`` (here, or on Ray workers as ``execution`` says), calling ``on_row(run, row,
    timings)`` as each finishes. The schedules the runs need are computed first, here, by ``schedule``."""
    for r in runs:
        if r.allocator and (r.allocator, r.sparsity) not in payload.schedules:
            payload.schedules[(r.allocator, r.sparsity)] = schedule(r.allocator, r.sparsity)
    return run_shards(lm, GridJob, payload, list(runs), execution, lambda r, result: on_row(r, *result))


def ratio(nll: float, dense_nll: float) -> float:
    """``exp(nll - dense_nll)``, infinite when it overflows."""
    try:
        return math.exp(nll - dense_nll)
    except OverflowError:
        return float("inf")

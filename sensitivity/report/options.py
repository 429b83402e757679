"""What a report depends on (:class:`ReportOptions`, :class:`ReportSpec`), importable without torch (the command
line validates report and grid specs with them); :mod:`sensitivity.report.pipeline` builds the report."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, model_validator

from ..core.execution import Execution
from ..core.jobs import JobSpec
from ..core.methods import Methods
from ..core.names import DEFAULT_MODEL, DEVICES
from ..core.objective import Tasks
from ..core.spec import Count, Counts, Names, OpenFraction, Seed, Seqlen, Sparsities, SpecError, Text
from ..data.corpus import DEFAULT_CORPUS
from ..data.objective import check_recall_size, parse_task
from ..explain import Thresholds
from ..probes import KINDS

__all__ = ["GRIDS", "EvalWindows", "ExactProbes", "ReportOptions", "ReportSpec"]

GRIDS = ("reduced", "full")
"""The pruning grids a report can run (its ``grid`` option): ``full`` adds the OWL and depth schedules."""

def _all_or_count(value):
    return None if value == "all" else value


def _known_kinds(kinds):
    for kind in kinds:
        KINDS[kind]
    return kinds


def _exact_probes(value: str) -> str:
    head, _, k = str(value).partition(":")
    if value in ("all", "none") or (head == "top" and k.isdigit() and int(k) >= 1):
        return value
    raise ValueError(f"{value!r} is not one of all, none, top:K (K a positive whole number)")


ExactProbes = Annotated[str, AfterValidator(_exact_probes)]
"""Which probes a report measures exactly: all, none, or top:K."""
EvalWindows = Annotated[Count | None, BeforeValidator(_all_or_count)]
"""Consecutive test windows for perplexity: a count, or null / 'all' for the whole split."""


class ReportOptions(Execution, Thresholds):
    """Everything a report depends on; stored in ``manifest.json`` and checked when a run resumes."""

    model: Text = DEFAULT_MODEL
    """Zoo model, checkpoint directory or hub id."""
    data: Text = DEFAULT_CORPUS
    """Corpus (see sensitivity.load_corpus)."""
    device: Literal[DEVICES] = "cpu"  # type: ignore[valid-type]
    """Where the model runs: cpu, cuda, or auto (CUDA when there is a GPU)."""
    allow_nonfinite: bool = False
    """Load a model whose weights hold NaN or infinity (refused by default, naming the tensors)."""
    seed: Seed = 0
    """Seed of every window draw and subsample."""
    seqlen: Seqlen = 256
    """Tokens per probe, calibration and explain window."""
    probe_windows: Count = 8
    """Validation windows the probes measure damage on."""
    probe_kinds: Annotated[Names, AfterValidator(_known_kinds)] = ("zero", "wanda", "magnitude")
    """Ablation kinds probed."""
    probe_sparsities: Sparsities = (0.25, 0.5, 0.75, 0.9)
    """Sparsities of the magnitude/WANDA probes (the sensitivity allocator's curves)."""
    exact: ExactProbes = "top:32"
    """Which probes are measured exactly: all; none (estimates of every probe by the fisher estimator, from K+1
    backward passes, zero/mean/resample read at the layer output); top:K (estimate every probe, then measure
    exactly the K with the largest estimated damage and every probe of the kind the sensitivity schedule reads,
    WANDA). Estimated rows are marked in data/probes.csv and counted in the report."""
    attribution_windows: Count = 8
    """Calibration windows for attribution."""
    calib_windows: Count = 32
    """Train windows for WANDA statistics and structured scores."""
    eval_windows: EvalWindows = 48
    """Test windows of eval_seqlen tokens (consecutive) for perplexity; 'all' (null) for the whole split."""
    eval_seqlen: Seqlen = 512
    """Tokens per evaluation window."""
    budget: OpenFraction = 0.5
    """Global sparsity of the derived schedule (schedule.yaml)."""
    sparsities: Sparsities = (0.25, 0.5, 0.75)
    """Sparsities of the weight-pruning grid."""
    structured_sparsities: Sparsities = (0.25, 0.5)
    """Sparsities of the structured (state, head, head-dim) grid."""
    grid: Literal[GRIDS] = "reduced"  # type: ignore[valid-type]
    """reduced: magnitude, WANDA, WANDA + sensitivity schedule, 2:4, structured; full: adds WANDA + OWL and WANDA
    + depth schedules."""
    explain_sparsity: OpenFraction = 0.5
    """Sparsity at which every method is explained."""
    explain_windows: Count = 4
    """Validation windows the explainer runs on."""
    tasks: Tasks = ()
    """Objectives besides perplexity (cloze, choice, recall, recall:P): an accuracy column each in the grid, an
    explainer verdict each at explain_sparsity, and a report section each; recall adds accuracy against pairs, and
    any task adds per-position NLL on long windows (dense and every explained run)."""
    task_items: Count = 200
    """Items per objective in the grid (the first K of a built-in task; K recall items)."""
    explain_items: Count = 32
    """Items per objective the explainer runs on."""
    recall_pairs: Counts = (4, 8, 16, 32, 64)
    """Numbers of pairs of the recall-against-pairs curves (64 items each)."""
    long_seqlen: Seqlen = 4096
    """Tokens per window of the per-position NLL curves (test split)."""
    long_windows: Count = 4
    """Windows of the per-position NLL curves."""


    @model_validator(mode="after")
    def _bounded(self) -> ReportOptions:
        for task in self.tasks:
            kind, pairs = parse_task(task)
            for field, items in (("task_items", self.task_items), ("explain_items", self.explain_items)):
                if kind == "recall":
                    try:
                        check_recall_size(pairs, items)
                    except ValueError as e:
                        raise SpecError(str(e), field) from None
        if any(parse_task(t)[0] == "recall" for t in self.tasks):
            try:
                check_recall_size(max(self.recall_pairs), 64)
            except ValueError as e:
                raise SpecError(str(e), "recall_pairs") from None
        return self


class ReportSpec(ReportOptions, JobSpec):
    """The ``report`` job.

    Attributes:
        name_tables: The ``probe_kinds`` field names entries of :data:`~sensitivity.probes.KINDS`.
        job: ``"report"``.
    """

    name_tables: ClassVar[dict[str, Methods]] = {"probe_kinds": KINDS}

    job: Literal["report"] = "report"
    out: Text
    """Report directory (rerunning into it resumes)."""

"""What a probe sweep measures (:class:`ProbeOptions`) and the ablation kinds' table, importable without torch (the
command line validates probe specs with them); :mod:`sensitivity.probes.ablations` implements the kinds and
:mod:`sensitivity.probes.sweep` runs them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, field_validator, model_validator

from ..core.execution import Execution
from ..core.methods import Methods
from ..core.objective import TaskOptions
from ..core.spec import Count, Ints, Names, Seed, Seqlen, Sparsities, SpecError

__all__ = ["COLUMNS", "KINDS", "METRICS", "SWEEPS", "ProbeOptions"]

KINDS = Methods("ablation kind")
"""Every ablation kind: ``zero``, ``mean``, ``resample``, ``bypass``, ``magnitude``, ``wanda``, ``remove``, plus any
registered from user code. A kind is a context manager ``fn(model, registry, probe, ctx)`` applying the ablation;
its ``info`` says where it ``applies(registry, component)``, which calibration hook ``points(registry, probe)`` it
reads, whether it is a ``sparsify`` kind (one probe per sparsity) and whether it ``resample``s another window."""
_IMPL = "sensitivity.probes.ablations"
KINDS.declare("zero", _IMPL, description="activation or weights -> 0")
KINDS.declare("mean", _IMPL, description="activation -> its calibration mean per channel")
KINDS.declare("resample", _IMPL, description="activation -> the same activation on another window", resample=True)
KINDS.declare("bypass", _IMPL, description="the component made input-independent or skipped")
KINDS.declare("magnitude", _IMPL, description="the component's weights pruned to sparsity s by |W|", sparsify=True)
KINDS.declare("wanda", _IMPL, description="the component's weights pruned to sparsity s by |W_ij| * ||X_j||_2",
              sparsify=True)  # fmt: skip
KINDS.declare("remove", _IMPL, description="a whole unit removed (mixer, head h, state n, attention, attention head h, "
              "MLP, MoE, expert e, block)")  # fmt: skip

METRICS = ("delta_nll", "ppl_ratio", "kl")
"""What each probe measures: ``delta_nll`` (mean next-token NLL ablated minus dense, nats/token), ``ppl_ratio``
(``exp(delta_nll)``) and ``kl`` (mean per-token ``KL(dense || ablated)``, nats; estimated by the fisher estimator
only)."""
SWEEPS = ("cached", "batched", "naive")
"""How a sweep runs the probes (:attr:`ProbeOptions.sweep`); all give the same numbers."""
COLUMNS = ("layer", "component", "index", "kind", "sparsity", "metric", "value", "seed", "estimated", "estimator")
"""Columns of ``probes.csv``, one row per probe and metric of :data:`METRICS`; ``estimator`` is ``exact`` for a
measured probe, else the estimator (``fisher K=2``, ``empirical``, ``linear``, ``local``)."""


def _distinct(values):
    if values is not None and len(set(values)) < len(values):
        dup = next(v for i, v in enumerate(values) if v in values[:i])
        raise ValueError(f"lists {dup!r} twice")
    return values


class ProbeOptions(Execution, TaskOptions):
    """What a probe sweep measures, and on which windows (a task objective replaces the held-out text windows)."""

    components: Annotated[Names | None, AfterValidator(_distinct)] = None
    """Components and units (mixer, head, state) to probe; default: every component, mixer and (Mamba-2) head;
    state (one probe per state index) is opt-in."""
    kinds: Annotated[Names | None, AfterValidator(_distinct)] = None
    """Ablation kinds (zero, mean, resample, bypass, magnitude, wanda, remove; default: every one); each applies
    where the ablation table defines it."""
    sparsities: Annotated[Sparsities, AfterValidator(_distinct)] = (0.25, 0.5, 0.75)
    """Sparsities of the magnitude and wanda kinds, each in (0, 1)."""
    layers: Annotated[Ints | None, AfterValidator(_distinct)] = None
    """Layers to probe (default: all)."""
    windows: Count = 8
    """Held-out windows the damage is measured on (random offsets of split, seeded)."""
    calib_windows: Count = 8
    """Calibration windows (of calib_split) for the means and WANDA's input norms."""
    seqlen: Seqlen = 256
    """Tokens per window."""
    split: str | None = None
    """Split of the held-out windows (default: validation when the corpus has one, else its held-out split)."""
    calib_split: str = "train"
    """Split of the calibration windows."""
    seed: Seed = 0
    """Seed of both window draws; recorded in every row."""
    batch_size: Count = 8
    """Windows per forward."""
    sweep: Literal["cached", "batched", "naive"] = "cached"
    """cached: reuse the residual stream entering the probed layer; batched: that, plus the rest of the model run
    once for several probes of a layer stacked along the batch axis; naive: a full forward per probe."""
    stack: Count = 4
    """With sweep=batched: probes of one layer per stacked forward."""
    estimate: bool = False
    """Estimate every probe from gradients (K+1 backward passes in all) instead of measuring its damage; rows are
    marked ``estimated`` and name their ``estimator``."""
    estimator: Literal["fisher", "empirical", "linear", "local"] = "fisher"
    """With estimate: fisher (second order: the Fisher quadratic of the KL from K label sequences drawn from the
    dense model, plus the first-order term; fills kl), empirical (the squared first-order term per window on the
    real labels), linear (attribution patching: first order) or local (first order, the ablated layer run exactly,
    the rest linearised)."""
    samples: Count = 2
    """With estimator=fisher: label sequences drawn from the dense model per window (K)."""
    layer_kinds: Annotated[Names | None, AfterValidator(_distinct)] = None
    """With estimate: kinds whose probes are read at their layer's output (the ablated layer run exactly, one block
    forward per probe) instead of at their hook points; default none."""
    streamed: bool = False
    """Read the model (a local safetensors checkpoint) one block at a time, for checkpoints larger than memory:
    the cached sweep's numbers, the residual streams kept in memory-mapped files on disk (exact sweep, in process)."""

    @model_validator(mode="after")
    def _streamable(self) -> ProbeOptions:
        if self.streamed and (self.sweep != "cached" or self.backend != "local"):
            asked = f"sweep={self.sweep}" if self.sweep != "cached" else f"backend={self.backend}"
            raise SpecError(f"a streamed sweep is cached and in process; {asked} is not", "streamed")
        default = type(self).model_fields
        if not self.estimate and self.estimator != default["estimator"].default:
            raise SpecError(f"{self.estimator!r} chooses how estimate estimates; it needs estimate (without it every "
                            "probe is measured exactly)", "estimator")  # fmt: skip
        if self.samples != default["samples"].default and not (self.estimate and self.estimator == "fisher"):
            raise SpecError(f"{self.samples} label samples are drawn by the fisher estimator only; it needs estimate "
                            f"and estimator=fisher (here {self.estimator if self.estimate else 'no estimate'})",
                            "samples")  # fmt: skip
        if self.layer_kinds and not self.estimate:
            raise SpecError("layer_kinds chooses how estimate reads probes; it needs estimate", "layer_kinds")
        return self

    @field_validator("kinds", "layer_kinds")
    @classmethod
    def _known(cls, kinds):
        for kind in kinds or ():
            KINDS[kind]  # SpecError naming the allowed kinds
        return kinds

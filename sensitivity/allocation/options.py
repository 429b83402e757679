"""The allocation options and the allocators' table, importable without torch (the command line validates schedule
specs with them); the allocators are implemented in :mod:`sensitivity.allocation.allocate`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from ..core.methods import Methods
from ..core.names import DEFAULT_EXCLUDE
from ..core.spec import Count, Exclude, Fraction, Names, Number, Seed, Spec, SpecError

__all__ = ["METHODS", "RECIPE_HEADER", "SCHEDULE_HEADER", "AllocateOptions", "DepthOptions", "OwlOptions",
           "SensitivityOptions", "UnitOptions",
           "needs_probes"]

METHODS = Methods("allocation method")
"""Allocators of :func:`allocate`: ``uniform``, ``depth``, ``owl``, ``sensitivity``, plus any registered from user
code. An allocator is called as ``fn(ctx: AllocationContext, options) -> (sparsities (E,), meta)``."""

SCHEDULE_HEADER = "# sparsity schedule: "
"""How a schedule YAML this toolkit wrote begins (``overwrite`` replaces only such a file)."""
RECIPE_HEADER = "# llm-compressor recipe from a sensitivity schedule "
"""How a recipe this toolkit wrote begins."""


class AllocateOptions(Spec):
    """What every allocation takes besides its method's options."""

    budget: Fraction
    """Overall fraction of the scheduled weights to prune (parameter-weighted)."""
    components: Names | None = None
    """Components to schedule (default: every prunable one not excluded)."""
    exclude: Exclude = DEFAULT_EXCLUDE
    """Components kept dense ('none': keep none dense)."""
    min_sparsity: Fraction = 0.0
    """Lowest sparsity of any entry."""
    max_sparsity: Fraction = 0.95
    """Highest sparsity of any entry."""
    seed: Seed = 0
    """Seeds torch's RNG inside the call (recorded in the schedule's meta)."""
    batch_size: Count = 8
    """Windows per forward for calibration statistics."""

    @model_validator(mode="after")
    def _bounds(self) -> AllocateOptions:
        if self.min_sparsity > self.max_sparsity:
            raise SpecError(f"{self.min_sparsity:g} is above max_sparsity {self.max_sparsity:g}", "min_sparsity")
        if not self.min_sparsity <= self.budget <= self.max_sparsity:
            raise SpecError(f"{self.budget:g} is outside [min_sparsity, max_sparsity] = [{self.min_sparsity:g}, "
                            f"{self.max_sparsity:g}]", "budget")  # fmt: skip
        return self


class DepthOptions(Spec):
    """Options of the ``depth`` allocator."""

    depth_spread: Number = 0.1
    """Depth ramp: budget - spread at layer 0 to budget + spread at the last layer (negative: the other way)."""


class OwlOptions(Spec):
    """Options of the ``owl`` allocator."""

    owl_m: Annotated[Number, Field(gt=0)] = 5.0
    """OWL's outlier threshold M: a WANDA score above M times the mean is an outlier."""
    owl_lambda: Annotated[Number, Field(ge=0)] = 0.08
    """OWL's lambda: half the spread of the layer sparsities."""


class SensitivityOptions(Spec):
    """Options of the ``sensitivity`` allocator."""

    source: Literal["probes", "fisher"] = "probes"
    """Loss curves from measured probes (sensitivity probe's wanda/magnitude kinds) or from Fisher (OBD)."""
    probe_method: Literal["wanda", "magnitude"] = "wanda"
    """Which sparsify probes give the curves."""
    metric: Literal["delta_nll", "kl"] = "delta_nll"
    """Probe metric used as the loss increase (0 for the dense model)."""


def _offsets(value):
    """``"attention=-0.25,mlp=0.1"`` (the command line's form) -> ``{"attention": "-0.25", "mlp": "0.1"}``."""
    if not isinstance(value, str):
        return value
    pairs = [p.partition("=") for p in value.split(",") if p.strip()]
    if any(not eq for _, eq, _ in pairs):
        raise ValueError(f"{value!r} is invalid; allowed: KIND=OFFSET pairs, e.g. attention=-0.25,mlp=0.1")
    return {k.strip(): v.strip() for k, _, v in pairs}


class UnitOptions(Spec):
    unit_offset: Annotated[dict[Literal["ssm", "attention", "mlp"], Number], BeforeValidator(_offsets)] = {}
    """Sparsity offset of each unit kind's weights (ssm, attention, mlp) before the shift that meets the budget, e.g.
    attention=-0.25,mlp=0.1 keeps attention 0.35 denser than the MLPs; kinds not named get 0."""


_IMPL = "sensitivity.allocation.allocate"
METHODS.declare("uniform", _IMPL, description="the budget everywhere")
METHODS.declare("depth", _IMPL, options=DepthOptions, description="a linear ramp over layers, budget -/+ spread")
METHODS.declare("owl", _IMPL, options=OwlOptions, calibration=True,
                description="outlier-weighted layerwise sparsity (Yin et al., 2023)")  # fmt: skip
METHODS.declare("sensitivity", _IMPL, options=SensitivityOptions, calibration=lambda o: o.source == "fisher",
                probes=lambda o: o.source == "probes",
                description="minimise the predicted loss (probe or Fisher curves) under the budget")  # fmt: skip
METHODS.declare("unit", _IMPL, options=UnitOptions, description="the budget plus an offset per unit kind (SSM, "
                "attention, MLP), shifted to meet the budget: a type-aware schedule for hybrids")  # fmt: skip


def needs_probes(method: str, options: Spec) -> bool:
    """Whether ``method`` with ``options`` reads a probes table."""
    rule = METHODS[method].info.get("probes", False)
    return bool(rule(options) if callable(rule) else rule)

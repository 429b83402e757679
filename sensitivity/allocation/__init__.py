"""Sparsity allocation: how much of each (layer, component) weight matrix to prune under a global budget.

:class:`Schedule` is the validated, YAML-round-tripping result (also exported as an llm-compressor recipe);
:func:`allocate` makes one by a method of :data:`METHODS` (``uniform``, ``owl``, ``depth``, ``sensitivity``); the
pure functions behind them (:func:`fit_budget`, :func:`owl_sparsity`, :func:`depth_ramp`, :func:`greedy_allocate`,
:func:`lower_convex_hull`) work on plain numbers.

Example:
    >>> lm = load_model("tiny:mamba2")
    >>> schedule = allocate(lm, "depth", 0.5, depth_spread=0.2)
    >>> [round(s, 6) for s in schedule.per_layer()]
    [0.3, 0.7]
    >>> schedule.to_yaml("schedule.yaml")
"""

from .allocate import (
    FISHER_GRID,
    METHODS,
    AllocateOptions,
    Allocation,
    AllocationContext,
    DepthOptions,
    OwlOptions,
    SensitivityOptions,
    allocate,
    depth_ramp,
    fit_budget,
    greedy_allocate,
    lower_convex_hull,
    needs_probes,
    owl_sparsity,
)
from .schedule import RECIPE_MODIFIERS, Schedule, uniform_schedule

__all__ = [
    "FISHER_GRID", "METHODS", "RECIPE_MODIFIERS", "AllocateOptions", "Allocation", "AllocationContext",
    "DepthOptions", "OwlOptions", "Schedule", "SensitivityOptions", "allocate", "depth_ramp", "fit_budget",
    "greedy_allocate", "lower_convex_hull", "needs_probes", "owl_sparsity", "uniform_schedule",
]

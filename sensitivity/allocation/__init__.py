"""Sparsity allocation: how much of each (layer, component) weight matrix to prune under a global budget.

:class:`Schedule` is the validated, YAML-round-tripping result (also exported as an llm-compressor recipe);
:func:`allocate` makes one by a method of :data:`METHODS` (``uniform``, ``owl``, ``depth``, ``sensitivity``); the
pure functions behind them (:func:`fit_budget`, :func:`owl_sparsity`, :func:`depth_ramp`, :func:`greedy_allocate`,
:func:`lower_convex_hull`) work on plain numbers.

Examples:
    >>> lm = load_model("tiny:mamba2")
    >>> schedule = allocate(lm, "depth", 0.5, depth_spread=0.2)
    >>> [round(s, 6) for s in schedule.per_layer()]
    [0.3, 0.7]
    >>> schedule.to_yaml("schedule.yaml")
"""

from .._lazy import exports

__all__ = [
    "FISHER_GRID", "METHODS", "RECIPE_MODIFIERS", "AllocateOptions", "Allocation", "AllocationContext",
    "DepthOptions", "OwlOptions", "Schedule", "SensitivityOptions", "allocate", "depth_ramp", "fit_budget",
    "greedy_allocate", "lower_convex_hull", "needs_probes", "owl_sparsity", "uniform_schedule",
]

_EXPORTS = {
    "FISHER_GRID": ".allocate",
    "METHODS": ".options",
    "AllocateOptions": ".options",
    "Allocation": ".allocate",
    "AllocationContext": ".allocate",
    "DepthOptions": ".options",
    "OwlOptions": ".options",
    "SensitivityOptions": ".options",
    "allocate": ".allocate",
    "depth_ramp": ".allocate",
    "fit_budget": ".allocate",
    "greedy_allocate": ".allocate",
    "lower_convex_hull": ".allocate",
    "needs_probes": ".options",
    "owl_sparsity": ".allocate",
    "RECIPE_MODIFIERS": ".schedule",
    "Schedule": ".schedule",
    "uniform_schedule": ".schedule",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)

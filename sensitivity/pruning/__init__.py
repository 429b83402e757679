"""Pruners: magnitude and WANDA (unstructured and N:M, uniform or scheduled), the SSM-structured state, head and
head-dim pruners, and greedy block (or unit) removal; the measured sparsity of a model; saving a pruned checkpoint
with its manifest.

Every method is an entry of :data:`METHODS` (name, options, whether it needs calibration windows, the
architectures it applies to); register your own with ``METHODS.register``.
"""

from .._lazy import exports

__all__ = [
    "MANIFEST", "METHODS", "UNITS", "BlockOptions", "BlocksResult", "HeadOptions", "PruneRequest", "PruneResult",
    "StateOptions", "StructuredOptions", "StructuredResult", "UnstructuredOptions", "WandaOptions", "applicable_units",
    "check_target", "nm_mask", "parse_structure", "prune", "prune_blocks", "prune_structured", "prune_unstructured",
    "save_pruned", "sparsity_report", "unstructured_mask",
]  # fmt: skip

_EXPORTS = {
    "nm_mask": "..core.masks",
    "parse_structure": "..core.masks",
    "unstructured_mask": "..core.masks",
    "PruneResult": ".api",
    "prune": ".api",
    "sparsity_report": ".api",
    "BlocksResult": ".blocks",
    "prune_blocks": ".blocks",
    "METHODS": ".methods",
    "BlockOptions": ".methods",
    "HeadOptions": ".methods",
    "PruneRequest": ".methods",
    "StateOptions": ".methods",
    "StructuredOptions": ".methods",
    "UnstructuredOptions": ".methods",
    "WandaOptions": ".methods",
    "check_target": ".methods",
    "MANIFEST": ".methods",
    "save_pruned": ".save",
    "UNITS": ".structured",
    "StructuredResult": ".structured",
    "applicable_units": ".structured",
    "prune_structured": ".structured",
    "prune_unstructured": ".unstructured",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)

"""Pruners: magnitude and WANDA (unstructured and N:M, uniform or scheduled), the SSM-structured state, head and
head-dim pruners, and greedy block (or unit) removal; the measured sparsity of a model; saving a pruned checkpoint
with its manifest.

Every method is an entry of :data:`METHODS` (name, options, whether it needs calibration windows, the
architectures it applies to); register your own with ``METHODS.register``.
"""

from ..core.masks import nm_mask, parse_structure, unstructured_mask
from .api import PruneResult, prune, sparsity_report
from .blocks import BlocksResult, prune_blocks
from .methods import (
    METHODS,
    BlockOptions,
    HeadOptions,
    PruneRequest,
    StateOptions,
    StructuredOptions,
    UnstructuredOptions,
    WandaOptions,
    check_target,
)
from .save import MANIFEST, save_pruned
from .structured import UNITS, StructuredResult, applicable_units, prune_structured
from .unstructured import prune_unstructured

__all__ = [
    "MANIFEST", "METHODS", "UNITS", "BlockOptions", "BlocksResult", "HeadOptions", "PruneRequest", "PruneResult",
    "StateOptions", "StructuredOptions", "StructuredResult", "UnstructuredOptions", "WandaOptions", "applicable_units",
    "check_target", "nm_mask", "parse_structure", "prune", "prune_blocks", "prune_structured", "prune_unstructured",
    "save_pruned", "sparsity_report", "unstructured_mask",
]  # fmt: skip

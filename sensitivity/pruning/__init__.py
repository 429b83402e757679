"""Pruners: magnitude and WANDA (unstructured and N:M, uniform or scheduled) and the SSM-structured state, head and
head-dim pruners; the measured sparsity of a model; saving a pruned checkpoint with its manifest."""

from ..core.masks import nm_mask, parse_structure, unstructured_mask
from .api import METHODS, PruneResult, prune, sparsity_report
from .save import MANIFEST, save_pruned
from .structured import SCORES, UNITS, StructuredResult, prune_structured
from .unstructured import prune_unstructured

__all__ = [
    "MANIFEST", "METHODS", "SCORES", "UNITS", "PruneResult", "StructuredResult", "nm_mask", "parse_structure", "prune",
    "prune_structured", "prune_unstructured", "save_pruned", "sparsity_report", "unstructured_mask",
]

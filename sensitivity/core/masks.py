"""Keep-masks from scores (pure functions): unstructured per row or per tensor, and N:M.

A mask is a bool tensor shaped like the scores, True = keep. Lower scores are removed first; ties are broken by
position (a stable sort), so masks are deterministic.
"""

from __future__ import annotations

import torch

from .spec import COMPARE, Structure, parse_structure

__all__ = ["COMPARE", "Structure", "nm_mask", "parse_structure", "unstructured_mask"]

def unstructured_mask(scores: torch.Tensor, sparsity: float, *, per_row: bool = True) -> torch.Tensor:
    """Keep-mask removing the ``int(n * sparsity)`` lowest scores of each row (or of the whole tensor).

    WANDA compares weights within each output row (Sun et al., 2023, sec. 3); magnitude pruning traditionally
    compares across the layer. Rows are the first axis; the rest is flattened.

    Args:
        scores: (rows, ...) scores.
        sparsity: Fraction to remove, in [0, 1).
        per_row: Compare within each row rather than across the tensor.

    Returns:
        A bool tensor shaped like ``scores``; True = keep.

    Examples:
        >>> unstructured_mask(torch.tensor([[3.0, 1.0, 2.0, 0.5]]), 0.5)
        tensor([[ True, False,  True, False]])
    """
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)  # (rows, cols)
    k = int(flat.shape[1] * sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        drop = torch.sort(flat, dim=1, stable=True).indices[:, :k]  # (rows, k)
        keep.scatter_(1, drop, False)
    return keep.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive entries of each row kept.

    Groups run along the last axis of the flattened rows (a linear weight's input columns, a depthwise conv's kernel
    taps), as in WANDA's ``prune_n:prune_m`` loop and the 2:4 pattern sparse tensor cores accelerate.

    Args:
        scores: (rows, ...) scores whose flattened row length is a multiple of ``m``.
        n: Entries kept per group, 0 < n < m.
        m: Group size.

    Returns:
        A bool tensor shaped like ``scores``; True = keep.

    Examples:
        >>> nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4)
        tensor([[ True, False,  True, False]])
    """
    if not 0 < n < m:
        raise ValueError(f"n:m = {n}:{m} is invalid; allowed: 0 < n < m")
    flat = scores.reshape(scores.shape[0], -1)  # (rows, cols)
    if flat.shape[1] % m:
        raise ValueError(f"{n}:{m} sparsity needs rows whose length is a multiple of {m}; got {flat.shape[1]}")
    groups = flat.reshape(flat.shape[0], -1, m)  # (rows, cols/m, m)
    drop = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]  # (rows, cols/m, m-n)
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
    return keep.reshape(scores.shape)

"""Per-weight saliency scores and their layerwise summaries (pure functions of tensors).

The stateful parts (activation statistics, per-window gradients) live in :mod:`.stats` and :mod:`.gradients`;
everything here is a one-line formula tested on hand-made tensors.

Conventions: a linear weight ``W`` is (out, in) and its input norm ``||X_j||`` has one entry per column; a depthwise
conv weight is (C, 1, K) and its input norm has one entry per channel ``c`` (the score of ``w[c, 0, k]`` uses
``||X_c||``). ``||X_j||`` is WANDA's ``sqrt(scaler_row)``: the l2 norm of channel ``j`` over every calibration token,
divided by the square root of the number of windows (:func:`input_norm`).
"""

from __future__ import annotations

import torch

__all__ = [
    "fisher_score",
    "gblm_score",
    "input_norm",
    "max_over_median",
    "owl_outlier_ratio",
    "taylor_score",
    "wanda_score",
]


def input_norm(sumsq: torch.Tensor, n_windows: int) -> torch.Tensor:
    """WANDA's input norm ``||X_j|| = sqrt(sum over tokens of x_j**2 / n_windows)``, per channel.

    WANDA's ``WrappedGPT.scaler_row`` (Sun et al., 2023) averages the per-sequence squared norms over the calibration
    sequences; GBLM-Pruner adds its gradient term to ``|W| * sqrt(scaler_row)``, so the scale matters there.

    Args:
        sumsq: Sum of squares per channel over all (window, position) pairs, any shape C.
        n_windows: Number of calibration windows, >= 1.

    Returns:
        Float32 tensor of shape C.
    """
    if n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    return (sumsq.float() / n_windows).sqrt()


def _broadcast_channels(weight: torch.Tensor, per_channel: torch.Tensor) -> torch.Tensor:
    """Reshape a per-input-channel vector so it broadcasts against ``weight`` (linear: columns; conv: rows)."""
    if weight.dim() == 2:
        if per_channel.shape != (weight.shape[1],):
            raise ValueError(f"input norm {tuple(per_channel.shape)} does not fit the columns of {tuple(weight.shape)}")
        return per_channel[None, :]  # (1, in)
    if weight.dim() == 3 and weight.shape[1] == 1:
        if per_channel.shape != (weight.shape[0],):
            raise ValueError(f"input norm {tuple(per_channel.shape)} does not fit the rows of {tuple(weight.shape)}")
        return per_channel[:, None, None]  # (C, 1, 1)
    raise ValueError(f"expected a linear (out, in) or depthwise conv (C, 1, K) weight, got {tuple(weight.shape)}")


def wanda_score(weight: torch.Tensor, input_l2: torch.Tensor) -> torch.Tensor:
    """WANDA score ``|W_ij| * ||X_j||`` (Sun et al., 2023, eq. 1).

    Args:
        weight: Linear weight (out, in), or depthwise conv weight (C, 1, K).
        input_l2: Input norm per input channel: (in,) for linear, (C,) for conv.

    Returns:
        Float32 scores shaped like ``weight``.

    Examples:
        >>> wanda_score(torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 0.5]))
        tensor([[3., 1.]])
    """
    return weight.detach().float().abs() * _broadcast_channels(weight, input_l2.float())


def owl_outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """OWL's layerwise outlier ratio: the fraction of scores greater than ``m`` times their mean.

    Yin et al., 2023, "Outlier Weighed Layerwise Sparsity (OWL)", eq. 3 ("LOD"), applied to WANDA scores.

    Args:
        scores: Non-negative scores of any shape (e.g. concatenated WANDA scores of one component).
        m: Outlier threshold multiplier (OWL's M; 5 in the paper's main results).

    Returns:
        A float in [0, 1].

    Examples:
        >>> owl_outlier_ratio(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0]), m=5)
        0.1
    """
    flat = scores.detach().float().flatten()  # (n,)
    if flat.numel() == 0:
        raise ValueError("owl_outlier_ratio of an empty tensor")
    return (flat > m * flat.mean()).float().mean().item()


def max_over_median(values: torch.Tensor) -> float:
    """``max / median`` of a vector (median interpolated between the two middle values for even counts)."""
    flat = values.detach().float().flatten()  # (n,)
    return (flat.max() / torch.quantile(flat, 0.5)).item()


def taylor_score(weight: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance ``|w * mean_k g_k|`` (Molchanov et al., 2019, eq. 3 with the gradient averaged
    over the calibration windows before multiplying). Float32, shaped like ``weight``."""
    return (weight.detach().float() * grad_mean.float()).abs()


def fisher_score(grad_sqsum: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher diagonal ``sum_k g_k**2`` over per-window gradients. Float32, shaped like the weight."""
    return grad_sqsum.float()


def gblm_score(weight: torch.Tensor, input_l2: torch.Tensor, grad_l2: torch.Tensor, alpha: float) -> torch.Tensor:
    """GBLM-Pruner score ``|W_ij| * ||X_j|| + alpha * |W_ij| * ||G_ij||`` (Das et al., 2023, eq. 4).

    Args:
        weight: Linear (out, in) or depthwise conv (C, 1, K) weight.
        input_l2: Input norm per input channel (see :func:`wanda_score`).
        grad_l2: ``sqrt(sum_k g_k**2)``, the l2 norm over calibration windows of the per-window gradients, shaped
            like ``weight``.
        alpha: Weight of the gradient term (the released code scales the gradients by 100).

    Returns:
        Float32 scores shaped like ``weight``.
    """
    if grad_l2.shape != weight.shape:
        raise ValueError(f"grad_l2 of shape {tuple(grad_l2.shape)} does not match weight {tuple(weight.shape)}")
    return wanda_score(weight, input_l2) + alpha * weight.detach().float().abs() * grad_l2.float()

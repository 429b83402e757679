"""Per-channel statistics of hook-point activations on calibration windows (the stateful collector).

What WANDA calls ``scaler_row`` is ``ChannelStats.sumsq`` of a weight's input hook point divided by the number of
calibration sequences: the score of weight ``W_ij`` is ``|W_ij| * sqrt(sumsq_j / n)`` (Sun et al., 2023, eq. 1;
the division does not change WANDA's ranking, but GBLM adds a gradient term to it: see ``scores.input_norm``).

Shape legend: B batch, L sequence length, C channels (everything after the first two axes, e.g. ED or (G, N)).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import Windows
from ..models.hooks import hooks
from ..models.loading import unwrap

__all__ = ["ChannelStats", "channel_stats"]


@dataclass
class ChannelStats:
    """Running float32 sums over the (B, L) positions of one activation, per channel.

    Attributes:
        count: Positions seen (tokens).
        sum: Sum per channel, shape C.
        sumsq: Sum of squares per channel, shape C (WANDA's ``||X_j||_2 ** 2``).
        absmax: Largest ``|x|`` per channel, shape C.
    """

    count: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    absmax: torch.Tensor | None = None

    def add_batch(self, act: torch.Tensor) -> None:
        """Accumulate one activation of shape (B, L, *C)."""
        if act.dim() < 3:
            raise ValueError(f"activation of shape {tuple(act.shape)} has no (B, L) axes to reduce over")
        a = act.detach().float()  # (B, L, *C)
        if self.sum is None:
            self.sum = torch.zeros(a.shape[2:], dtype=torch.float32, device=a.device)
            self.sumsq, self.absmax = torch.zeros_like(self.sum), torch.zeros_like(self.sum)
        self.count += a.shape[0] * a.shape[1]
        self.sum += a.sum((0, 1))  # (*C)
        self.sumsq += a.square().sum((0, 1))  # (*C)
        self.absmax = torch.maximum(self.absmax, a.abs().amax((0, 1)))  # (*C)

    @property
    def mean(self) -> torch.Tensor:
        """Mean per channel, shape C."""
        return self.sum / self.count

    @property
    def l2(self) -> torch.Tensor:
        """``||X_j||_2`` over all positions per channel, shape C (WANDA's input norm)."""
        return self.sumsq.sqrt()


@torch.no_grad()
def channel_stats(
    model, windows: Windows, points: Iterable[str], *, batch_size: int = 8, show_progress: bool = True
) -> dict[str, ChannelStats]:
    """Collect :class:`ChannelStats` at hook points (``"layers.{i}.{point}"``) over calibration windows.

    Args:
        model: A ``LoadedModel`` or instrumented HF model.
        windows: Calibration windows (n, L).
        points: Hook names, e.g. ``["layers.0.in", "layers.0.dt"]``.
        batch_size: Windows per forward.
        show_progress: Show a tqdm bar.

    Returns:
        Hook name -> statistics accumulated over every window.
    """
    stats = {name: ChannelStats() for name in points}
    module = unwrap(model)
    device = next(module.parameters()).device
    with hooks(model, {n: (lambda t, s=s: s.add_batch(t)) for n, s in stats.items()}):
        for start in tqdm(range(0, len(windows), batch_size), desc="stats", disable=not show_progress, unit="batch"):
            module(input_ids=windows.ids[start : start + batch_size].to(device), use_cache=False)
    return stats

"""The stateful collectors: per-channel statistics of hook-point activations, and per-window gradients.

What WANDA calls ``scaler_row`` is ``ChannelStats.sumsq`` of a weight's input hook point divided by the number of
calibration sequences: the score of weight ``W_ij`` is ``|W_ij| * sqrt(sumsq_j / n)`` (Sun et al., 2023, eq. 1;
the division does not change WANDA's ranking, but GBLM adds a gradient term to it: see ``scores.input_norm``).

One backward per calibration window gives the per-window gradients ``g_k`` that Taylor (mean of ``g_k``), the
empirical Fisher (``sum_k g_k**2``) and GBLM-Pruner (``sqrt(sum_k g_k**2)``) need (:func:`window_gradients`);
only their float32 running sum and sum of squares are kept.

Shape legend: B batch, L sequence length, V vocabulary, C channels (everything after the first two axes, e.g. ED
or (G, N)).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import Windows
from .finite import check_loss
from .hooks import hooks
from .loading import unwrap
from .names import OBJECTIVES

__all__ = ["OBJECTIVES", "ChannelStats", "GradStats", "channel_stats", "grad_state", "window_gradients",
           "window_objective"]


class _Sums:
    """``mean`` and ``l2`` from the running ``count``, ``sum`` and ``sumsq`` of a collector."""

    @property
    def mean(self) -> torch.Tensor:
        """``sum / count``: the mean per channel (activations) or Taylor's averaged gradient ``mean_k g_k``."""
        return self.sum / self.count

    @property
    def l2(self) -> torch.Tensor:
        """``sqrt(sumsq)``: WANDA's input norm ``||X_j||_2`` per channel, or GBLM's ``sqrt(sum_k g_k**2)``."""
        return self.sumsq.sqrt()


@dataclass
class ChannelStats(_Sums):
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



def window_objective(logits: torch.Tensor, ids: torch.Tensor, objective: str = "loss",
                     labels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The objective of each window, predicting every scored token from the ones before it.

    Args:
        logits: (B, L, V) next-token logits.
        ids: (B, L) token ids; position ``t + 1`` is the target of ``logits[:, t]``.
        objective: ``"loss"``: mean next-token cross-entropy over the scored positions (what the LM minimises);
            ``"logprob"``: sum of the scored tokens' log-probabilities (minus their count times the loss). A task's
            log-likelihood is the ``"logprob"`` of its answer tokens.
        labels: (B, L) targets in place of ``ids`` (HF convention), ``-100`` where not scored (a task's windows
            score only its answers); None scores every next token.

    Returns:
        Float32 tensor (B,).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    b, L, V = logits.shape
    targets = (ids if labels is None else labels)[:, 1:].to(logits.device)  # (B, L-1)
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), targets.reshape(-1), reduction="none",
                          ignore_index=-100).view(b, L - 1)  # (B, L-1), 0 where not scored  # fmt: skip
    if objective == "logprob":
        return -nll.sum(1)  # (B,)
    return nll.sum(1) / (targets != -100).sum(1).clamp(min=1)  # (B,)


@contextmanager
def grad_state(module: nn.Module, trainable: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Eval mode, gradients enabled, ``requires_grad`` only on ``trainable``, every ``.grad`` cleared.

    On exit (also on error) every parameter's ``requires_grad`` and ``.grad`` (the same tensor object) and every
    submodule's ``training`` flag are restored exactly.
    """
    params = list(module.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in module.modules()]
    keep = {id(p) for p in trainable}
    try:
        module.eval()
        for p in params:
            p.grad = None
            p.requires_grad_(id(p) in keep)
        with torch.enable_grad():
            yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
        for m, training in modes:
            m.training = training


@dataclass
class GradStats(_Sums):
    """Float32 running sums of the per-window gradients of one parameter.

    Attributes:
        count: Windows seen.
        sum: ``sum_k g_k``, shaped like the parameter.
        sumsq: ``sum_k g_k**2``, shaped like the parameter.
    """

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor

    def add(self, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        self.count += 1
        self.sum += g
        self.sumsq += g.square()


def window_gradients(
    model,
    windows: Windows,
    params: Mapping[Hashable, nn.Parameter],
    *,
    objective: str = "loss",
    show_progress: bool = True,
) -> dict[Hashable, GradStats]:
    """Accumulate per-window gradients of the objective with respect to ``params``, one backward per window.

    The model runs in eval mode through its (instrumented) forward with ``use_cache=False``; only ``params`` require
    grad meanwhile, and every parameter's ``requires_grad`` and ``.grad`` are restored afterwards.

    Args:
        model: A ``LoadedModel`` or HF causal LM.
        windows: Calibration windows (n, L).
        params: Key -> parameter of ``model``.
        objective: See :func:`window_objective`.
        show_progress: Show a tqdm bar over windows.

    Returns:
        Key -> :class:`GradStats` (a parameter the objective does not reach gets zero gradients).
    """
    module = unwrap(model)
    device = next(module.parameters()).device
    stats = {k: GradStats(0, torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32))
             for k, p in params.items()}  # fmt: skip
    with grad_state(module, params.values()):
        for k in tqdm(range(len(windows)), desc="gradients", disable=not show_progress, unit="window"):
            ids = windows.ids[k : k + 1].to(device)  # (1, L)
            labels = None if windows.labels is None else windows.labels[k : k + 1]  # (1, L)
            logits = module(input_ids=ids, use_cache=False).logits  # (1, L, V)
            loss = window_objective(logits, ids, objective, labels).sum()
            check_loss(module, loss.item(), ids, f"the {objective} objective of window {k}")
            loss.backward()
            for key, p in params.items():
                stats[key].add(p.grad if p.grad is not None else torch.zeros_like(p))
            for p in params.values():
                p.grad = None
    return stats

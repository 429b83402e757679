"""Magnitude and WANDA pruning of the mixers' weight matrices: unstructured or N:M, from a sparsity or a schedule.

WANDA (Sun et al., 2023) scores ``W_ij`` by ``|W_ij| * ||X_j||_2`` where ``X_j`` is input channel ``j`` of the
weight over the calibration tokens, and removes the lowest scores of each output row. The input of every weight is
read at its registry hook point (``Registry.input_hook``: ``in`` for ``in_proj``, ``u`` for ``x_proj``, ``dt_low``
for ``dt_proj``, ``out_proj_in`` for ``out_proj``, ``x``/``conv_in`` for ``conv1d``) through the instrumented
forward. Packed weights are pruned slice by slice (Mamba-2's ``in_proj`` rows ``[z | x | B | C | dt]``, Mamba-1's
``x_proj`` rows ``[dt | B | C]``), each at its own sparsity.

Calibration runs one-shot (statistics of every layer from one forward of the dense model) or sequentially (as in
WANDA's ``prune_wanda``: layer ``l`` is calibrated on the outputs of the already-pruned layers ``0..l-1``, then its
pruned output feeds layer ``l+1``).

Depthwise ``conv1d`` weights (C, 1, K) are compared across the whole tensor (a row holds only K taps); N:M groups
are runs of m consecutive taps of the flattened kernel (channel-major).

Shape legend: B batch, L sequence length, D model width, C channels of a weight's input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation import Schedule, uniform_schedule
from ..core.hooks import hook_name, hooks
from ..core.loading import LoadedModel, as_loaded
from ..core.masks import COMPARE, nm_mask, parse_structure, unstructured_mask
from ..core.registry import DEFAULT_EXCLUDE, Registry, TensorSlice
from ..core.runner import LayerRunner
from ..core.scores import input_norm, wanda_score
from ..core.stats import ChannelStats, channel_stats
from ..data import Windows

__all__ = ["METHODS", "prune_unstructured"]

logger = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda")


@dataclass(frozen=True)
class _Target:
    component: str
    slice: TensorSlice
    sparsity: float


def _targets(registry: Registry, schedule: Schedule) -> list[list[_Target]]:
    """Per layer, the weight slices to prune and their sparsity (entries at 0 are skipped)."""
    out: list[list[_Target]] = [[] for _ in range(registry.n_layers)]
    for (layer, comp), s in sorted(schedule.sparsity.items()):
        if s > 0:
            out[layer] += [_Target(comp, t, s) for t in registry.weights(comp)]
    return out


def _input_points(registry: Registry, targets: list[_Target]) -> list[str]:
    return sorted({registry.input_hook(t.slice.param) for t in targets})


def _mask(weight: torch.Tensor, scores: torch.Tensor, sparsity: float, nm, compare: str) -> torch.Tensor:
    if nm is not None:  # conv: groups of m consecutive taps of the flattened (C, 1, K) kernel, channel-major
        return nm_mask(scores if weight.dim() == 2 else scores.reshape(1, -1), *nm).reshape(scores.shape)
    return unstructured_mask(scores, sparsity, per_row=compare == "row" and weight.dim() == 2)


@torch.no_grad()
def _prune_layer(mixer: nn.Module, registry: Registry, targets: list[_Target], method: str, nm, compare: str,
                 stats: dict[str, ChannelStats] | None, n_windows: int) -> None:  # fmt: skip
    """Score, mask and zero the target slices of one mixer (``stats``: input hook point -> statistics)."""
    for target in targets:
        weight = target.slice.get(mixer)  # a view: writes go to the model
        if method == "magnitude":
            scores = weight.detach().float().abs()
        else:
            l2 = input_norm(stats[registry.input_hook(target.slice.param)].sumsq, n_windows).reshape(-1)  # (C,)
            cols = target.slice.cols
            scores = wanda_score(weight, l2 if cols is None else l2[cols[0] : cols[1]])
        weight.mul_(_mask(weight, scores, target.sparsity, nm, compare))


def _check(lm: LoadedModel, method, sparsity, schedule, structure, compare, windows, batch_size):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if compare not in COMPARE:
        raise ValueError(f"unknown compare {compare!r}; allowed: {', '.join(COMPARE)}")
    nm = parse_structure(structure)
    if schedule is not None:
        if sparsity is not None:
            raise ValueError("give either sparsity or schedule, not both")
        if nm is not None:
            raise ValueError(f"structure {structure!r} fixes the sparsity of every weight to {1 - nm[0] / nm[1]:g}; "
                             "it cannot be combined with a schedule")  # fmt: skip
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a sensitivity.allocation.Schedule, got {type(schedule).__name__}")
        schedule.validate(lm.registry, lm)
    elif nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(f"sparsity {sparsity!r} contradicts structure {structure!r} (which prunes {implied:g})")
    elif sparsity is None:
        raise ValueError("give a sparsity in [0, 1), a schedule, or an n:m structure")
    if method == "wanda" and (windows is None or len(windows) == 0):
        raise ValueError("wanda needs calibration windows (windows=...)")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} must be an integer >= 1")
    return nm


def prune_unstructured(
    model: LoadedModel | nn.Module,
    method: str,
    *,
    sparsity: float | None = None,
    schedule: Schedule | None = None,
    structure: str | None = None,
    compare: str = "row",
    windows: Windows | None = None,
    sequential: bool = False,
    components=None,
    exclude=DEFAULT_EXCLUDE,
    batch_size: int = 8,
    show_progress: bool = True,
) -> Schedule:
    """Prune the mixers' weight matrices in place by magnitude or WANDA.

    Args:
        model: A ``LoadedModel`` or instrumented HF causal LM; its weights are overwritten with zeros in place.
        method: ``"wanda"`` (``|W| * ||X||``, Sun et al., 2023) or ``"magnitude"`` (``|W|``).
        sparsity: Fraction of every targeted weight to remove, in [0, 1). Implied by ``structure`` when omitted.
        schedule: A per-(layer, component) :class:`~sensitivity.allocation.Schedule` instead of one sparsity.
        structure: ``None``/``"unstructured"`` or ``"n:m"`` (keep n of every m consecutive input weights per row,
            e.g. ``"2:4"``).
        compare: ``"row"`` (rank within each output row, WANDA's default) or ``"tensor"`` (across the slice).
        windows: Calibration windows (n, L); required by WANDA.
        sequential: Calibrate layer ``l`` on the outputs of the pruned layers before it (WANDA's procedure) rather
            than on the dense model in one forward.
        components: Components to prune with ``sparsity`` (default every prunable one not in ``exclude``).
        exclude: Components kept dense with ``sparsity`` (default ``conv1d``).
        batch_size: Windows per forward.
        show_progress: Show a tqdm bar.

    Returns:
        The schedule that was applied (a uniform one when ``sparsity`` was given).

    Raises:
        ValueError: Unknown method, compare or structure; sparsity and schedule both or neither; a schedule that
            does not fit the model; WANDA without windows.

    Example:
        >>> prune_unstructured(lm, "wanda", sparsity=0.5, windows=calib)
        >>> prune_unstructured(lm, "magnitude", structure="2:4")
    """
    lm = as_loaded(model, instrumented=method == "wanda")
    registry = lm.registry
    nm = _check(lm, method, sparsity, schedule, structure, compare, windows, batch_size)
    if schedule is None:
        s = sparsity if sparsity is not None else 1 - nm[0] / nm[1]
        schedule = uniform_schedule(lm, s, exclude=exclude, components=components)
    targets = _targets(registry, schedule)
    n_windows = len(windows) if windows is not None else 0
    if method == "magnitude":
        for layer, layer_targets in enumerate(targets):
            _prune_layer(registry.mixer(lm.model, layer), registry, layer_targets, method, nm, compare, None, 0)
    elif sequential:
        _sequential_wanda(lm, targets, windows, nm, compare, batch_size, show_progress)
    else:
        points = [hook_name(layer, p) for layer, t in enumerate(targets) for p in _input_points(registry, t)]
        stats = channel_stats(lm, windows, points, batch_size=batch_size, show_progress=show_progress)
        for layer, layer_targets in enumerate(targets):
            layer_stats = {p: stats[hook_name(layer, p)] for p in _input_points(registry, layer_targets)}
            _prune_layer(registry.mixer(lm.model, layer), registry, layer_targets, method, nm, compare, layer_stats,
                         n_windows)  # fmt: skip
    logger.info("%s pruned %s to %.4f overall (%s)", method, lm.name, schedule.overall(), structure or "unstructured")
    return schedule


@torch.no_grad()
def _sequential_wanda(lm: LoadedModel, targets, windows: Windows, nm, compare: str, batch_size: int,
                      show_progress: bool) -> None:  # fmt: skip
    """WANDA layer by layer: statistics of layer l from the pruned layers' outputs, then its own pruned output."""
    registry, run = lm.registry, LayerRunner(lm, windows, batch_size)
    hidden = [run.embed(b) for b in run.batches]  # (B, L, D) each
    for layer in tqdm(range(registry.n_layers), desc="wanda (sequential)", disable=not show_progress):
        points = _input_points(registry, targets[layer])
        if points:
            stats = {p: ChannelStats() for p in points}
            with hooks(lm, {hook_name(layer, p): stats[p].add_batch for p in points}):
                for h in hidden:
                    run.run(h, layer, layer + 1)
            _prune_layer(registry.mixer(lm.model, layer), registry, targets[layer], "wanda", nm, compare, stats,
                         len(windows))  # fmt: skip
        hidden = [run.run(h, layer, layer + 1) for h in hidden]

"""Magnitude and WANDA pruning of the weight matrices: unstructured or N:M, from a sparsity or a schedule.

WANDA (Sun et al., 2023) scores ``W_ij`` by ``|W_ij| * ||X_j||_2`` where ``X_j`` is input channel ``j`` of the
weight over the calibration tokens, and removes the lowest scores of each output row. The input of every weight is
read at its registry hook point (``Registry.input_hook``: ``in`` for ``in_proj``, ``u`` for ``x_proj``, ``dt_low``
for ``dt_proj``, ``out_proj_in`` for ``out_proj``, ``x``/``conv_in`` for ``conv1d``) through the instrumented
forward. Packed weights are pruned slice by slice (Mamba-2's ``in_proj`` rows ``[z | x | B | C | dt]``, Mamba-1's
``x_proj`` rows ``[dt | B | C]``), each at its own sparsity. On hybrids the attention (``q, k, v, o``: inputs at
``attn_in`` and ``o_in``) and MLP weights (``gate, up, down``: ``mlp_in``, ``down_in``) are pruned the same way; the
fused MoE expert weights are not (each expert sees only its routed tokens).

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
from ..core.masks import nm_mask, parse_structure, unstructured_mask
from ..core.registry import Registry, TensorSlice
from ..core.runner import LayerRunner
from ..core.scores import input_norm, wanda_score
from ..core.spec import SpecError
from ..core.stats import ChannelStats, channel_stats
from ..data import Windows
from .methods import METHODS, UnstructuredOptions, resolve

__all__ = ["prune_unstructured"]

logger = logging.getLogger(__name__)

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
def _prune_layer(model: nn.Module, registry: Registry, layer: int, targets: list[_Target], method: str, nm,
                 compare: str, stats: dict[str, ChannelStats] | None, n_windows: int) -> None:  # fmt: skip
    """Score, mask and zero the target slices of one layer (``stats``: input hook point -> statistics)."""
    for target in targets:
        weight = target.slice.get(registry.owner(model, layer, target.component))  # a view: writes go to the model
        if method == "magnitude":
            scores = weight.detach().float().abs()
        else:
            l2 = input_norm(stats[registry.input_hook(target.slice.param)].sumsq, n_windows).reshape(-1)  # (C,)
            cols = target.slice.cols
            scores = wanda_score(weight, l2 if cols is None else l2[cols[0] : cols[1]])
        weight.mul_(_mask(weight, scores, target.sparsity, nm, compare))


def prune_unstructured(
    model: LoadedModel | nn.Module,
    method: str,
    *,
    sparsity: float | None = None,
    schedule: Schedule | None = None,
    windows: Windows | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    **options,
) -> Schedule:
    """Prune the weight matrices in place by magnitude or WANDA (SSM mixers, and attention and MLPs on hybrids).

    Args:
        model: A ``LoadedModel`` or instrumented HF causal LM; its weights are overwritten with zeros in place.
        method: ``"wanda"`` (``|W| * ||X||``, Sun et al., 2023) or ``"magnitude"`` (``|W|``).
        sparsity: Fraction of every targeted weight to remove, in [0, 1). Implied by ``structure`` when omitted.
        schedule: A per-(layer, component) :class:`~sensitivity.allocation.Schedule` instead of one sparsity.
        windows: Calibration windows (n, L); required by WANDA.
        batch_size: Windows per forward.
        show_progress: Show a tqdm bar.
        **options: The method's options (:class:`WandaOptions`, :class:`UnstructuredOptions`): ``structure``
            (``"n:m"``: keep n of every m consecutive input weights per row, e.g. ``"2:4"``), ``compare``
            (``"row"``, WANDA's default, or ``"tensor"``), ``components``, ``exclude`` (default ``conv1d``) and,
            for WANDA, ``sequential`` (calibrate layer ``l`` on the outputs of the pruned layers before it).

    Returns:
        The schedule that was applied (a uniform one when ``sparsity`` was given).

    Raises:
        SpecError: An unknown method or option, or a request :func:`~sensitivity.pruning.methods.resolve` refuses.

    Examples:
        >>> prune_unstructured(lm, "wanda", sparsity=0.5, windows=calib)
        >>> prune_unstructured(lm, "magnitude", structure="2:4")
    """
    lm = as_loaded(model)
    entry, opts, request = resolve(lm, method, options, sparsity=sparsity, schedule=schedule, windows=windows,
                                   seed=0, batch_size=batch_size)  # fmt: skip
    if entry.fn not in (_magnitude, _wanda):
        raise SpecError(f"{method!r} is not a weight pruner; use sensitivity.prune", "method")
    return entry.fn(lm, opts, sparsity=request.sparsity, schedule=schedule, windows=windows, seed=0,
                    batch_size=request.batch_size, show_progress=show_progress)[0]  # fmt: skip


def _weights(lm: LoadedModel, method: str, options: UnstructuredOptions, sparsity, schedule, windows,
             batch_size: int, show_progress: bool) -> Schedule:  # fmt: skip
    registry, nm, compare = lm.registry, parse_structure(options.structure), options.compare
    if schedule is None:
        s = sparsity if sparsity is not None else 1 - nm[0] / nm[1]
        schedule = uniform_schedule(lm, s, exclude=options.exclude, components=options.components)
    else:
        schedule.validate(registry, lm)
    targets = _targets(registry, schedule)
    if method == "magnitude":
        for layer, layer_targets in enumerate(targets):
            _prune_layer(lm.model, registry, layer, layer_targets, method, nm, compare, None, 0)
    elif options.sequential:
        as_loaded(lm, instrumented=True)
        _sequential_wanda(lm, targets, windows, nm, compare, batch_size, show_progress)
    else:
        points = [hook_name(layer, p) for layer, t in enumerate(targets) for p in _input_points(registry, t)]
        stats = channel_stats(lm, windows, points, batch_size=batch_size, show_progress=show_progress)
        for layer, layer_targets in enumerate(targets):
            layer_stats = {p: stats[hook_name(layer, p)] for p in _input_points(registry, layer_targets)}
            _prune_layer(lm.model, registry, layer, layer_targets, method, nm, compare, layer_stats, len(windows))
    logger.info("%s pruned %s to %.4f overall (%s)", method, lm.name, schedule.overall(),
                options.structure or "unstructured")  # fmt: skip
    return schedule


@METHODS.implement("magnitude")
def _magnitude(lm, options, *, sparsity, schedule, windows, seed, batch_size, show_progress):
    return _weights(lm, "magnitude", options, sparsity, schedule, None, batch_size, show_progress), None


@METHODS.implement("wanda")
def _wanda(lm, options, *, sparsity, schedule, windows, seed, batch_size, show_progress):
    as_loaded(lm, instrumented=True)
    return _weights(lm, "wanda", options, sparsity, schedule, windows, batch_size, show_progress), None


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
                for h, b in zip(hidden, run.batches):
                    run.run(h, layer, layer + 1, rows=b)
            _prune_layer(lm.model, registry, layer, targets[layer], "wanda", nm, compare, stats, len(windows))
        hidden = [run.run(h, layer, layer + 1, rows=b) for h, b in zip(hidden, run.batches)]

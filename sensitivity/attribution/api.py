"""``attribute``: every attribution method over (layer, component) in one tidy table; ``weight_scores``: the
per-weight score tensors behind them, for the pruning stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd
import torch
from torch import nn

from ..core.distributed import run_shards
from ..core.hooks import hook_name
from ..core.loading import as_loaded
from ..core.registry import Registry, TensorSlice
from ..core.scores import (
    fisher_score,
    gblm_score,
    input_norm,
    max_over_median,
    owl_outlier_ratio,
    taylor_score,
    wanda_score,
)
from ..core.spec import SpecError
from ..core.stats import GradStats, channel_stats, window_gradients
from ..data import Windows
from ._common import resolve
from .captum_methods import captum_components, captum_scores
from .options import GBLM_ALPHA, METHODS, AttributeOptions, default_methods

__all__ = [
    "COLUMNS",
    "GBLM_ALPHA",
    "METHODS",
    "WEIGHT_METHODS",
    "AttributeOptions",
    "AttributionContext",
    "ScoreKey",
    "attribute",
    "covered_components",
    "default_methods",
    "weight_scores",
]

logger = logging.getLogger(__name__)

WEIGHT_METHODS = ("magnitude", "wanda", "taylor", "fisher", "gblm")
"""Per-weight scores :func:`weight_scores` returns."""
COLUMNS = ("layer", "component", "kind", "metric", "value", "seed")
"""Columns of the table :func:`attribute` returns, one row per (layer, component, kind, metric)."""
_GRADIENT_METHODS = ("taylor", "fisher", "gblm")
_INPUT_METHODS = ("act_norm", "wanda", "gblm")  # need ||X_j||: only weights with an input hook


class ScoreKey(NamedTuple):
    """Key of :func:`weight_scores`: a plain ``(layer, component, tensor)`` tuple with names.

    Attributes:
        layer: The layer (block index).
        component: The registry component name.
        tensor: The parameter slice, as :meth:`TensorSlice.describe` writes it, e.g. ``"in_proj.weight[512:1024]"``.
    """

    layer: int
    component: str
    tensor: str  # TensorSlice.describe(), e.g. "in_proj.weight[512:1024]"


def covered_components(registry: Registry, method: str) -> tuple[str, ...]:
    """Components that get rows (or score tensors) from ``method``, in registry order.

    ``act_norm``, ``wanda``, ``gblm``: components with a weight that has an input hook (linear rows, conv1d);
    ``taylor``, ``fisher``, ``magnitude``: components with any parameter; captum methods: see
    :mod:`.captum_methods`.
    """
    if method in METHODS:
        return METHODS[method].info["covers"](registry)
    if method not in WEIGHT_METHODS:
        raise SpecError(f"unknown method {method!r}; allowed: {', '.join((*METHODS, *WEIGHT_METHODS))}", "method")
    if method in _INPUT_METHODS:
        return _with_weights(registry)
    return _with_params(registry)


def _with_weights(registry: Registry) -> tuple[str, ...]:
    return tuple(c.name for c in registry.components if registry.weights(c.name))


def _with_params(registry: Registry) -> tuple[str, ...]:
    return tuple(c.name for c in registry.components if c.tensors)


def _pairs(registry: Registry, components, layers) -> list[tuple[int, str]]:
    """The (layer, component) pairs asked for that exist: on hybrids each layer holds only its units' components
    (``Registry.components_at``).

    Raises:
        SpecError: For an unknown component or layer, or a component none of the chosen layers holds.
    """
    names = registry.component_names if components is None else components
    for name in names:
        registry.component(name)
    layer_ids = range(registry.n_layers) if layers is None else [registry.check_layer(i, "layers") for i in layers]
    pairs = [(layer, name) for layer in layer_ids for name in names if registry.has(layer, name)]
    if components is not None and (absent := [n for n in names if all(c != n for _, c in pairs)]):
        held = ", ".join(map(str, registry.layers_with(absent[0])))
        raise SpecError(f"no chosen layer holds {absent[0]!r}; layers with it: {held}", "components")
    return pairs


def _check_windows(windows) -> Windows:
    if not isinstance(windows, Windows):
        raise SpecError(f"{type(windows).__name__} is not sensitivity.data.Windows", "windows")
    return windows


def _slice_input_norm(t: TensorSlice, weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The input norm entries of the slice's input channels: its columns (linear) or its rows (depthwise conv)."""
    norm = norm.flatten()  # (C,)
    if weight.dim() == 2:
        return norm if t.cols is None else norm[t.cols[0] : t.cols[1]]
    return norm if t.rows is None else norm[t.rows[0] : t.rows[1]]


class _Collected(NamedTuple):
    norms: dict[tuple[int, str], torch.Tensor]  # (layer, hook) -> ||X|| per channel
    grads: dict[tuple[int, str, str], GradStats]  # (layer, unit, param) -> per-window gradient sums


def _grad_key(registry: Registry, layer: int, name: str, t: TensorSlice) -> tuple[int, str, str]:
    """Key of a slice's parameter in :class:`_Collected` ``grads``: its layer, unit kind and path in the unit."""
    return layer, registry.component(name).unit, t.param


def _collect(model, registry: Registry, module: nn.Module, windows: Windows, needs: set[str], pairs, *, batch_size,
             objective, show_progress) -> _Collected:  # fmt: skip
    """Run the calibration passes in ``needs``: ``norms`` (activation norms at input hooks), ``grads`` (per-window
    gradients of every parameter slice) or ``weight_grads`` (of the weights with an input hook only)."""
    norms: dict[tuple[int, str], torch.Tensor] = {}
    points: set[tuple[int, str]] = set()
    if "norms" in needs:
        points = {(layer, registry.input_hook(t.param)) for layer, name in pairs for t in registry.weights(name)}
    if points:
        t0 = time.perf_counter()
        stats = channel_stats(model, windows, sorted({hook_name(*p) for p in points}), batch_size=batch_size,
                              show_progress=show_progress)  # fmt: skip
        norms = {p: input_norm(stats[hook_name(*p)].sumsq, len(windows)) for p in points}
        logger.info("activation norms at %d hook points in %.1f s", len(points), time.perf_counter() - t0)
    grads: dict[tuple[int, str, str], GradStats] = {}
    if needs & {"grads", "weight_grads"}:
        every = "grads" in needs  # all slices; gblm alone needs only weights with input hooks
        slices = lambda name: registry.component(name).tensors if every else registry.weights(name)
        keys = {_grad_key(registry, layer, name, t): name for layer, name in pairs for t in slices(name)}
        # a tensor shared by several layers (Zamba2) is one parameter: its gradient sums over every layer using it
        params = {k: registry.owner(module, k[0], name).get_parameter(k[2]) for k, name in sorted(keys.items())}
        t0 = time.perf_counter()
        grads = window_gradients(model, windows, params, objective=objective, show_progress=show_progress)
        logger.info("per-window gradients of %d parameters in %.1f s", len(params), time.perf_counter() - t0)
    return _Collected(norms, grads)


def _scores(method: str, registry: Registry, module: nn.Module, pairs, got: _Collected, *, gblm_alpha: float):
    """Per-weight score tensors of ``method`` for every covered (layer, component) in ``pairs``."""
    covered = covered_components(registry, method)
    out: dict[ScoreKey, torch.Tensor] = {}
    for layer, name in pairs:
        if name not in covered:
            continue
        owner = registry.owner(module, layer, name)
        slices = registry.weights(name) if method in _INPUT_METHODS else registry.component(name).tensors
        for t in slices:
            w = t.get(owner).detach()
            if method in _INPUT_METHODS:
                norm = _slice_input_norm(t, w, got.norms[(layer, registry.input_hook(t.param))])
            if method in _GRADIENT_METHODS:
                grad = got.grads[_grad_key(registry, layer, name, t)]
            if method == "magnitude":
                score = w.float().abs()
            elif method == "wanda":
                score = wanda_score(w, norm)
            elif method == "taylor":
                score = taylor_score(w, t.select(grad.mean))
            elif method == "fisher":
                score = fisher_score(t.select(grad.sumsq))
            else:
                score = gblm_score(w, norm, t.select(grad.l2), gblm_alpha)
            out[ScoreKey(layer, name, t.describe())] = score
    return out


def _act_norm_rows(registry: Registry, module: nn.Module, pairs, got: _Collected, owl_m: float) -> list[tuple]:
    covered = covered_components(registry, "act_norm")
    rows = []
    for layer, name in pairs:
        if name not in covered:
            continue
        owner, l2s, wandas = registry.owner(module, layer, name), [], []
        for t in registry.weights(name):
            w = t.get(owner).detach()
            l2 = _slice_input_norm(t, w, got.norms[(layer, registry.input_hook(t.param))])  # (in,) or (C,)
            l2s.append(l2)
            wandas.append(wanda_score(w, l2).flatten())
        l2 = torch.cat(l2s)  # (channels of every weight input,)
        metrics = {"l2_mean": l2.mean().item(), "max_over_median": max_over_median(l2),
                   "outlier_ratio": owl_outlier_ratio(torch.cat(wandas), owl_m)}  # fmt: skip
        rows += [(layer, name, "act_norm", metric, value) for metric, value in metrics.items()]
    return rows


def _sum_mean_rows(kind: str, scores: dict[ScoreKey, torch.Tensor]) -> list[tuple]:
    totals: dict[tuple[int, str], list[float]] = {}
    for key, score in scores.items():
        acc = totals.setdefault((key.layer, key.component), [0.0, 0])
        acc[0] += score.double().sum().item()
        acc[1] += score.numel()
    rows = []
    for (layer, name), (total, count) in totals.items():
        rows += [(layer, name, kind, "sum", total), (layer, name, kind, "mean", total / count)]
    return rows


@dataclass
class AttributionContext:
    """What an attribution method reads: the model, the pairs asked for, the collected statistics, the options.

    Attributes:
        model: The model as given to :func:`attribute` (a ``LoadedModel`` or instrumented HF causal LM).
        module: Its torch module.
        registry: Its registry.
        windows: The calibration windows (n, L).
        pairs: The (layer, component) pairs asked for that exist, in order.
        got: The collected statistics: ``norms`` ((layer, hook) -> per-channel input norm ``||X_j||``) and
            ``grads`` ((layer, unit, param) -> per-window gradient sums), each empty unless a method needs it.
        options: The validated options.
        show_progress: Whether to show tqdm bars.
    """

    model: object
    module: nn.Module
    registry: Registry
    windows: Windows
    pairs: list[tuple[int, str]]
    got: _Collected
    options: AttributeOptions
    show_progress: bool


def attribute(
    model,
    windows: Windows,
    *,
    options: AttributeOptions | None = None,
    show_progress: bool = True,
    **overrides,
) -> pd.DataFrame:
    """Attribution scores of every (layer, component) by several methods, in one tidy table.

    Methods (the ``kind`` column, :data:`METHODS`) and their metrics:

    * ``act_norm``: statistics of the component's weight inputs ``||X_j||`` (WANDA's input norm: the root of the
      sum of squares over every calibration token divided by the number of windows): ``l2_mean``
      (mean over input channels), ``max_over_median`` (of the per-channel norms) and ``outlier_ratio`` (OWL's
      layerwise outlier ratio of the WANDA scores ``|W_ij| ||X_j||`` with threshold ``owl_m``; Yin et al., 2023).
    * ``taylor``: ``|w * mean_k g_k|`` (Molchanov et al., 2019); ``fisher``: ``sum_k g_k**2``; ``gblm``:
      ``|W| ||X_j|| + gblm_alpha |W| sqrt(sum_k g_k**2)`` (Das et al., 2023), with ``g_k`` the gradient of window
      ``k``'s objective. Metrics ``sum`` (over the component's entries) and ``mean`` (per entry).
    * ``grad_x_act``, ``integrated_gradients``, ``conductance``: captum layer attributions of the objective to the
      component's hook point; metrics ``abs_sum`` and ``sum`` (means over windows of the sums over positions and
      channels).

    Which components each method covers is tabulated in :mod:`sensitivity.attribution`. On hybrids every layer
    gets rows for the components its units hold (``Registry.components_at``): SSM, attention (``q, k, v, o``), MLP
    (``gate, up, down``) and MoE (``router, experts, shared_experts``) components. A tensor several layers share
    (Zamba2's shared transformer) is one parameter: its gradient, and so its ``taylor``, ``fisher`` and ``gblm``
    gradient terms, sums over every layer using it, the same in each of them. Gradients run in eval mode under
    ``torch.enable_grad``; every parameter's ``requires_grad`` and ``.grad`` are restored on return.

    Args:
        model: A ``LoadedModel`` or instrumented HF causal LM of a registry architecture (hybrids included).
        windows: Calibration windows (n, L), e.g. from :func:`sensitivity.data.calibration_windows`.
        options: :class:`AttributeOptions`; keyword ``overrides`` change its fields (``methods``, ``components``,
            ``layers``, ``batch_size``, ``seed``, ``objective``, ``n_steps``, ``internal_batch_size``, ``owl_m``,
            ``gblm_alpha``, ``baseline``).
        show_progress: Show tqdm bars.

    Returns:
        A DataFrame with columns ``layer, component, kind, metric, value, seed`` and one row per
        (layer, component, kind, metric).

    Raises:
        SpecError: For an unknown method, component, objective or baseline, a layer out of range, a component none
            of the chosen layers holds, or a value out of range (naming the field).

    Examples:
        >>> lm = load_model("tiny:mamba2")
        >>> windows = calibration_windows(load_corpus("sample"), lm.tokenizer, 4, 64)
        >>> df = attribute(lm, windows, methods=["taylor", "grad_x_act"], layers=[0])
        >>> df.pivot_table(index="component", columns=["kind", "metric"], values="value")
    """
    options = AttributeOptions.merged(options, **overrides)
    module, registry = resolve(model)
    _check_windows(windows)
    _pairs(registry, options.components, options.layers)  # SpecError before any work
    methods = options.methods or default_methods()
    if options.backend == "local":
        by_method = _method_rows(model, windows, options, methods, show_progress)
    else:
        by_method = {}
        groups: dict[frozenset, list[str]] = {}  # methods reading the same statistics share a worker's pass
        for m in methods:
            groups.setdefault(frozenset(METHODS[m].info.get("needs") or ()), []).append(m)
        run_shards(as_loaded(model), _AttributionJob, (windows, options), list(groups.values()),
                   options, lambda shard, rows: by_method.update(rows))  # fmt: skip
    rows = [r for m in methods for r in by_method[m]]
    df = pd.DataFrame([(*r, options.seed) for r in rows], columns=list(COLUMNS))
    return df.astype({"layer": "int64", "component": "object", "kind": "object", "metric": "object",
                      "value": "float64", "seed": "int64"})  # fmt: skip


def _method_rows(model, windows: Windows, options: AttributeOptions, methods, show_progress: bool
                 ) -> dict[str, list[tuple]]:  # fmt: skip
    """The rows of each of ``methods``, from one collection pass of the statistics they read."""
    module, registry = resolve(model)
    pairs = _pairs(registry, options.components, options.layers)
    needs = set().union(*(METHODS[m].info.get("needs", set()) for m in methods))
    by_method: dict[str, list[tuple]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        got = _collect(model, registry, module, windows, needs, pairs, batch_size=options.batch_size,
                       objective=options.objective, show_progress=show_progress)  # fmt: skip
        ctx = AttributionContext(model, module, registry, windows, pairs, got, options, show_progress)
        for method in methods:
            t0 = time.perf_counter()
            by_method[method] = METHODS[method].fn(ctx)
            logger.info("%s in %.1f s", method, time.perf_counter() - t0)
    return by_method


class _AttributionJob:
    """A Ray worker's share of :func:`attribute`: a group of methods reading the same statistics."""

    def __init__(self, lm, payload: tuple[Windows, AttributeOptions]) -> None:
        self.lm, (self.windows, self.options) = lm, payload

    def run(self, methods: list[str]) -> dict[str, list[tuple]]:
        return _method_rows(self.lm, self.windows, self.options, methods, show_progress=False)


@METHODS.implement("act_norm", covers=_with_weights)
def _act_norm(ctx: AttributionContext) -> list[tuple]:
    return _act_norm_rows(ctx.registry, ctx.module, ctx.pairs, ctx.got, ctx.options.owl_m)


def _gradient_method(name: str, covers) -> None:
    def run(ctx: AttributionContext) -> list[tuple]:
        scores = _scores(name, ctx.registry, ctx.module, ctx.pairs, ctx.got, gblm_alpha=ctx.options.gblm_alpha)
        return _sum_mean_rows(name, scores)

    METHODS.implement(name, covers=covers)(run)


_gradient_method("taylor", _with_params)
_gradient_method("fisher", _with_params)
_gradient_method("gblm", _with_weights)


def _captum_method(name: str) -> None:
    def run(ctx: AttributionContext) -> list[tuple]:
        covered = captum_components(ctx.registry)
        targets = [(layer, comp) for layer, comp in ctx.pairs if comp in covered]
        if not targets:
            return []
        o = ctx.options
        got = captum_scores(ctx.model, ctx.windows, name, targets, objective=o.objective, n_steps=o.n_steps,
                            internal_batch_size=o.internal_batch_size, batch_size=o.batch_size, baseline=o.baseline,
                            show_progress=ctx.show_progress)  # fmt: skip
        return [row for (layer, comp), (abs_sum, total) in got.items()
                for row in ((layer, comp, name, "abs_sum", abs_sum), (layer, comp, name, "sum", total))]  # fmt: skip

    METHODS.implement(name, covers=captum_components)(run)


for _name in ("grad_x_act", "integrated_gradients", "conductance"):
    _captum_method(_name)


def weight_scores(
    model,
    windows: Windows,
    method: str,
    *,
    components: str | Iterable[str] | None = None,
    layers: int | Iterable[int] | None = None,
    batch_size: int = 8,
    objective: str = "loss",
    gblm_alpha: float = GBLM_ALPHA,
    show_progress: bool = True,
) -> dict[ScoreKey, torch.Tensor]:
    """Per-weight saliency tensors for pruning, keyed by (layer, component, ``TensorSlice.describe()``).

    ``magnitude`` ``|W|``, ``taylor`` and ``fisher`` cover every parameter slice of a component; ``wanda`` and
    ``gblm`` only the weights with an input hook (linear rows and conv1d). Formulas as in :func:`attribute`.

    Args:
        model: A ``LoadedModel`` or instrumented HF causal LM.
        windows: Calibration windows (n, L) (unused by ``magnitude``).
        method: One of :data:`WEIGHT_METHODS`.
        components: Registry component names (default all).
        layers: Layer indices (default all).
        batch_size: Windows per forward for activation statistics.
        objective: ``"loss"`` or ``"logprob"`` (gradient methods).
        gblm_alpha: Weight of GBLM's gradient term.
        show_progress: Show tqdm bars.

    Returns:
        :class:`ScoreKey` -> float32 scores shaped like the slice ``TensorSlice.get(Registry.owner(model, layer,
        component))`` (higher = keep), for the (layer, component) pairs that exist.

    Examples:
        >>> scores = weight_scores(lm, windows, "wanda", layers=[0], components=["x"])
        >>> scores[(0, "x", "in_proj.weight[256:512]")].shape
    """
    module, registry = resolve(model)
    if method not in WEIGHT_METHODS:
        raise SpecError(f"unknown weight score {method!r}; allowed: {', '.join(WEIGHT_METHODS)}", "method")
    options = AttributeOptions(components=components, layers=layers, batch_size=batch_size, objective=objective,
                               gblm_alpha=gblm_alpha)  # fmt: skip
    _check_windows(windows)
    pairs = _pairs(registry, options.components, options.layers)
    needs = {"magnitude": set(), "wanda": {"norms"}, "taylor": {"grads"}, "fisher": {"grads"},
             "gblm": {"norms", "weight_grads"}}[method]  # fmt: skip
    got = _collect(model, registry, module, windows, needs, pairs, batch_size=options.batch_size,
                   objective=options.objective, show_progress=show_progress)  # fmt: skip
    return _scores(method, registry, module, pairs, got, gblm_alpha=options.gblm_alpha)

"""``attribute``: every attribution method over (layer, component) in one tidy table; ``weight_scores``: the
per-weight score tensors behind them, for the pruning stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import pandas as pd
import torch
from torch import nn

from ..core.hooks import hook_name
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
from ..core.stats import OBJECTIVES, GradStats, channel_stats, window_gradients
from ..data import Windows
from ._common import (
    check_choice,
    check_choices,
    check_components,
    check_float,
    check_int,
    check_layers,
    check_windows,
    resolve,
)
from .captum_methods import BASELINES, CAPTUM_METHODS, captum_components, captum_scores

__all__ = [
    "COLUMNS",
    "DEFAULT_METHODS",
    "GBLM_ALPHA",
    "METHODS",
    "WEIGHT_METHODS",
    "ScoreKey",
    "attribute",
    "covered_components",
    "weight_scores",
]

logger = logging.getLogger(__name__)

METHODS = ("act_norm", "taylor", "fisher", "gblm", "grad_x_act", "integrated_gradients", "conductance")
"""Every method of :func:`attribute` (the ``kind`` column)."""
DEFAULT_METHODS = ("act_norm", "taylor", "fisher", "gblm", "grad_x_act")
"""The cheap ones: integrated gradients and conductance cost ``n_steps`` forwards per hook point."""
WEIGHT_METHODS = ("magnitude", "wanda", "taylor", "fisher", "gblm")
"""Per-weight scores :func:`weight_scores` returns."""
GBLM_ALPHA = 100.0
"""GBLM-Pruner's gradient weight: its released code multiplies every gradient by ``scale=100`` before the l2 norm."""
COLUMNS = ("layer", "component", "kind", "metric", "value", "seed")
_GRADIENT_METHODS = ("taylor", "fisher", "gblm")
_INPUT_METHODS = ("act_norm", "wanda", "gblm")  # need ||X_j||: only weights with an input hook


class ScoreKey(NamedTuple):
    """Key of :func:`weight_scores`: a plain ``(layer, component, tensor)`` tuple with names."""

    layer: int
    component: str
    tensor: str  # TensorSlice.describe(), e.g. "in_proj.weight[512:1024]"


def covered_components(registry: Registry, method: str) -> tuple[str, ...]:
    """Components that get rows (or score tensors) from ``method``, in registry order.

    ``act_norm``, ``wanda``, ``gblm``: components with a weight that has an input hook (linear rows, conv1d);
    ``taylor``, ``fisher``, ``magnitude``: components with any parameter; captum methods: see
    :mod:`.captum_methods`.
    """
    check_choice("method", method, METHODS + WEIGHT_METHODS)
    if method in CAPTUM_METHODS:
        return captum_components(registry)
    if method in _INPUT_METHODS:
        return tuple(c.name for c in registry.components if registry.weights(c.name))
    return tuple(c.name for c in registry.components if c.tensors)


def _check_common(registry: Registry, components, layers, windows, batch_size, objective):
    """The checks :func:`attribute` and :func:`weight_scores` share; returns the (layer, component) pairs and
    the batch size."""
    names = check_components(registry, components)
    layer_ids = check_layers(registry, layers)
    check_windows(windows)
    batch_size = check_int("batch_size", batch_size, 1)
    check_choice("objective", objective, OBJECTIVES)
    return [(layer, name) for layer in layer_ids for name in names], batch_size


def _slice_input_norm(t: TensorSlice, weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The input norm entries of the slice's input channels: its columns (linear) or its rows (depthwise conv)."""
    norm = norm.flatten()  # (C,)
    if weight.dim() == 2:
        return norm if t.cols is None else norm[t.cols[0] : t.cols[1]]
    return norm if t.rows is None else norm[t.rows[0] : t.rows[1]]


class _Collected(NamedTuple):
    norms: dict[tuple[int, str], torch.Tensor]  # (layer, hook) -> ||X|| per channel
    grads: dict[tuple[int, str], GradStats]  # (layer, param) -> per-window gradient sums


def _collect(model, registry: Registry, module: nn.Module, windows: Windows, methods, pairs, *, batch_size,
             objective, show_progress) -> _Collected:  # fmt: skip
    """Run the calibration passes ``methods`` need: activation norms at input hooks, per-window gradients."""
    norms: dict[tuple[int, str], torch.Tensor] = {}
    points: set[tuple[int, str]] = set()
    if set(methods) & set(_INPUT_METHODS):
        points = {(layer, registry.input_hook(t.param)) for layer, name in pairs for t in registry.weights(name)}
    if points:
        t0 = time.perf_counter()
        stats = channel_stats(model, windows, sorted({hook_name(*p) for p in points}), batch_size=batch_size,
                              show_progress=show_progress)  # fmt: skip
        norms = {p: input_norm(stats[hook_name(*p)].sumsq, len(windows)) for p in points}
        logger.info("activation norms at %d hook points in %.1f s", len(points), time.perf_counter() - t0)
    grads: dict[tuple[int, str], GradStats] = {}
    if set(methods) & set(_GRADIENT_METHODS):
        every = set(methods) & {"taylor", "fisher"}  # all slices; gblm alone needs only weights with input hooks
        slices = lambda name: registry.component(name).tensors if every else registry.weights(name)
        keys = {(layer, t.param) for layer, name in pairs for t in slices(name)}
        params = {k: registry.mixer(module, k[0]).get_parameter(k[1]) for k in sorted(keys)}
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
        mixer = registry.mixer(module, layer)
        slices = registry.weights(name) if method in _INPUT_METHODS else registry.component(name).tensors
        for t in slices:
            w = t.get(mixer).detach()
            if method in _INPUT_METHODS:
                norm = _slice_input_norm(t, w, got.norms[(layer, registry.input_hook(t.param))])
            if method in _GRADIENT_METHODS:
                grad = got.grads[(layer, t.param)]
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
        mixer, l2s, wandas = registry.mixer(module, layer), [], []
        for t in registry.weights(name):
            w = t.get(mixer).detach()
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


def attribute(
    model,
    windows: Windows,
    *,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    components: str | Iterable[str] | None = None,
    layers: int | Iterable[int] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    objective: str = "loss",
    n_steps: int = 16,
    internal_batch_size: int | None = None,
    show_progress: bool = True,
    owl_m: float = 5.0,
    gblm_alpha: float = GBLM_ALPHA,
    baseline: str = "zeros",
) -> pd.DataFrame:
    """Attribution scores of every (layer, component) by several methods, in one tidy table.

    Methods (the ``kind`` column) and their metrics:

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

    Which components each method covers is tabulated in :mod:`sensitivity.attribution`. Gradients run in eval mode
    under ``torch.enable_grad``; every parameter's ``requires_grad`` and ``.grad`` are restored on return.

    Args:
        model: A ``LoadedModel`` or instrumented HF Mamba / Mamba2 / FalconMamba causal LM.
        windows: Calibration windows (n, L), e.g. from :func:`sensitivity.data.calibration_windows`.
        methods: Names from :data:`METHODS` (default :data:`DEFAULT_METHODS`).
        components: Registry component names (default all).
        layers: Layer indices (default all).
        batch_size: Windows per forward for activation statistics and captum (gradients use one window each).
        seed: Seeds torch's RNG inside the call (the methods are deterministic) and fills the ``seed`` column.
        objective: ``"loss"`` (mean next-token cross-entropy per window) or ``"logprob"`` (sum of the target
            tokens' log-probabilities), for gradients and captum alike.
        n_steps: captum's interpolation steps for integrated gradients and conductance.
        internal_batch_size: captum's flag for integrated gradients and conductance: sequences (windows x steps)
            per forward; None runs all ``batch_size x n_steps`` at once. On a 2-core CPU, 16-32 ran integrated
            gradients on the default model twice as fast as None.
        show_progress: Show tqdm bars.
        owl_m: OWL's outlier threshold M.
        gblm_alpha: Weight of GBLM's gradient term (default :data:`GBLM_ALPHA` = 100, as in the released code).
        baseline: captum baseline: ``"zeros"`` (all-zero input embeddings).

    Returns:
        A DataFrame with columns ``layer, component, kind, metric, value, seed`` and one row per
        (layer, component, kind, metric).

    Raises:
        ValueError: For an unknown method, component, objective or baseline, a layer out of range, empty windows,
            or a non-positive ``batch_size`` / ``n_steps`` / ``internal_batch_size``.

    Example:
        >>> lm = load_model("tiny:mamba2")
        >>> windows = calibration_windows(load_corpus("sample"), lm.tokenizer, 4, 64)
        >>> df = attribute(lm, windows, methods=["taylor", "grad_x_act"], layers=[0])
        >>> df.pivot_table(index="component", columns=["kind", "metric"], values="value")
    """
    module, registry = resolve(model)
    methods = check_choices("method", methods, METHODS)
    pairs, batch_size = _check_common(registry, components, layers, windows, batch_size, objective)
    seed = check_int("seed", seed)
    n_steps = check_int("n_steps", n_steps, 1)
    if internal_batch_size is not None:
        internal_batch_size = check_int("internal_batch_size", internal_batch_size, 1)
    owl_m = check_float("owl_m", owl_m, positive=True)
    gblm_alpha = check_float("gblm_alpha", gblm_alpha, positive=False)
    check_choice("baseline", baseline, BASELINES)

    rows: list[tuple] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        got = _collect(model, registry, module, windows, methods, pairs, batch_size=batch_size, objective=objective,
                       show_progress=show_progress)  # fmt: skip
        for method in methods:
            t0 = time.perf_counter()
            if method == "act_norm":
                rows += _act_norm_rows(registry, module, pairs, got, owl_m)
            elif method in _GRADIENT_METHODS:
                rows += _sum_mean_rows(method, _scores(method, registry, module, pairs, got, gblm_alpha=gblm_alpha))
            else:
                covered = captum_components(registry)
                targets = [(layer, name) for layer, name in pairs if name in covered]
                if targets:
                    got_captum = captum_scores(model, windows, method, targets, objective=objective, n_steps=n_steps,
                                               internal_batch_size=internal_batch_size, batch_size=batch_size,
                                               baseline=baseline, show_progress=show_progress)  # fmt: skip
                    for (layer, name), (abs_sum, total) in got_captum.items():
                        rows += [(layer, name, method, "abs_sum", abs_sum), (layer, name, method, "sum", total)]
            logger.info("%s in %.1f s", method, time.perf_counter() - t0)
    df = pd.DataFrame([(*r, seed) for r in rows], columns=list(COLUMNS))
    return df.astype({"layer": "int64", "component": "object", "kind": "object", "metric": "object",
                      "value": "float64", "seed": "int64"})  # fmt: skip


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
        :class:`ScoreKey` -> float32 scores shaped like the slice ``TensorSlice.get(mixer)`` (higher = keep).

    Example:
        >>> scores = weight_scores(lm, windows, "wanda", layers=[0], components=["x"])
        >>> scores[(0, "x", "in_proj.weight[256:512]")].shape
    """
    module, registry = resolve(model)
    method = check_choice("method", method, WEIGHT_METHODS)
    pairs, batch_size = _check_common(registry, components, layers, windows, batch_size, objective)
    gblm_alpha = check_float("gblm_alpha", gblm_alpha, positive=False)
    got = _collect(model, registry, module, windows, (method,), pairs, batch_size=batch_size, objective=objective,
                   show_progress=show_progress)  # fmt: skip
    return _scores(method, registry, module, pairs, got, gblm_alpha=gblm_alpha)

"""Allocators: spread a global sparsity budget over (layer, component) entries.

Pure functions first (unit-tested on hand-made numbers): :func:`fit_budget` (shift raw sparsities so the
parameter-weighted budget is met exactly within per-entry bounds), :func:`owl_sparsity` (OWL's layerwise ratios),
:func:`depth_ramp`, :func:`lower_convex_hull` and :func:`greedy_allocate` (the exact optimum of the convexified
separable allocation problem). Then :func:`allocate`, which measures what a method needs on a model and returns a
:class:`~sensitivity.allocation.Schedule`.

Shape legend: E entries (layer, component), L layers.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from torch import nn

from ..attribution import weight_scores
from ..core.loading import LoadedModel, as_loaded
from ..core.scores import owl_outlier_ratio
from ..core.spec import Fraction, SpecError, check
from ..core.tables import PROBE_COLUMNS, read_table
from ..data import Windows
from .options import (
    METHODS,
    AllocateOptions,
    DepthOptions,
    OwlOptions,
    SensitivityOptions,
    UnitOptions,
    needs_probes,
)
from .schedule import Schedule

__all__ = [
    "FISHER_GRID",
    "METHODS",
    "AllocateOptions",
    "Allocation",
    "AllocationContext",
    "DepthOptions",
    "OwlOptions",
    "SensitivityOptions",
    "allocate",
    "depth_ramp",
    "fit_budget",
    "greedy_allocate",
    "lower_convex_hull",
    "needs_probes",
    "owl_sparsity",
]

logger = logging.getLogger(__name__)

FISHER_GRID = tuple(i / 20 for i in range(20))
"""Sparsities at which the Fisher (OBD) loss curves are sampled: 0, 0.05, ..., 0.95."""
_PROBE_COLUMNS = ("layer", "component", "kind", "sparsity", "metric", "value")


# ---------------------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------------------


def _vector(name: str, values) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).flatten()  # (E,)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has a non-finite value: {values!r:.120}")
    return t


def _bound(name: str, value, n: int) -> torch.Tensor:
    t = _vector(name, value)  # (1,) or (E,)
    if t.numel() == 1:
        return t.expand(n).clone()  # (E,)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} values for {n} entries; give one or one per entry")
    return t


def _check_fraction(name: str, value) -> float:
    return check(Fraction, value, name)


def fit_budget(raw, sizes, budget: float, lo=0.0, hi=1.0) -> torch.Tensor:
    """Shift ``raw`` by one scalar ``t`` so that ``sum(sizes * clip(raw + t, lo, hi)) / sum(sizes) == budget``.

    The parameter-weighted mean ``g(t)`` is piecewise linear and non-decreasing in ``t`` with breakpoints at
    ``lo - raw`` and ``hi - raw``; the breakpoint bracketing the budget is found by bisection over the sorted
    breakpoints and ``t`` is then solved exactly on that linear piece, so the budget is met up to float rounding.

    Args:
        raw: (E,) unconstrained sparsities (their shape is kept where the bounds do not bind).
        sizes: (E,) parameters of each entry, > 0.
        budget: Target parameter-weighted sparsity.
        lo: Lower bound, a scalar or (E,).
        hi: Upper bound, a scalar or (E,).

    Returns:
        (E,) float64 sparsities within ``[lo, hi]`` meeting ``budget``.

    Raises:
        ValueError: If ``lo > hi`` somewhere, or ``budget`` is outside the range the bounds allow (naming both).

    Examples:
        >>> fit_budget([0.2, 0.6], [1, 3], 0.5)  # shift by t = 0: (0.2 + 3 * 0.6) / 4 = 0.5
        tensor([0.2000, 0.6000], dtype=torch.float64)
    """
    raw = _vector("raw", raw)  # (E,)
    n = raw.numel()
    sizes = _vector("sizes", sizes)  # (E,)
    if sizes.numel() != n:
        raise ValueError(f"sizes has {sizes.numel()} values for {n} entries")
    if (sizes <= 0).any():
        raise ValueError(f"sizes must be > 0, got {sizes.min().item()!r}")
    lo, hi = _bound("lo", lo, n), _bound("hi", hi, n)  # (E,), (E,)
    if (lo > hi).any():
        i = int(torch.nonzero(lo > hi)[0])
        raise ValueError(f"lower bound {lo[i].item():g} is above upper bound {hi[i].item():g} (entry {i})")
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or not math.isfinite(budget):
        raise ValueError(f"budget {budget!r} must be a finite number")
    total = sizes.sum()
    g = lambda t: ((sizes * (raw + t).clamp(lo, hi)).sum() / total).item()
    least, most = ((sizes * lo).sum() / total).item(), ((sizes * hi).sum() / total).item()
    if not least - 1e-12 <= budget <= most + 1e-12:
        raise ValueError(f"budget {budget:g} is infeasible: the bounds allow an overall sparsity between "
                         f"{least:.6g} and {most:.6g}")  # fmt: skip
    breaks = torch.cat([lo - raw, hi - raw]).unique(sorted=True)  # (K,) g(breaks[0]) = least, g(breaks[-1]) = most
    left, right = 0, breaks.numel() - 1  # smallest k with g(breaks[k]) >= budget
    while left < right:
        mid = (left + right) // 2
        if g(breaks[mid].item()) >= budget:
            right = mid
        else:
            left = mid + 1
    if left == 0:
        t = breaks[0].item()
    else:
        a, b = breaks[left - 1].item(), breaks[left].item()
        ga, gb = g(a), g(b)
        t = b if gb <= ga else a + (budget - ga) * (b - a) / (gb - ga)
    return (raw + t).clamp(lo, hi)  # (E,)


def owl_sparsity(outlier_ratios, budget: float, lam: float) -> torch.Tensor:
    """OWL's layerwise sparsities from layerwise outlier ratios (Yin et al., 2023, "Outlier Weighed Layerwise
    Sparsity", sec. 4; as ``prune_wanda_outlier`` in the released code, ``lib/prune_all.py``).

    The ratios are min-max normalised to ``[0, 2 * lam]``; the layer density is that minus its mean plus
    ``1 - budget``; sparsity is one minus the density. Layers with more outliers get lower sparsity, the mean
    sparsity is ``budget`` and the spread is ``2 * lam``. Equal ratios give ``budget`` everywhere (the released code
    divides by zero there).

    Args:
        outlier_ratios: (L,) outlier ratio of each layer (any scale: fractions or percents).
        budget: Mean sparsity over layers, in [0, 1).
        lam: OWL's lambda, >= 0 (0.08 in the paper).

    Returns:
        (L,) float64 sparsities (not clipped: :func:`fit_budget` applies bounds).

    Examples:
        >>> owl_sparsity([1.0, 3.0], 0.5, 0.1)  # normalised [0, 0.2], density [0.4, 0.6]
        tensor([0.6000, 0.4000], dtype=torch.float64)
    """
    r = _vector("outlier_ratios", outlier_ratios)  # (L,)
    budget = _check_fraction("budget", budget)
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"owl lambda {lam!r} must be a finite number >= 0")
    span = (r.max() - r.min()).item()
    if span <= 0:
        return torch.full_like(r, budget)  # (L,)
    r = (r - r.min()) / span * (2 * lam)  # (L,) in [0, 2 lam]
    density = r - r.mean() + (1 - budget)  # (L,)
    return 1 - density  # (L,)


def depth_ramp(n_layers: int, budget: float, spread: float) -> torch.Tensor:
    """A linear ramp of sparsities from ``budget - spread`` (layer 0) to ``budget + spread`` (last layer).

    Its mean is ``budget``; a negative ``spread`` ramps the other way. One layer gets ``budget``.

    Examples:
        >>> depth_ramp(3, 0.5, 0.1)
        tensor([0.4000, 0.5000, 0.6000], dtype=torch.float64)
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, numbers.Integral) or n_layers < 1:
        raise ValueError(f"n_layers {n_layers!r} must be an integer >= 1")
    budget = _check_fraction("budget", budget)
    if not isinstance(spread, numbers.Real) or isinstance(spread, bool) or not math.isfinite(spread):
        raise ValueError(f"depth spread {spread!r} must be a finite number")
    if n_layers == 1:
        return torch.tensor([budget], dtype=torch.float64)  # (1,)
    return torch.linspace(budget - spread, budget + spread, int(n_layers), dtype=torch.float64)  # (L,)


def lower_convex_hull(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of 2-D points, left to right (Andrew's monotone chain; collinear points dropped).

    For points sorted by x with distinct x, the hull is the greatest convex function below the piecewise-linear
    curve through them; it passes through the first and last points.

    Examples:
        >>> lower_convex_hull([(0, 0), (0.25, 0.5), (0.5, 0.15), (0.75, 0.3), (1, 1)])
        [(0.0, 0.0), (0.5, 0.15), (0.75, 0.3), (1.0, 1.0)]
    """
    pts = sorted((float(x), float(y)) for x, y in points)
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear interpolation through sorted ``xs`` (x within their range)."""
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return ys[i]
    if i == 0 or i == len(xs):
        raise ValueError(f"sparsity {x} outside the curve's range [{xs[0]}, {xs[-1]}]")
    w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


def _curve(i: int, points) -> tuple[list[float], list[float]]:
    pts = sorted((float(s), float(v)) for s, v in points)
    if not pts:
        raise ValueError(f"curve {i} has no points")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if any(not (math.isfinite(x) and 0.0 <= x < 1.0) for x in xs) or not all(map(math.isfinite, ys)):
        raise ValueError(f"curve {i} has a point out of range: sparsities must be in [0, 1), losses finite: {pts}")
    if len(set(xs)) < len(xs):
        raise ValueError(f"curve {i} lists a sparsity twice: {xs}")
    if xs[0] != 0.0:
        raise ValueError(f"curve {i} has no point at sparsity 0 (the dense model, loss 0): {pts}")
    return xs, ys


class Allocation(NamedTuple):
    """What :func:`greedy_allocate` returns.

    Attributes:
        sparsity: (E,) float64 sparsity of each entry.
        loss: The predicted total loss: the sum over entries of their piecewise-linear curves at ``sparsity``.
    """

    sparsity: torch.Tensor  # (E,) float64
    loss: float  # sum over entries of the piecewise-linear curves at ``sparsity``


def greedy_allocate(curves: Sequence[Sequence[tuple[float, float]]], sizes, budget: float, lo=0.0, hi=1.0
                    ) -> Allocation:  # fmt: skip
    """Sparsities minimising the summed predicted loss under a parameter budget.

    Problem: ``min sum_e f_e(s_e)`` s.t. ``sum_e n_e s_e = budget * sum_e n_e`` and ``lo_e <= s_e <= hi_e``, where
    ``f_e`` is the piecewise-linear curve through entry ``e``'s measured ``(sparsity, loss increase)`` points.

    Method: each curve, restricted to ``[lo_e, min(hi_e, largest measured sparsity)]`` (no extrapolation), is
    replaced by its lower convex hull. Every entry starts at ``lo_e``; hull segments are then taken in increasing
    order of marginal cost per pruned parameter (``slope / n_e``) until the budget's parameters are pruned, the last
    one split so the budget is met exactly. For convex curves this is the exact optimum (a separable convex problem
    with one linear constraint: marginal costs are equalised); in general it is the exact optimum of the convexified
    problem, whose value bounds the true one from below. All entries but the split one end on measured points (or
    the bounds), where the hull equals the curve.

    Args:
        curves: Per entry, ``(sparsity, loss increase)`` points including ``(0, 0)``; sparsities in [0, 1).
        sizes: (E,) parameters per entry, > 0.
        budget: Target parameter-weighted sparsity.
        lo: Minimum sparsity, scalar or (E,).
        hi: Maximum sparsity, scalar or (E,); capped at each curve's largest measured sparsity.

    Returns:
        :class:`Allocation`: (E,) sparsities and the predicted total loss ``sum_e f_e(s_e)`` (on the
        piecewise-linear curves, not the hulls).

    Raises:
        ValueError: For a malformed curve, or a budget the bounds and measured ranges cannot meet (naming the
            reachable range).

    Examples:
        >>> curves = [[(0, 0), (0.5, 0.1), (0.9, 1.0)], [(0, 0), (0.5, 0.4), (0.9, 2.0)]]
        >>> greedy_allocate(curves, [100, 100], 0.5)  # both first segments (slopes 0.2, 0.8) before any second
        Allocation(sparsity=tensor([0.5000, 0.5000], dtype=torch.float64), loss=0.5)
    """
    n_entries = len(curves)
    sizes = _vector("sizes", sizes)  # (E,)
    if sizes.numel() != n_entries:
        raise ValueError(f"sizes has {sizes.numel()} values for {n_entries} curves")
    if (sizes <= 0).any():
        raise ValueError(f"sizes must be > 0, got {sizes.min().item()!r}")
    lo_v, hi_v = _bound("lo", lo, n_entries).tolist(), _bound("hi", hi, n_entries).tolist()
    n = sizes.tolist()
    parsed = [_curve(i, c) for i, c in enumerate(curves)]
    start, cap, segments = [], [], []
    for e, (xs, ys) in enumerate(parsed):
        top = min(hi_v[e], xs[-1])
        if lo_v[e] > top + 1e-12:
            raise ValueError(f"entry {e}: min sparsity {lo_v[e]:g} is above its largest allowed measured sparsity "
                             f"{top:g} (curve measured up to {xs[-1]:g}, max {hi_v[e]:g})")  # fmt: skip
        low = min(lo_v[e], top)
        start.append(low)
        cap.append(top)
        inner = [(low, _interp(xs, ys, low))] + [(x, y) for x, y in zip(xs, ys) if low < x < top]
        inner += [(top, _interp(xs, ys, top))] if top > low else []
        hull = lower_convex_hull(inner)
        for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
            segments.append(((y1 - y0) / (x1 - x0) / n[e], e, x0, x1))
    total = math.fsum(n)
    budget = float(budget)
    need = budget * total - math.fsum(ne * s for ne, s in zip(n, start))
    reach_lo = math.fsum(ne * s for ne, s in zip(n, start)) / total
    reach_hi = math.fsum(ne * s for ne, s in zip(n, cap)) / total
    if need < -1e-9 * total or budget > reach_hi + 1e-12:
        raise ValueError(f"budget {budget:g} is infeasible: the bounds and the measured curves allow an overall "
                         f"sparsity between {reach_lo:.6g} and {reach_hi:.6g} (no extrapolation beyond each curve's "
                         "largest measured sparsity; measure higher sparsities or lower the budget)")  # fmt: skip
    s = list(start)
    remaining = need
    for _, e, x0, x1 in sorted(segments):
        if remaining <= 0:
            break
        room = n[e] * (x1 - x0)
        if room <= remaining:
            s[e], remaining = x1, remaining - room
        else:
            s[e], remaining = x0 + remaining / n[e], 0.0
    loss = math.fsum(_interp(xs, ys, s[e]) for e, (xs, ys) in enumerate(parsed))
    return Allocation(torch.tensor(s, dtype=torch.float64), loss)


# ---------------------------------------------------------------------------------------------------------------------
# the model-facing allocator
# ---------------------------------------------------------------------------------------------------------------------


def _windows_record(windows: Windows) -> dict:
    return {"description": windows.describe(), "n": len(windows), "seqlen": windows.seqlen,
            "sha256": windows.sha256()[:16]}  # fmt: skip


def _read_probes(probes) -> tuple[pd.DataFrame, str | None]:
    if isinstance(probes, pd.DataFrame):
        return probes, None
    if not isinstance(probes, (str, os.PathLike)):
        raise SpecError(f"{type(probes).__name__} is not a probes frame, probes.csv or its directory", "probes")
    df, path = read_table(probes, "probes.csv", "probes", PROBE_COLUMNS)
    return df, str(path)


def _probes_task(path: str | None) -> str | None:
    """The objective the probes at ``path`` measured (from the manifest next to them; ``text`` when the manifest
    predates objectives), or None for a frame or a CSV without a manifest."""
    manifest = Path(path).with_name("manifest.json") if path else None
    if manifest is None or not manifest.is_file():
        return None
    spec = json.loads(manifest.read_text()).get("spec", {})
    return spec.get("task", "text") if isinstance(spec, dict) else None


def _probe_curves(df: pd.DataFrame, keys: list[tuple[int, str]], probe_method: str, metric: str, where: str
                  ) -> dict[tuple[int, str], list[tuple[float, float]]]:  # fmt: skip
    """Per (layer, component), ``[(0, 0)] + [(s, mean value over seeds)]`` of the ``probe_method`` probes."""
    if missing := [c for c in _PROBE_COLUMNS if c not in df.columns]:
        raise SpecError(f"{where} lacks column {missing[0]!r}; a probes frame has {', '.join(_PROBE_COLUMNS)}",
                        "probes")  # fmt: skip
    kinds = df["kind"].astype(str)
    rows = df[(kinds == probe_method) & (df["metric"] == metric)]
    if rows.empty:
        raise SpecError(f"{where} has no {probe_method} probes with metric {metric!r}; kinds present: "
                        f"{', '.join(sorted(set(kinds))[:12])}", "probes")  # fmt: skip
    rows = rows.assign(s=pd.to_numeric(rows["sparsity"], errors="coerce"), layer=rows["layer"].astype(int))
    if rows["s"].isna().any() or rows["value"].isna().any():
        bad = rows[rows["s"].isna() | rows["value"].isna()].iloc[0]
        raise SpecError(f"{where}: probe {bad['kind']!r} of layer {bad['layer']} {bad['component']} has no sparsity "
                        "or no value", "probes")  # fmt: skip
    means = rows.groupby(["layer", "component", "s"])["value"].mean()
    curves: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for (layer, comp, s), v in means.items():
        curves.setdefault((int(layer), comp), [(0.0, 0.0)]).append((float(s), float(v)))
    if missing := [k for k in keys if k not in curves]:
        shown = ", ".join(f"({layer}, {comp})" for layer, comp in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise SpecError(f"{where} has no {probe_method} probes ({metric}) for (layer, component) {shown}{more}; "
                        "probe them, or leave them out with components= / exclude=", "probes")  # fmt: skip
    return {k: curves[k] for k in keys}


def _fisher_curves(lm: LoadedModel, windows: Windows, keys, names, *, batch_size, show_progress
                   ) -> dict[tuple[int, str], list[tuple[float, float]]]:  # fmt: skip
    """OBD curves: pruning fraction ``s`` of an entry costs the sum of its ``s * n`` smallest ``0.5 F_ii w_i**2``."""
    reg = lm.registry
    scores = weight_scores(lm, windows, "fisher", components=names, batch_size=batch_size,
                           show_progress=show_progress)  # fmt: skip
    curves = {}
    for layer, comp in keys:
        owner = reg.owner(lm.model, layer, comp)
        parts = []
        for t in reg.weights(comp):
            fisher = scores[(layer, comp, t.describe())].double() / len(windows)  # shaped like the slice
            parts.append((0.5 * fisher * t.get(owner).detach().double() ** 2).flatten())  # (numel,)
        saliency = torch.cat(parts).sort().values  # (n,) ascending
        cumsum = torch.cat([saliency.new_zeros(1), saliency.cumsum(0)])  # (n + 1,) cost of pruning the k smallest
        n = saliency.numel()
        curves[(layer, comp)] = [(s, cumsum[int(math.floor(s * n + 1e-9))].item()) for s in FISHER_GRID]
    return curves


@dataclass
class AllocationContext:
    """What an allocator works on: the model, the (layer, component) entries and their sizes, and its inputs.

    Attributes:
        lm: The model.
        keys: The (layer, component) entries to schedule, layer-major, in registry order.
        n: (E,) float64 parameters per entry.
        layer_of: (E,) layer of each entry.
        common: The options every method takes (budget, bounds, components...).
        windows: Calibration windows (n, L), or None when none were given.
        probes: Probe results (a frame, ``probes.csv`` or its directory), or None when none were given.
        show_progress: Whether to show tqdm bars.
    """

    lm: LoadedModel
    keys: list[tuple[int, str]]  # layer-major, registry order
    n: torch.Tensor  # (E,) float64 parameters per entry
    layer_of: torch.Tensor  # (E,) layer of each entry
    common: AllocateOptions
    windows: Windows | None
    probes: pd.DataFrame | str | os.PathLike | None
    show_progress: bool

    def fit(self, raw: torch.Tensor) -> torch.Tensor:
        """:func:`fit_budget` of raw sparsities (E,) under the budget and bounds."""
        c = self.common
        return fit_budget(raw, self.n, c.budget, c.min_sparsity, c.max_sparsity)


@METHODS.implement("uniform")
def _uniform(ctx: AllocationContext, options) -> tuple[torch.Tensor, dict]:
    return ctx.fit(torch.full((len(ctx.keys),), ctx.common.budget)), {}


@METHODS.implement("depth")
def _depth(ctx: AllocationContext, options: DepthOptions) -> tuple[torch.Tensor, dict]:
    c, spread = ctx.common, abs(options.depth_spread)
    lo, hi = c.budget - spread, c.budget + spread
    if ctx.lm.registry.n_layers > 1 and (lo < 0 or hi >= 1):
        raise SpecError(f"{options.depth_spread:g} ramps layers from {lo:g} to {hi:g}, outside [0, 1); allowed: "
                        f"|depth_spread| < {min(c.budget, 1 - c.budget):g} at budget {c.budget:g}",
                        "options.depth_spread")  # fmt: skip
    if ctx.lm.registry.n_layers > 1 and (lo < c.min_sparsity or hi > c.max_sparsity):
        logger.warning("depth_spread %g ramps layers from %g to %g: clipped to [min_sparsity, max_sparsity] = [%g, %g] "
                       "and the rest shifted to keep the budget", options.depth_spread, lo, hi, c.min_sparsity,
                       c.max_sparsity)  # fmt: skip
    ramp = depth_ramp(ctx.lm.registry.n_layers, ctx.common.budget, options.depth_spread)  # (L,)
    return ctx.fit(ramp[ctx.layer_of]), {"depth_spread": options.depth_spread}


@METHODS.implement("owl")
def _owl(ctx: AllocationContext, options: OwlOptions) -> tuple[torch.Tensor, dict]:
    reg = ctx.lm.registry
    names = list(dict.fromkeys(c for _, c in ctx.keys))
    scores = weight_scores(ctx.lm, ctx.windows, "wanda", components=names, batch_size=ctx.common.batch_size,
                           show_progress=ctx.show_progress)  # fmt: skip
    ratios = []
    for layer in range(reg.n_layers):
        flat = [scores[(layer, comp, t.describe())].flatten() for lyr, comp in ctx.keys if lyr == layer
                for t in reg.weights(comp)]  # fmt: skip
        ratios.append(owl_outlier_ratio(torch.cat(flat), options.owl_m))
    per_layer = owl_sparsity(ratios, ctx.common.budget, options.owl_lambda)  # (L,)
    meta = {"owl_m": options.owl_m, "owl_lambda": options.owl_lambda, "outlier_ratios": ratios,
            "windows": _windows_record(ctx.windows)}  # fmt: skip
    return ctx.fit(per_layer[ctx.layer_of]), meta


@METHODS.implement("sensitivity")
def _sensitivity(ctx: AllocationContext, options: SensitivityOptions) -> tuple[torch.Tensor, dict]:
    meta: dict = {"source": options.source}
    if options.source == "probes":
        df, path = _read_probes(ctx.probes)
        curves = _probe_curves(df, ctx.keys, options.probe_method, options.metric, path or "the probes frame")
        meta.update(probe_method=options.probe_method, metric=options.metric, probes=path,
                    probes_task=_probes_task(path))  # fmt: skip
    else:
        names = list(dict.fromkeys(c for _, c in ctx.keys))
        curves = _fisher_curves(ctx.lm, ctx.windows, ctx.keys, names, batch_size=ctx.common.batch_size,
                                show_progress=ctx.show_progress)  # fmt: skip
        meta.update(grid=list(FISHER_GRID), windows=_windows_record(ctx.windows))
    c = ctx.common
    got = greedy_allocate([curves[k] for k in ctx.keys], ctx.n, c.budget, c.min_sparsity, c.max_sparsity)
    meta["predicted_loss"] = got.loss
    return got.sparsity, meta


@METHODS.implement("unit")
def _unit(ctx: AllocationContext, options: UnitOptions) -> tuple[torch.Tensor, dict]:
    reg, offset = ctx.lm.registry, options.unit_offset
    present = sorted({reg.component(c).unit for _, c in ctx.keys})
    if absent := [k for k in offset if k not in present]:
        raise SpecError(f"{absent[0]!r}: this {ctx.lm.arch} model has no {absent[0]} weights in the schedule; allowed "
                        f"unit kinds: {', '.join(present)}", "options.unit_offset")  # fmt: skip
    raw = torch.tensor([ctx.common.budget + offset.get(reg.component(c).unit, 0.0) for _, c in ctx.keys],
                       dtype=torch.float64)  # (E,)
    return ctx.fit(raw), {"unit_offset": {k: float(v) for k, v in sorted(offset.items())}}



def allocate(
    model: LoadedModel | nn.Module,
    method: str,
    budget: float,
    *,
    windows: Windows | None = None,
    probes: pd.DataFrame | str | os.PathLike | None = None,
    show_progress: bool = True,
    **options,
) -> Schedule:
    """Spread an overall sparsity ``budget`` over the prunable (layer, component) entries of a model.

    Methods (:data:`METHODS`):

    * ``uniform``: every entry at ``budget``.
    * ``depth``: :func:`depth_ramp` over layers (``budget - depth_spread`` at layer 0 to ``budget + depth_spread``
      at the last), the same for every component of a layer.
    * ``owl``: OWL (Yin et al., 2023): per layer, the outlier ratio (fraction of WANDA scores ``|W_ij| ||X_j||``
      above ``owl_m`` times their mean) over all the layer's scheduled weights, then :func:`owl_sparsity` with
      ``owl_lambda``; the same for every component of a layer. Needs ``windows``.
    * ``sensitivity``: :func:`greedy_allocate` on per-entry loss curves: from ``probes`` (``source="probes"``: the
      ``probe_method`` sparsify probes' ``metric``, averaged over seeds, plus ``(0, 0)``), or from the Fisher
      diagonal (``source="fisher"``: OBD, pruning a fraction ``s`` of an entry costs the sum of its ``s * n``
      smallest ``0.5 * (F_ii / n_windows) * w_i**2``, sampled at :data:`FISHER_GRID`; needs ``windows``).

    Every method meets ``budget`` exactly (parameter-weighted, up to float rounding) with each entry in
    ``[min_sparsity, max_sparsity]``; ``uniform``, ``depth`` and ``owl`` go through :func:`fit_budget`.

    Args:
        model: A ``LoadedModel`` (instrumented for ``owl`` and ``fisher``) or HF Mamba causal LM.
        method: A name in :data:`METHODS`.
        budget: Overall fraction of the scheduled weights to prune, in [0, 1).
        windows: Calibration windows (n, L) for ``owl`` and ``source="fisher"``.
        probes: For ``sensitivity`` with ``source="probes"``: a probes frame (:func:`sensitivity.probe`), its
            ``probes.csv`` or the directory holding it.
        show_progress: Show tqdm bars.
        **options: :class:`AllocateOptions` (``components``, ``exclude``, ``min_sparsity``, ``max_sparsity``,
            ``seed``, ``batch_size``) and the method's own: :class:`DepthOptions` (``depth_spread``),
            :class:`OwlOptions` (``owl_m``, ``owl_lambda``), :class:`SensitivityOptions` (``source``,
            ``probe_method``, ``metric``).

    Returns:
        A :class:`~sensitivity.allocation.Schedule` whose ``meta`` records the method's parameters (and, for
        ``sensitivity``, the predicted total loss and where the curves came from).

    Raises:
        SpecError: Unknown method or option, a value out of range, a missing input (windows, probes), entries
            without probe curves, an infeasible budget.

    Examples:
        >>> lm = load_model()
        >>> probes = probe(lm, kinds=["wanda"], components=["z", "x", "B", "C", "dt", "out_proj"])
        >>> schedule = allocate(lm, "sensitivity", 0.5, probes=probes)
        >>> schedule.to_yaml("runs/schedule.yaml")
    """
    entry = METHODS[method]
    own = {k: v for k, v in options.items() if k not in AllocateOptions.model_fields}
    common = AllocateOptions(budget=budget, **{k: v for k, v in options.items() if k in AllocateOptions.model_fields})
    opts = entry.validate(own)
    if entry.needs_calibration(opts) and (windows is None or len(windows) == 0):
        raise SpecError(f"{method} needs calibration windows", "windows")
    if needs_probes(method, opts) and probes is None:
        raise SpecError(f"{method} needs probes (a probes frame, probes.csv or its directory)", "probes")
    lm = as_loaded(model)
    reg = lm.registry
    names = reg.resolve(common.components, common.exclude)
    sizes = reg.weight_sizes(lm.model, names)
    keys = list(sizes)  # layer-major, registry order
    ctx = AllocationContext(lm, keys, torch.tensor([sizes[k] for k in keys], dtype=torch.float64),
                            torch.tensor([layer for layer, _ in keys]), common, windows, probes, show_progress)
    meta: dict = {"min_sparsity": common.min_sparsity, "max_sparsity": common.max_sparsity, "seed": common.seed}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(common.seed)
        s, extra = entry.fn(ctx, opts)  # (E,)
    meta.update(extra)
    schedule = Schedule(arch=reg.arch, n_layers=reg.n_layers, sparsity=dict(zip(keys, s.tolist())), params=sizes,
                        method=method, budget=common.budget, exclude=common.exclude, meta=meta,
                        units=reg.units if reg.is_hybrid else ())  # fmt: skip
    logger.info("%s allocation of %s at %.4f: per layer %s", method, lm.name, common.budget,
                ", ".join(f"{x:.3f}" for x in schedule.per_layer()))  # fmt: skip
    return schedule

"""Report figures: one public function per figure, each returning a :class:`matplotlib.figure.Figure`, and
:func:`make_figures`, which writes them all as PNGs.

The functions build ``Figure`` objects directly, never through pyplot, so they open no window, register nothing
globally, work under any backend (saving goes through Agg) and can be called one at a time from a notebook. Each
draws inside a seaborn "whitegrid" style context, so global matplotlib state is left as it was. Dollar signs in
labels from the tables are escaped, so a ``$`` in a method label is drawn as is rather than read as mathtext.

Which table feeds which figure (the tables are the tidy frames the report pipeline collects):

==========================  ====================  ==============================================================
file                        table                 function
==========================  ====================  ==============================================================
sensitivity_heatmap.png     ``probes``            :func:`sensitivity_heatmap`
sparsity_curves.png         ``probes``            :func:`sparsity_curves`
perplexity_vs_sparsity.png  ``grid``              :func:`perplexity_vs_sparsity`
schedule.png                ``schedule``          :func:`schedule_heatmap`
drift.png                   ``drift``             :func:`drift_plot`
dynamics.png                ``dynamics_samples``  :func:`dynamics_plot`
patching.png                ``patching``          :func:`patching_heatmap` (``verdicts`` / ``grid`` pick the label)
objectives.png              ``objectives``        :func:`objectives_vs_sparsity` (reports with task objectives)
recall_pairs.png            ``curves``            :func:`recall_vs_pairs`
positions.png               ``curves``            :func:`position_curves`
==========================  ====================  ==============================================================

On hybrids (a ``units`` mapping naming more than one unit kind) the layer x component heatmaps turn around: one row
per component present, grouped by unit kind (SSM, attention, MLP, MoE, whole blocks) and labelled with it, one
column per layer labelled with its kind (``layer_kinds``, e.g. ``1 attention+mlp``); a cell of a component its
layer does not hold stays blank.

Examples:
    >>> fig = sensitivity_heatmap(tables["probes"], kind="zero")
    >>> fig.savefig("heatmap.png", dpi=110)
    >>> make_figures(tables, meta, Path("report/figures"))["drift"]
    PosixPath('report/figures/drift.png')
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    "ANNOTATE_MAX_LAYERS",
    "DEFAULT_THRESHOLDS",
    "FIGURES",
    "OBJECTIVE_FIGURES",
    "METRIC_LABELS",
    "WHOLE_UNITS",
    "component_probes",
    "component_units",
    "default_ablation_kind",
    "drift_plot",
    "dynamics_plot",
    "make_figures",
    "objectives_vs_sparsity",
    "position_curves",
    "recall_vs_pairs",
    "patching_heatmap",
    "perplexity_vs_sparsity",
    "schedule_heatmap",
    "sensitivity_heatmap",
    "sparsity_curves",
    "worst_patching_target",
]

logger = logging.getLogger(__name__)

FIGURES = {
    "sensitivity_heatmap": "probes",
    "sparsity_curves": "probes",
    "perplexity_vs_sparsity": "grid",
    "schedule": "schedule",
    "drift": "drift",
    "dynamics": "dynamics_samples",
    "patching": "patching",
}
"""Figure name (the PNG's stem and the key :func:`make_figures` returns) -> the table it needs."""
OBJECTIVE_FIGURES = {"objectives": "objectives", "recall_pairs": "curves", "positions": "curves"}
"""The figures of reports with task objectives (left out quietly when their tables are absent)."""
DEFAULT_THRESHOLDS = {"healthy": 1.2, "collapsed": 2.0}
"""Perplexity-ratio bands: below ``healthy`` is healthy, from ``collapsed`` up is collapsed, degraded between."""
ANNOTATE_MAX_LAYERS = 16
"""Heatmaps write each cell's value when they have at most this many layers."""
METRIC_LABELS = {
    "delta_nll": "Δ NLL (nats/token)",
    "ppl_ratio": "perplexity ratio (ablated / dense)",
    "kl": "KL divergence (nats/token)",
}
"""Axis labels, with units, of the probe metrics."""
QUANTITY_LABELS = {"delta": "Δ = softplus(dt) (step size)", "decay": "decay exp(Δ·A) per step"}
SPARSIFY_KINDS = ("wanda", "magnitude")
UNIT_COMPONENTS = ("head", "attn_head", "state")
"""Probe components that are per-unit (they carry an ``index``) and never appear in layer x component heatmaps."""
WHOLE_UNITS = {"mixer": "ssm", "head": "ssm", "state": "ssm", "attention": "attention", "attn_head": "attention",
               "mlp": "mlp", "moe": "moe", "block": "block"}  # fmt: skip
"""Whole-unit probe and patching rows -> the unit kind they belong to (``block``: the whole block)."""
UNIT_ORDER = ("ssm", "attention", "mlp", "moe", "block")
"""The order unit kinds are grouped in."""
_ZONE_COLOURS = {"healthy": "#2ca02c", "degraded": "#ff7f0e", "collapsed": "#d62728"}
_SINGLE_MARKERS = ("D", "s", "^", "P", "X", "v", "<", ">", "h")


@contextmanager
def _style() -> Iterator[None]:
    """Seaborn "whitegrid" plus compact fonts, undone on exit."""
    rc = {
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.labelsize": 9,
        "legend.fontsize": 8,
        "legend.title_fontsize": 8,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
    }
    with sns.axes_style("whitegrid"), mpl.rc_context(rc):
        yield


def _require(df: pd.DataFrame | None, columns: Iterable[str], what: str) -> pd.DataFrame:
    """``df`` if it has rows and ``columns``; otherwise a ValueError naming what is missing."""
    if df is None or len(df) == 0:
        raise ValueError(f"the {what} table is missing or empty")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"the {what} table lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})"
        )
    return df


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` as floats, or all-NaN when the table does not have it."""
    if name not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[name], errors="coerce")


def _component_order(components: Iterable, units: Mapping[str, str] | None = None) -> list:
    """Components in order of first appearance (the registry's order in pipeline tables), whole-mixer rows last;
    with ``units`` (component -> unit kind) grouped by unit kind, each group's whole-unit row last."""
    order = list(dict.fromkeys(components))
    if units:
        rank = {kind: i for i, kind in enumerate(UNIT_ORDER)}
        group = lambda c: rank.get(units.get(c, "block"), len(rank))  # noqa: E731
        return sorted(order, key=lambda c: (group(c), c in WHOLE_UNITS, order.index(c)))
    return [c for c in order if c != "mixer"] + [c for c in order if c == "mixer"]


def component_units(components: pd.DataFrame | None) -> dict[str, str]:
    """Component -> unit kind, from the report's ``components`` table (its ``unit`` column), plus the whole-unit
    rows (:data:`WHOLE_UNITS`); empty when the table has no ``unit`` column.

    Examples:
        >>> component_units(tables["components"])["q"]
        'attention'
    """
    if components is None or not {"component", "unit"} <= set(components.columns):
        return {}
    return {**WHOLE_UNITS, **dict(zip(components["component"], components["unit"]))}


def _hybrid(units: Mapping[str, str] | None, components: Iterable) -> bool:
    """Whether the components shown span more than one unit kind (a hybrid's table)."""
    return bool(units) and len({units.get(c, "block") for c in components} - {"block"}) > 1


def _layer_label(layer, layer_kinds) -> str:
    """'3' or, with the layer kinds, the layer above its kind ('3', newline, 'attention+mlp')."""
    try:
        return f"{layer}\n{layer_kinds[int(layer)]}" if layer_kinds else str(layer)
    except (IndexError, TypeError, ValueError):
        return str(layer)


def _integral_index(index: pd.Index) -> pd.Index:
    """Layer numbers stored as floats (0.0, 1.0) shown as ints."""
    values = pd.to_numeric(pd.Series(index), errors="coerce")
    if values.notna().all() and np.allclose(values, np.round(values)):
        return pd.Index(values.round().astype(int), name=index.name)
    return index


def _sparsity_text(sparsity) -> str:
    """0.5 -> '50%'; NaN -> ''."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        return str(sparsity)
    return "" if math.isnan(value) else f"{value:.0%}"


def _literal(text) -> str:
    """Text drawn as is: ``$`` escaped so matplotlib does not read it as mathtext."""
    return str(text).replace("$", r"\$")


def _run_label(label, sparsity) -> str:
    """'wanda @ 50%' (or just the label when the sparsity is unknown)."""
    text = _sparsity_text(sparsity)
    return f"{label} @ {text}" if text else str(label)


def _runs(df: pd.DataFrame) -> list[tuple]:
    """Distinct (label, sparsity) pairs in table order (NaN sparsities count as one)."""
    pairs = df[["label", "sparsity"]].drop_duplicates()
    return [(label, float(sparsity)) for label, sparsity in pairs.itertuples(index=False, name=None)]


def _matrix(df: pd.DataFrame, value: str, units: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Layer x component mean of ``value`` (over seeds and repeated rows), components in table order (grouped by
    unit kind with ``units``)."""
    order = _component_order(df["component"], units if _hybrid(units, df["component"]) else None)
    data = df.assign(**{value: pd.to_numeric(df[value], errors="coerce")})
    matrix = data.pivot_table(index="layer", columns="component", values=value, aggfunc="mean")
    matrix = matrix.reindex(columns=[c for c in order if c in matrix.columns]).sort_index()
    matrix.index = _integral_index(matrix.index)
    if matrix.size == 0 or matrix.isna().all().all():
        raise ValueError(f"no finite {value!r} values to draw")
    return matrix


def _heatmap(
    matrix: pd.DataFrame,
    *,
    title: str,
    cbar_label: str,
    annotate: bool | None,
    fmt: str,
    cmap: str | None = None,
    center: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    units: Mapping[str, str] | None = None,
    layer_kinds: list[str] | None = None,
) -> Figure:
    """Layer x component heatmap; sequential colours for one-signed data, diverging around 0 otherwise. On a
    hybrid (``units`` spanning several unit kinds) component x layer instead, rows grouped and labelled by unit."""
    if _hybrid(units, matrix.columns):
        return _unit_heatmap(matrix, title=title, cbar_label=cbar_label, annotate=annotate, fmt=fmt, cmap=cmap,
                             center=center, vmin=vmin, vmax=vmax, units=units, layer_kinds=layer_kinds)  # fmt: skip
    n_layers, n_components = matrix.shape
    annotate = n_layers <= ANNOTATE_MAX_LAYERS if annotate is None else annotate
    values = matrix.to_numpy(dtype=float)
    if cmap is None:
        signed = np.nanmin(values) < 0 < np.nanmax(values)
        cmap, center = ("vlag", 0.0) if signed else ("rocket_r", center)
    width = min(3.0 + 0.8 * n_components, 16.0)
    height = min(1.8 + (0.4 if annotate else 0.2) * n_layers, 18.0)
    with _style():
        fig = Figure(figsize=(width, height), layout="constrained")
        ax = fig.subplots()
        with warnings.catch_warnings():  # seaborn 0.13 calls Colormap.set_bad, pending deprecation in matplotlib 3.11
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sns.heatmap(
                matrix.astype(float),
                ax=ax,
                annot=annotate,
                fmt=fmt,
                cmap=cmap,
                center=center,
                vmin=vmin,
                vmax=vmax,
                linewidths=0.5,
                linecolor="white",
                annot_kws={"fontsize": 7},
                cbar_kws={"label": cbar_label},
            )
        ax.set_title(_literal(title))
        ax.set_xlabel("component")
        ax.set_ylabel("layer")
        ax.tick_params(axis="y", rotation=0)
        ax.tick_params(axis="x", rotation=45 if n_components > 8 else 0)
    return fig


def _unit_heatmap(matrix: pd.DataFrame, *, title: str, cbar_label: str, annotate: bool | None, fmt: str,
                  cmap: str | None, center: float | None, vmin: float | None, vmax: float | None,
                  units: Mapping[str, str], layer_kinds: list[str] | None) -> Figure:  # fmt: skip
    """Component x layer heatmap of a hybrid: one row per component present, grouped by unit kind (a rule between
    groups, the kind in each row label), one column per layer labelled with its kind; absent pairs blank."""
    data = matrix.T  # (components, layers)
    n_components, n_layers = data.shape
    annotate = n_layers <= ANNOTATE_MAX_LAYERS if annotate is None else annotate
    values = data.to_numpy(dtype=float)
    if cmap is None:
        signed = np.nanmin(values) < 0 < np.nanmax(values)
        cmap, center = ("vlag", 0.0) if signed else ("rocket_r", center)
    kinds = [units.get(c, "block") for c in data.index]
    width = min(4.0 + (0.9 if layer_kinds else 0.6) * n_layers, 18.0)
    height = min(1.6 + 0.32 * n_components, 18.0)
    with _style():
        fig = Figure(figsize=(width, height), layout="constrained")
        ax = fig.subplots()
        with warnings.catch_warnings():  # seaborn 0.13 calls Colormap.set_bad, pending deprecation in matplotlib 3.11
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sns.heatmap(data.astype(float), ax=ax, annot=annotate, fmt=fmt, cmap=cmap, center=center, vmin=vmin,
                        vmax=vmax, linewidths=0.5, linecolor="white", annot_kws={"fontsize": 7},
                        cbar_kws={"label": cbar_label})  # fmt: skip
        ax.grid(False)  # blank cells (components a layer does not hold) stay blank
        for i in range(1, n_components):
            if kinds[i] != kinds[i - 1]:
                ax.axhline(i, color="0.2", lw=1.2)
        ax.set_yticks(np.arange(n_components) + 0.5, [_literal(f"{c} ({k})") for c, k in zip(data.index, kinds)])
        ax.set_xticks(np.arange(n_layers) + 0.5, [_layer_label(layer, layer_kinds) for layer in data.columns])
        ax.set_title(_literal(title))
        ax.set_xlabel("layer (kind)" if layer_kinds else "layer")
        ax.set_ylabel("component (unit)")
        ax.tick_params(axis="y", rotation=0)
        ax.tick_params(axis="x", rotation=0, labelsize=7)
    return fig


def component_probes(probes: pd.DataFrame, metric: str = "delta_nll") -> pd.DataFrame:
    """Component-level probe rows of one metric: ``index`` NaN (no per-head/per-channel probes) and no ``head``
    unit rows; ``mixer`` rows stay (a whole-mixer column).

    Examples:
        >>> component_probes(probes).kind.unique()
        array(['zero', 'mean', 'magnitude', 'wanda'], dtype=object)
    """
    probes = _require(probes, ("layer", "component", "kind", "metric", "value"), "probes")
    keep = _column(probes, "index").isna().to_numpy()
    keep = keep & (probes["metric"] == metric).to_numpy()
    keep = keep & ~probes["component"].isin(UNIT_COMPONENTS).to_numpy()
    return probes.loc[keep]


def default_ablation_kind(probes: pd.DataFrame, metric: str = "delta_nll") -> str | None:
    """The ablation the sensitivity heatmap shows by default: ``zero`` when present, else the first kind (in table
    order) among component-level rows without a sparsity; None when there is none."""
    rows = component_probes(probes, metric)
    kinds = list(dict.fromkeys(rows.loc[_column(rows, "sparsity").isna().to_numpy(), "kind"]))
    if not kinds:
        return None
    return "zero" if "zero" in kinds else kinds[0]


def sensitivity_heatmap(
    probes: pd.DataFrame,
    kind: str | None = None,
    *,
    metric: str = "delta_nll",
    annotate: bool | None = None,
    units: Mapping[str, str] | None = None,
    layer_kinds: list[str] | None = None,
) -> Figure:
    """Layer x component heatmap of one probe metric for one ablation kind (mean over seeds).

    Args:
        probes: The tidy probe table (``layer, component, index, kind, sparsity, metric, value, seed``).
        kind: Ablation to show; default :func:`default_ablation_kind` (``zero`` when present).
        metric: Probe metric (``delta_nll``, ``ppl_ratio``, ``kl``).
        annotate: Write each cell's value; default when there are at most :data:`ANNOTATE_MAX_LAYERS` layers.
        units: Component -> unit kind (:func:`component_units`); on a hybrid the heatmap has one row per
            component present, grouped by unit.
        layer_kinds: Each layer's kind (``Registry.layer_kind``), for the layer labels of a hybrid.

    Raises:
        ValueError: No component-level rows of that kind and metric (or the table is empty).

    Examples:
        >>> sensitivity_heatmap(probes, kind="mean").axes[0].get_title()
        'Δ NLL (nats/token) per component, mean ablation'
    """
    rows = component_probes(probes, metric)
    kind = kind or default_ablation_kind(probes, metric)
    rows = rows.loc[(_column(rows, "sparsity").isna() & (rows["kind"] == kind)).to_numpy()]
    if rows.empty:
        raise ValueError(f"no component-level {metric!r} probes of kind {kind!r}")
    label = METRIC_LABELS.get(metric, metric)
    return _heatmap(
        _matrix(rows, "value", units),
        title=f"{label} per component, {kind} ablation",
        cbar_label=label,
        annotate=annotate,
        fmt=".3g",
        units=units,
        layer_kinds=layer_kinds,
    )


def sparsity_curves(
    probes: pd.DataFrame,
    *,
    metric: str = "delta_nll",
    methods: Iterable[str] = SPARSIFY_KINDS,
    units: Mapping[str, str] | None = None,
) -> Figure:
    """Per component, the probe metric (mean over layers and seeds) against the sparsity of pruning only that
    component, one line per component and one panel per pruning method; on a hybrid (``units``) the components
    are grouped and labelled by unit kind (``q (attention)``).

    Raises:
        ValueError: No component-level rows with a sparsity for any of ``methods``.

    Examples:
        >>> [ax.get_title() for ax in sparsity_curves(probes).axes]
        ['wanda pruning', 'magnitude pruning']
    """
    methods = list(methods)
    rows = component_probes(probes, metric)
    rows = rows.assign(sparsity=_column(rows, "sparsity"), value=pd.to_numeric(rows["value"], errors="coerce"),
                       kind=rows["kind"].astype(str))
    rows = rows.loc[(rows["sparsity"].notna() & rows["kind"].isin(methods)).to_numpy()]
    if rows.empty:
        raise ValueError(f"no component-level {metric!r} probes with a sparsity for {', '.join(methods)}")
    kinds = [k for k in methods if k in set(rows["kind"])]
    hybrid = _hybrid(units, rows["component"])
    order = _component_order(rows["component"], units if hybrid else None)
    names = {c: f"{c} ({units.get(c, 'block')})" if hybrid else c for c in order}
    curves = rows.groupby(["kind", "component", "sparsity"], as_index=False, sort=False)["value"].mean()
    palette = dict(zip(order, sns.color_palette("colorblind" if len(order) <= 10 else "husl", len(order))))
    label = METRIC_LABELS.get(metric, metric)
    with _style():
        fig = Figure(figsize=(3.0 + 3.6 * len(kinds), 3.8), layout="constrained")
        axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
        for ax, kind in zip(axes, kinds):
            sub = curves.loc[(curves["kind"] == kind).to_numpy()].sort_values("sparsity")
            for component in order:
                line = sub.loc[(sub["component"] == component).to_numpy()]
                if not line.empty:
                    name = _literal(names[component])
                    ax.plot(line["sparsity"], line["value"], marker="o", ms=4, color=palette[component], label=name)
            ax.axhline(0.0, color="0.4", lw=0.8)
            ax.set_title(_literal(f"{kind} pruning"))
            ax.set_xlabel("sparsity of the pruned component")
            ax.xaxis.set_major_formatter(ticker.PercentFormatter(1.0))
        axes[0].set_ylabel(f"{label}, mean over layers")
        handles: dict = {}
        for ax in axes:
            for handle, text in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(text, handle)
        labels = [_literal(names[c]) for c in order if _literal(names[c]) in handles]
        title = "component (unit)" if hybrid else "component"
        axes[-1].legend([handles[c] for c in labels], labels, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"{label} when one component is pruned, by sparsity")
    return fig


def perplexity_vs_sparsity(grid: pd.DataFrame, *, thresholds: Mapping[str, float] | None = None) -> Figure:
    """Perplexity ratio (pruned / dense) against sparsity, one line per method label (a marker for labels with
    a single point, such as N:M), on a log axis shaded by verdict band.

    Args:
        grid: The pruning grid (``label, sparsity, ppl_ratio``; ``verdict`` marks the dense row).
        thresholds: ``{"healthy": h, "collapsed": c}`` band edges; default :data:`DEFAULT_THRESHOLDS`.
            Ratios that are not finite (a collapsed model whose perplexity overflowed) are drawn as ▲ at the top.

    Raises:
        ValueError: Empty table or no positive ratio.
    """
    grid = _require(grid, ("label", "sparsity", "ppl_ratio"), "grid")
    bands = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    healthy, collapsed = float(bands["healthy"]), float(bands["collapsed"])
    df = grid.assign(sparsity=_column(grid, "sparsity"), ratio=_column(grid, "ppl_ratio"))
    df = df.loc[(df["ratio"].notna() & df["sparsity"].notna()).to_numpy()]
    finite = df["ratio"][np.isfinite(df["ratio"].to_numpy()) & (df["ratio"].to_numpy() > 0)]
    if finite.empty:
        raise ValueError("the grid has no positive finite ppl_ratio")
    low = min(float(finite.min()), 1.0, healthy) / 1.25
    high = max(float(finite.max()), collapsed) * 1.6
    top = high / 1.25
    verdicts = df["verdict"] if "verdict" in df.columns else pd.Series("", index=df.index)
    dense = ((df["label"] == "dense") | (verdicts == "dense")).to_numpy()
    labels = list(dict.fromkeys(df.loc[~dense, "label"]))
    colours = dict(zip(labels, sns.color_palette("colorblind" if len(labels) <= 10 else "husl", len(labels))))
    markers = iter(_SINGLE_MARKERS * (1 + len(labels) // len(_SINGLE_MARKERS)))
    with _style():
        fig = Figure(figsize=(7.5, 4.4), layout="constrained")
        ax = fig.subplots()
        edges = {"healthy": (low, healthy), "degraded": (healthy, collapsed), "collapsed": (collapsed, high)}
        names = {
            "healthy": f"healthy (< {healthy:g})",
            "degraded": f"degraded ({healthy:g} to {collapsed:g})",
            "collapsed": f"collapsed (≥ {collapsed:g})",
        }
        zones = []
        for zone, (lo, hi) in edges.items():
            ax.axhspan(lo, hi, color=_ZONE_COLOURS[zone], alpha=0.09, lw=0, zorder=0)
            zones.append(Patch(facecolor=_ZONE_COLOURS[zone], alpha=0.25, label=names[zone]))
        ax.axhline(1.0, ls="--", lw=1.0, color="0.3", zorder=1)
        if dense.any():
            ax.scatter([0.0], [1.0], marker="*", s=120, color="black", zorder=4, label="dense")
        for label in labels:
            sub = df.loc[(df["label"] == label).to_numpy() & ~dense].sort_values("sparsity")
            ok = np.isfinite(sub["ratio"].to_numpy()) & (sub["ratio"].to_numpy() > 0)
            colour = colours[label]
            if len(sub) >= 2:
                ax.plot(
                    sub["sparsity"][ok],
                    sub["ratio"][ok],
                    marker="o",
                    ms=4,
                    color=colour,
                    label=_literal(label),
                    zorder=3,
                )
            else:
                ax.scatter(
                    sub["sparsity"][ok],
                    sub["ratio"][ok],
                    marker=next(markers),
                    s=45,
                    color=colour,
                    edgecolor="black",
                    lw=0.5,
                    label=_literal(label),
                    zorder=4,
                )
            if (~ok).any():
                ax.scatter(
                    sub["sparsity"][~ok],
                    np.full(int((~ok).sum()), top),
                    marker="^",
                    s=45,
                    color=colour,
                    edgecolor="black",
                    lw=0.5,
                    zorder=4,
                )
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(ticker.FixedLocator(_ratio_ticks(low, high, (healthy, collapsed))))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_major_formatter(ticker.PercentFormatter(1.0))
        ax.set_xlim(-0.03, max(float(df["sparsity"].max()), 0.5) + 0.05)
        ax.set_xlabel("sparsity (fraction of prunable weights or units removed)")
        ax.set_ylabel("perplexity ratio (pruned / dense)")
        ax.set_title("Perplexity ratio vs sparsity (dashed: dense; ▲: not finite)")
        handles, texts = ax.get_legend_handles_labels()
        ax.legend(
            [*handles, *zones],
            [*texts, *(z.get_label() for z in zones)],
            title="method / verdict band",
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
        )
    return fig


def _ratio_ticks(low: float, high: float, extra: Iterable[float]) -> list[float]:
    """Readable log-axis ticks between ``low`` and ``high``: 1-1.2-1.5-2-3-5 per decade for narrow ranges (plus the
    band edges), 1-2-5 when they span more than 100x, 1 per decade beyond 1e4x."""
    span = high / low
    steps = (1.0, 1.2, 1.5, 2.0, 3.0, 5.0) if span < 100 else (1.0, 2.0, 5.0) if span < 1e4 else (1.0,)
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    ticks = {round(step * 10.0**d, 12) for d in decades for step in steps}
    if span < 1e4:
        ticks |= {float(v) for v in extra}
    return sorted(t for t in ticks if low <= t <= high)


def schedule_heatmap(
    schedule: pd.DataFrame,
    *,
    budget: float | None = None,
    annotate: bool | None = None,
    units: Mapping[str, str] | None = None,
    layer_kinds: list[str] | None = None,
) -> Figure:
    """Layer x component heatmap of the schedule's sparsity.

    Args:
        schedule: ``layer, component, sparsity`` (``params`` unused here).
        budget: The schedule's global sparsity, shown in the title when given.
        annotate: Write each cell's value; default when there are at most :data:`ANNOTATE_MAX_LAYERS` layers.
        units: Component -> unit kind; on a hybrid, rows per component grouped by unit (see the module doc).
        layer_kinds: Each layer's kind, for the layer labels of a hybrid.
    """
    schedule = _require(schedule, ("layer", "component", "sparsity"), "schedule")
    matrix = _matrix(schedule, "sparsity", units)
    title = "Sensitivity schedule: sparsity per layer and component"
    if budget is not None and not (isinstance(budget, float) and math.isnan(budget)):
        title += f" (budget {float(budget):.0%})"
    top = float(np.nanmax(matrix.to_numpy(dtype=float)))
    return _heatmap(
        matrix,
        title=title,
        cbar_label="sparsity (fraction pruned)",
        annotate=annotate,
        fmt=".2f",
        cmap="mako_r",
        vmin=0.0,
        vmax=max(top, 1e-9),
        units=units,
        layer_kinds=layer_kinds,
    )


def drift_plot(drift: pd.DataFrame, *, layer_kinds: list[str] | None = None) -> Figure:
    """Relative error of the residual stream after each layer (pruned vs dense), one line per (label, sparsity);
    the y axis is logarithmic when the positive values span more than 100x.

    Args:
        drift: ``label, sparsity, layer, rel_error`` (``cosine`` unused here).
        layer_kinds: Each layer's kind (hybrids): the layer ticks name it.
    """
    drift = _require(drift, ("label", "layer", "rel_error"), "drift")
    df = drift.assign(
        sparsity=_column(drift, "sparsity"), rel_error=_column(drift, "rel_error"), layer=_column(drift, "layer")
    )
    df = df.loc[df["rel_error"].notna().to_numpy()]
    if df.empty:
        raise ValueError("the drift table has no rel_error values")
    runs = _runs(df)
    colours = sns.color_palette("colorblind" if len(runs) <= 10 else "husl", len(runs))
    values = df["rel_error"].to_numpy()
    positive = values[values > 0]
    log = positive.size > 0 and (values > 0).all() and positive.max() / positive.min() > 100
    with _style():
        fig = Figure(figsize=(7.5, 4.0), layout="constrained")
        ax = fig.subplots()
        for colour, (label, sparsity) in zip(colours, runs):
            same = (df["label"] == label).to_numpy() & (
                df["sparsity"].isna().to_numpy() if pd.isna(sparsity) else np.isclose(df["sparsity"], sparsity)
            )
            line = df.loc[same].groupby("layer")["rel_error"].mean()
            ax.plot(
                line.index, line.to_numpy(), marker="o", ms=3, color=colour, label=_literal(_run_label(label, sparsity))
            )
        if log:
            ax.set_yscale("log")
        layers = sorted({int(v) for v in df["layer"].dropna()})
        if layer_kinds and len(layers) <= 2 * ANNOTATE_MAX_LAYERS:
            ax.set_xticks(layers, [_layer_label(layer, layer_kinds) for layer in layers], fontsize=7)
        else:
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("layer (kind)" if layer_kinds else "layer")
        ax.set_ylabel("relative error ‖h_pruned − h_dense‖ / ‖h_dense‖")
        ax.set_title("Residual-stream drift after each layer, pruned vs dense")
        ax.legend(title="model", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def dynamics_plot(samples: pd.DataFrame, *, quantities: Iterable[str] = ("delta", "decay"), bins: int = 40) -> Figure:
    """Distributions of per-token SSM quantities, dense vs pruned: one column per quantity, one row per pruned
    model (label and sparsity), hue = model, pooled over layers; Δ goes on a log axis when it spans over 100x.

    Args:
        samples: ``label, sparsity, layer, quantity, model ("dense"/"pruned"), value``.
        quantities: Quantities to draw, in column order (those absent are skipped).
        bins: Histogram bins, shared by dense and pruned in each panel.
    """
    samples = _require(samples, ("label", "quantity", "model", "value"), "dynamics_samples")
    df = samples.assign(sparsity=_column(samples, "sparsity"), value=_column(samples, "value"))
    df = df.loc[np.isfinite(df["value"].to_numpy())]
    columns = [q for q in quantities if q in set(df["quantity"])]
    if not columns:
        raise ValueError(f"no dynamics samples of {', '.join(quantities)}")
    runs = _runs(df)
    log_scale = {}
    for quantity in columns:
        values = df.loc[(df["quantity"] == quantity).to_numpy(), "value"].to_numpy()
        lo, hi = np.quantile(values, [0.01, 0.99]) if values.size else (0.0, 0.0)
        log_scale[quantity] = bool(quantity == "delta" and (values > 0).all() and lo > 0 and hi / lo > 100)
    hue_order = [m for m in ("dense", "pruned") if m in set(df["model"])] + sorted(
        set(df["model"]) - {"dense", "pruned"}
    )
    palette = dict(zip(hue_order, ("#4c72b0", "#dd8452", "#55a868", "#c44e52")))
    with _style():
        fig = Figure(figsize=(1.0 + 4.2 * len(columns), 0.8 + 2.5 * len(runs)), layout="constrained")
        axes = fig.subplots(len(runs), len(columns), squeeze=False, sharex="col")
        for row, (label, sparsity) in enumerate(runs):
            same = (df["label"] == label).to_numpy() & (
                df["sparsity"].isna().to_numpy() if pd.isna(sparsity) else np.isclose(df["sparsity"], sparsity)
            )
            for col, quantity in enumerate(columns):
                ax = axes[row, col]
                sub = df.loc[same & (df["quantity"] == quantity).to_numpy()]
                ax.set_title(_literal(f"{_run_label(label, sparsity)}: {QUANTITY_LABELS.get(quantity, quantity)}"))
                if sub.empty:
                    ax.text(0.5, 0.5, "no samples", transform=ax.transAxes, ha="center", va="center")
                    continue
                sns.histplot(
                    data=sub,
                    x="value",
                    hue="model",
                    hue_order=[m for m in hue_order if m in set(sub["model"])],
                    palette=palette,
                    stat="density",
                    common_norm=False,
                    common_bins=True,
                    element="step",
                    bins=bins,
                    log_scale=log_scale[quantity],
                    ax=ax,
                )
                ax.set_xlabel(QUANTITY_LABELS.get(quantity, quantity) if row == len(runs) - 1 else "")
                ax.set_ylabel("density" if col == 0 else "")
                legend = ax.get_legend()
                if legend is not None and (row, col) != (0, 0):
                    legend.remove()
        fig.suptitle("SSM dynamics per token, dense vs pruned (pooled over layers)")
    return fig


def worst_patching_target(
    patching: pd.DataFrame, verdicts: pd.DataFrame | None = None, grid: pd.DataFrame | None = None
) -> tuple[str, float]:
    """The (label, sparsity) among those with patching rows whose perplexity ratio is largest, looked up in
    ``verdicts`` and then ``grid``; the first in table order when neither knows any of them.

    Raises:
        ValueError: No patching rows with a ``recovered`` value.
    """
    patching = _require(patching, ("label", "layer", "component", "recovered"), "patching")
    rows = patching.loc[_column(patching, "recovered").notna().to_numpy()]
    if rows.empty:
        raise ValueError("the patching table has no recovered values")
    targets = _runs(rows.assign(sparsity=_column(rows, "sparsity")))

    def ratio(label, sparsity) -> float:
        for table in (verdicts, grid):
            if table is None or len(table) == 0 or not {"label", "ppl_ratio"} <= set(table.columns):
                continue
            same = (table["label"] == label).to_numpy()
            if not pd.isna(sparsity) and "sparsity" in table.columns:
                same = same & np.isclose(_column(table, "sparsity").to_numpy(), sparsity)
            found = _column(table, "ppl_ratio")[same].dropna()
            if not found.empty:
                return float(found.max())
        return -math.inf

    scores = [ratio(*target) for target in targets]
    return targets[int(np.argmax(scores))]


def patching_heatmap(
    patching: pd.DataFrame,
    *,
    label: str | None = None,
    sparsity: float | None = None,
    verdicts: pd.DataFrame | None = None,
    grid: pd.DataFrame | None = None,
    annotate: bool | None = None,
    units: Mapping[str, str] | None = None,
    layer_kinds: list[str] | None = None,
) -> Figure:
    """Layer x component heatmap of the fraction of the pruned-vs-dense loss gap closed by restoring that one
    component to dense, for one pruned model (default :func:`worst_patching_target`); diverging around 0. Whole
    units (``mixer``, and on hybrids ``attention``, ``mlp``, ``moe``) come last in their group; on a hybrid
    (``units``) the rows are the components, grouped by unit (see the module doc).

    Raises:
        ValueError: No patching rows (for ``label`` / ``sparsity`` when given).
    """
    patching = _require(patching, ("label", "layer", "component", "recovered"), "patching")
    if label is None:
        label, best = worst_patching_target(patching, verdicts, grid)
        sparsity = best if sparsity is None else sparsity
    rows = patching.loc[(patching["label"] == label).to_numpy()]
    if sparsity is not None and not pd.isna(sparsity) and "sparsity" in rows.columns:
        rows = rows.loc[np.isclose(_column(rows, "sparsity").to_numpy(), sparsity)]
    if rows.empty:
        raise ValueError(f"no patching rows for {_run_label(label, sparsity)}")
    matrix = _matrix(rows, "recovered", units)
    return _heatmap(
        matrix,
        title=f"Loss gap recovered by restoring one component to dense, {_run_label(label, sparsity)}",
        cbar_label="recovered (fraction of the Δ NLL gap)",
        annotate=annotate,
        fmt=".2f",
        cmap="vlag",
        center=0.0,
        units=units,
        layer_kinds=layer_kinds,
    )


def objectives_vs_sparsity(objectives: pd.DataFrame) -> Figure:
    """Accuracy against sparsity, one panel per objective and one line per method label; the dense accuracy is a
    dashed line (and, for the four-way choice, chance a dotted one).

    Args:
        objectives: The report's ``objectives`` table (``objective, label, sparsity, accuracy, dense_accuracy``).

    Raises:
        ValueError: Empty table.
    """
    df = _require(objectives, ("objective", "label", "sparsity", "accuracy", "dense_accuracy"), "objectives")
    tasks = list(dict.fromkeys(df["objective"]))
    with _style():
        fig = Figure(figsize=(4.2 * len(tasks), 3.6), layout="constrained")
        axes = fig.subplots(1, len(tasks), squeeze=False)[0]
        for ax, task in zip(axes, tasks):
            part = df[(df["objective"] == task).to_numpy() & (df["label"] != "dense").to_numpy()]
            for label, rows in part.groupby("label", sort=False):
                rows = rows.sort_values("sparsity")
                ax.plot(rows["sparsity"], rows["accuracy"], marker="o", label=_literal(label))
            ax.axhline(float(df.loc[df["objective"] == task, "dense_accuracy"].iloc[0]), color="black", ls="--",
                       lw=1, label="dense")  # fmt: skip
            if task == "choice":
                ax.axhline(0.25, color="grey", ls=":", lw=1, label="chance")
            ax.set(title=_literal(task), xlabel="sparsity", ylabel="accuracy", ylim=(0, 1.02))
            ax.xaxis.set_major_formatter(ticker.PercentFormatter(1.0))
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def _curve_figure(curves: pd.DataFrame, curve: str, xlabel: str, ylabel: str, title: str, logx: bool) -> Figure:
    df = _require(curves, ("label", "sparsity", "curve", "x", "value"), "curves")
    df = df[(df["curve"] == curve).to_numpy()]
    if df.empty:
        raise ValueError(f"the curves table has no {curve} rows")
    with _style():
        fig = Figure(figsize=(6.4, 3.8), layout="constrained")
        ax = fig.subplots()
        for (label, sparsity), rows in df.groupby(["label", "sparsity"], sort=False):
            rows = rows.sort_values("x")
            style = {"color": "black", "lw": 2} if label == "dense" else {}
            ax.plot(rows["x"], rows["value"], marker="o" if len(rows) < 12 else None, ms=4,
                    label=_run_label(label, sparsity) if label != "dense" else "dense", **style)  # fmt: skip
        if logx:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def recall_vs_pairs(curves: pd.DataFrame) -> Figure:
    """Associative recall accuracy against the number of key-value pairs, dense and each explained run.

    Args:
        curves: The report's ``curves`` table (``label, sparsity, curve, x, value``; rows of curve
            ``recall_pairs``).

    Raises:
        ValueError: No recall rows.
    """
    return _curve_figure(curves, "recall_pairs", "key-value pairs", "recall accuracy",
                         "Associative recall against the number of pairs", logx=True)  # fmt: skip


def position_curves(curves: pd.DataFrame) -> Figure:
    """Mean next-token NLL against position on long windows, dense and each explained run (late positions are
    where a model relies on its state).

    Args:
        curves: The report's ``curves`` table (rows of curve ``position_nll``; ``x`` is the bin's last position).

    Raises:
        ValueError: No position rows.
    """
    return _curve_figure(curves, "position_nll", "position (tokens)", "NLL (nats/token)",
                         "Next-token NLL by position", logx=False)  # fmt: skip


def _save(fig: Figure, path: Path, dpi: int) -> None:
    """PNG through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    with _style():
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    os.replace(tmp, path)


def make_figures(
    tables: Mapping[str, pd.DataFrame | None], meta: Mapping, out_dir: Path, *, dpi: int = 110
) -> dict[str, Path]:
    """Write every figure whose table is present to ``out_dir/<name>.png`` (see :data:`FIGURES`).

    A figure whose table is missing or empty, or that cannot be drawn from it (wrong columns, no rows of the
    wanted kind), is skipped with a warning, left out of the result, and any stale PNG of that name removed, so the
    folder always matches the report.

    Args:
        tables: The report tables by name (on hybrids the ``components`` table's ``unit`` column groups the
            heatmaps' components by unit kind).
        meta: Run metadata; ``thresholds`` (perplexity-ratio bands), ``budget`` and ``layer_kinds`` (each layer's
            kind, on hybrids) are used when present.
        out_dir: Folder for the PNGs (created).
        dpi: Resolution of the PNGs.

    Returns:
        Figure name -> PNG path, in :data:`FIGURES` order, for the figures written.

    Examples:
        >>> sorted(make_figures({"drift": drift}, {}, Path("figs")))
        ['drift']
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    units, kinds = component_units(tables.get("components")), meta.get("layer_kinds")
    builders = {
        "sensitivity_heatmap": lambda: sensitivity_heatmap(tables["probes"], units=units, layer_kinds=kinds),
        "sparsity_curves": lambda: sparsity_curves(tables["probes"], units=units),
        "perplexity_vs_sparsity": lambda: perplexity_vs_sparsity(tables["grid"], thresholds=meta.get("thresholds")),
        "schedule": lambda: schedule_heatmap(
            tables["schedule"], budget=meta.get("budget"), units=units, layer_kinds=kinds
        ),
        "drift": lambda: drift_plot(tables["drift"], layer_kinds=kinds),
        "dynamics": lambda: dynamics_plot(tables["dynamics_samples"]),
        "objectives": lambda: objectives_vs_sparsity(tables["objectives"]),
        "recall_pairs": lambda: recall_vs_pairs(tables["curves"]),
        "positions": lambda: position_curves(tables["curves"]),
        "patching": lambda: patching_heatmap(
            tables["patching"],
            verdicts=tables.get("verdicts"),
            grid=tables.get("grid"),
            units=units,
            layer_kinds=kinds,
        ),
    }
    written: dict[str, Path] = {}
    for name, table in {**FIGURES, **OBJECTIVE_FIGURES}.items():
        path = out_dir / f"{name}.png"
        df = tables.get(table)
        try:
            if df is None or len(df) == 0:
                raise ValueError(f"table {table!r} is missing or empty")
            fig = builders[name]()
        except (ValueError, KeyError) as err:
            (logger.debug if name in OBJECTIVE_FIGURES else logger.warning)("figure %s skipped: %s", name, err)
            if path.exists():
                path.unlink()
            continue
        _save(fig, path, dpi)
        written[name] = path
        logger.info("wrote %s", path)
    return written

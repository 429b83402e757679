"""Report rendering: the pipeline's tables and metadata as a list of :class:`Section` objects, written as GitHub
markdown (``report.md``, figures referenced under ``figures/``) and as one self-contained HTML file
(``report.html``: inline style, figures embedded as base64 PNGs, no scripts, no external links or fonts).

Sections, in order (each omitted when its tables are absent, except Summary and Reproducibility): Summary,
Components, Sensitivity, Attribution agreement, Schedule, Pruning grid, Objectives (reports with task objectives:
a subsection each), Why methods collapse, SSM dynamics, Reproducibility. A :class:`Section` of ``level`` 3 is a
subsection of the level-2 section before it.

On hybrids (``meta["layer_kinds"]``: each layer's kind, e.g. ``ssm+mlp``, ``attention+mlp``) the Components
section groups components by unit kind and gains a Layers table (each layer with its kind and units), and every
table listing layers gets a ``layer kind`` column next to its ``layer`` column.

The pages' layout lives in jinja2 templates shipped with the package (``templates/report.md.j2``,
``templates/report.html.j2`` with ``templates/report.css``); this module chooses the sections and turns them into
plain data for the templates: text cells (floats to 4 significant digits), heading anchors, base64 figures.

Examples:
    >>> paths = write_report(Path("reports/default"), tables, meta)
    >>> paths["html"], paths["markdown"], paths["drift"]
    (PosixPath('reports/default/report.html'), PosixPath('reports/default/report.md'),
     PosixPath('reports/default/figures/drift.png'))
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from ..core.output import atomic_write_text
from .figures import (
    DEFAULT_THRESHOLDS,
    UNIT_ORDER,
    WHOLE_UNITS,
    component_probes,
    default_ablation_kind,
    make_figures,
    worst_patching_target,
)

__all__ = ["SECTION_TITLES", "Section", "render_html", "render_markdown", "sections", "write_report"]

logger = logging.getLogger(__name__)

SECTION_TITLES = (
    "Summary",
    "Components",
    "Sensitivity",
    "Attribution agreement",
    "Schedule",
    "Pruning grid",
    "Why methods collapse",
    "SSM dynamics",
    "Reproducibility",
)
"""Top-level section titles of every report, in report order (reports with task objectives add "Objectives" after
"Pruning grid")."""
VERDICT_COLUMNS = ("label", "sparsity", "ppl_ratio", "verdict", "first_layer", "top_layer", "top_component")
GRID_COLUMNS = (
    "label",
    "method",
    "sparsity",
    "perplexity",
    "ppl_ratio",
    "nll",
    "verdict",
    "params",
    "nonzero",
    "tokens",
)
TOP_PROBES = 10
TOP_PATCHING = 5
TOP_DYNAMICS = 20
_INT_COLUMNS = frozenset({"layer", "first_layer", "top_layer", "index", "n", "seed", "params", "nonzero", "tokens"})
_SUMMARY_KEYS = ("model", "arch", "n_layers", "params", "dense_ppl")
_REPRO_FIRST = (
    "seed",
    "created",
    "model",
    "arch",
    "n_layers",
    "params",
    "dense_ppl",
    "ppl_definition",
    "probe_definition",
    "budget",
    "explain_sparsity",
    "thresholds",
)


@dataclass(frozen=True)
class Section:
    """One part of the report: a heading, then text, a figure and a table (each optional).

    Attributes:
        title: Heading text (plain text; escaped when rendered).
        text: Plain-text paragraphs, separated by blank lines (escaped when rendered).
        figure: File name of a PNG under ``figures/`` (e.g. ``"drift.png"``), or None.
        table: A frame rendered without its index (floats to 4 significant digits), or None.
        level: 2 for a top-level section, 3 for a subsection of the level-2 section before it.
    """

    title: str
    text: str = ""
    figure: str | None = None
    table: pd.DataFrame | None = field(default=None, compare=False)
    level: int = 2


def _table(tables: Mapping[str, pd.DataFrame | None], name: str) -> pd.DataFrame | None:
    """``tables[name]`` when present with at least one row, else None."""
    df = tables.get(name)
    return df if df is not None and len(df) > 0 else None


def _figure(figures: Mapping[str, Path], name: str) -> str | None:
    return Path(figures[name]).name if name in figures else None


def _pick(df: pd.DataFrame, columns: Iterable[str], *, extras: bool = False) -> pd.DataFrame:
    """The listed columns that ``df`` has, in that order (then the rest when ``extras``)."""
    cols = [c for c in columns if c in df.columns]
    if extras:
        cols += [c for c in df.columns if c not in cols]
    return df.loc[:, cols].reset_index(drop=True)


def _number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _percent(value) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.0%}"


def _run_title(label, sparsity) -> str:
    text = _percent(sparsity)
    return f"{label} at {text}" if text else str(label)


def _layer_kinds(meta: Mapping) -> list[str] | None:
    """Each layer's kind when the model is a hybrid (some layer holds more than an SSM mixer), else None."""
    kinds = meta.get("layer_kinds")
    if not isinstance(kinds, (list, tuple)) or all(k == "ssm" for k in kinds):
        return None
    return [str(k) for k in kinds]


def _with_kind(df: pd.DataFrame, meta: Mapping, column: str = "layer", name: str = "layer kind") -> pd.DataFrame:
    """``df`` with a ``name`` column (the layer's kind) right after ``column`` on hybrids; as it is otherwise."""
    kinds = _layer_kinds(meta)
    if kinds is None or column not in df.columns or name in df.columns:
        return df

    def kind(layer) -> str:
        number = _number(layer)
        return kinds[int(number)] if number is not None and 0 <= int(number) < len(kinds) else ""

    out = df.copy()
    out.insert(out.columns.get_loc(column) + 1, name, [kind(v) for v in out[column]])
    return out


def _summary(tables, meta: Mapping) -> list[Section]:
    model = meta.get("model", "unknown model")
    facts = [str(meta[k]) for k in ("arch",) if meta.get(k)]
    if meta.get("n_layers") is not None:
        facts.append(f"{meta['n_layers']} layers")
    if _number(meta.get("params")) is not None:
        facts.append(f"{int(meta['params']):,} parameters")
    text = f"Model {model}" + (f" ({', '.join(facts)})." if facts else ".")
    if _number(meta.get("dense_ppl")) is not None:
        text += f" Dense perplexity {float(meta['dense_ppl']):.4g}"
        text += f" ({meta['ppl_definition']})." if meta.get("ppl_definition") else "."
    if _number(meta.get("budget")) is not None:
        text += f" The sensitivity schedule prunes {float(meta['budget']):.0%} of the prunable weights overall."
    if _number(meta.get("explain_sparsity")) is not None:
        text += f" Pruned models are explained at {float(meta['explain_sparsity']):.0%} sparsity."
    bands = {**DEFAULT_THRESHOLDS, **(meta.get("thresholds") or {})}
    verdicts, grid = _table(tables, "verdicts"), _table(tables, "grid")
    out = []
    if verdicts is not None:
        text += (
            f"\n\nVerdicts: healthy below a perplexity ratio of {bands['healthy']:g}, collapsed from "
            f"{bands['collapsed']:g}, degraded between; ppl_ratio and verdict come from the pruning grid's test "
            "perplexity, and each explanation below states the windows it was measured on. first_layer: the first "
            "layer whose residual-stream relative error to dense exceeds the drift threshold "
            f"({(meta.get('thresholds') or {}).get('drift', 0.1):g}); top_layer / top_component: the component whose "
            "restoration to dense recovers most of the loss gap (see Why methods collapse)."
        )
        table = _with_kind(_pick(verdicts, VERDICT_COLUMNS), meta, "top_layer", "top_layer_kind")
        out.append(Section("Summary", text, table=table))
        if "explanation" in verdicts.columns:
            for row in verdicts.itertuples(index=False):
                explanation = getattr(row, "explanation", "")
                if isinstance(explanation, str) and explanation.strip():
                    title = _run_title(row.label, getattr(row, "sparsity", None))
                    out.append(Section(title, explanation.strip(), level=3))
    elif grid is not None:
        out.append(Section("Summary", text, table=_pick(grid, ("label", "sparsity", "ppl_ratio", "verdict"))))
    else:
        out.append(Section("Summary", text))
    return out


def _element_count(shape) -> float:
    """'128x64' -> 8192; '' or unparsable -> NaN."""
    if not isinstance(shape, str) or not shape.strip():
        return math.nan
    try:
        return float(np.prod([int(s) for s in shape.split("x")]))
    except ValueError:
        return math.nan


def _components(components: pd.DataFrame, layers: pd.DataFrame | None, meta: Mapping) -> list[Section]:
    df = components
    order = list(dict.fromkeys(df["component"]))
    hybrid = "unit" in df.columns and df["unit"].nunique() > 1
    if hybrid:  # grouped by unit kind, registry order inside each group
        unit_of = dict(zip(df["component"], df["unit"]))
        rank = {kind: i for i, kind in enumerate(UNIT_ORDER)}
        order = sorted(order, key=lambda c: (rank.get(unit_of[c], len(rank)), order.index(c)))
    grouped = df.groupby("component", sort=False)
    columns: dict[str, pd.Series] = {}
    if hybrid:
        columns["unit"] = grouped["unit"].first()
    if "layer" in df.columns:
        columns["layers"] = (grouped["layer"].agg(lambda s: ", ".join(map(str, sorted(set(s))))) if hybrid
                             else grouped["layer"].nunique())  # fmt: skip
    if "tensor" in df.columns:
        columns["tensors"] = grouped["tensor"].agg(
            lambda s: ", ".join(dict.fromkeys(t for t in s if isinstance(t, str) and t))
        )
    if "shape" in df.columns and "layer" in df.columns:
        sizes = df.assign(_n=df["shape"].map(_element_count))
        if sizes["_n"].notna().any():
            per_layer = sizes.groupby(["component", "layer"], sort=False)["_n"].sum(min_count=1)
            columns["params_per_layer"] = per_layer.groupby(level="component", sort=False).mean().round()
    for name in ("hook", "description"):
        if name in df.columns:
            columns[name] = grouped[name].first()
    table = pd.DataFrame({"component": order})
    for name, values in columns.items():
        table[name] = values.reindex(order).to_numpy()
    if "params_per_layer" in table.columns:
        table["params_per_layer"] = table["params_per_layer"].astype("Int64")
    text = (
        "Canonical components of each mixer layer (the model's registry): how many layers have each, the parameter "
        "tensors (or packed rows) they own, parameters per layer and the hook point carrying their activation."
    )
    if hybrid:
        text = (
            "Canonical components of each unit (the model's registry), grouped by unit kind (ssm: the state-space "
            "mixer; attention; mlp; moe): the layers holding each, the parameter tensors (or packed rows) they own, "
            "parameters per layer and the hook point carrying their activation."
        )
    out = [Section("Components", text, table=table)]
    if _layer_kinds(meta) is not None and layers is not None and "layer" in layers.columns:
        text = "Each layer's kind (the units its block holds) and where they sit in the block."
        out.append(Section("Layers", text, table=_pick(layers, layers.columns), level=3))
    return out


def _top_probes(probes: pd.DataFrame, metric: str = "delta_nll") -> pd.DataFrame:
    """The probes (any kind, unit or component) with the largest mean ``metric`` over seeds."""
    rows = probes.loc[(probes["metric"] == metric).to_numpy()]
    keys = [c for c in ("layer", "component", "index", "kind", "sparsity") if c in rows.columns]
    if rows.empty:
        return rows.loc[:, keys]
    rows = rows.assign(value=pd.to_numeric(rows["value"], errors="coerce"))
    top = rows.groupby(keys, dropna=False, sort=False, as_index=False)["value"].mean()
    top = top.sort_values("value", ascending=False, na_position="last", kind="stable").head(TOP_PROBES)
    top = top.rename(columns={"value": metric})
    drop = [c for c in ("index", "sparsity") if c in top.columns and top[c].isna().all()]
    return top.drop(columns=drop).reset_index(drop=True)


def _sensitivity(probes: pd.DataFrame, meta: Mapping, figures: Mapping[str, Path]) -> list[Section]:
    try:
        kind = default_ablation_kind(probes)
    except ValueError:
        kind = None
    text = "Δ NLL (nats/token) when one component of one layer is ablated"
    text += f" ({kind} ablation; mean over seeds)." if kind else "."
    if meta.get("probe_definition"):
        text += f" {meta['probe_definition']}"
    out = [Section("Sensitivity", text, figure=_figure(figures, "sensitivity_heatmap"))]
    if "sparsity_curves" in figures:
        text = "Δ NLL, mean over layers, when only that component is pruned to each sparsity (WANDA and magnitude)."
        out.append(Section("Sparsity curves", text, figure=_figure(figures, "sparsity_curves"), level=3))
    top = _with_kind(_top_probes(probes), meta)
    if len(top):
        text = f"The {len(top)} probes with the largest Δ NLL (nats/token; mean over seeds), of any kind and unit."
        out.append(Section("Most damaging probes", text, table=top, level=3))
    return out


def _agreement(agreement: pd.DataFrame) -> list[Section]:
    table = agreement
    if "spearman" in table.columns:
        table = table.assign(_s=pd.to_numeric(table["spearman"], errors="coerce"))
        table = table.sort_values("_s", ascending=False, na_position="last", kind="stable").drop(columns="_s")
    text = (
        "Rank agreement between cheap attribution scores and measured ablation damage across (layer, component) "
        "units: Spearman and Kendall correlations over n units, best first."
    )
    return [Section("Attribution agreement", text, table=_pick(table, table.columns))]


def _schedule(schedule: pd.DataFrame, meta: Mapping, figures: Mapping[str, Path]) -> list[Section]:
    df = schedule.assign(sparsity=pd.to_numeric(schedule["sparsity"], errors="coerce"))
    order = list(dict.fromkeys(df["component"]))
    pivot = df.pivot_table(index="layer", columns="component", values="sparsity", aggfunc="mean")
    pivot = pivot.reindex(columns=[c for c in order if c in pivot.columns]).sort_index()
    if (kinds := _layer_kinds(meta)) is not None:  # hybrids: every layer, those with nothing to prune too (MoE)
        pivot = pivot.reindex(pd.Index(range(len(kinds)), name=pivot.index.name))
    text = "Sparsity the sensitivity allocator gives each (layer, component) weight matrix; components not listed stay "
    text += "dense."
    if _number(meta.get("budget")) is not None:
        text += f" Global budget {float(meta['budget']):.1%} of the prunable parameters."
    if "params" in df.columns:
        params = pd.to_numeric(df["params"], errors="coerce")
        if params.notna().any() and params.sum() > 0:
            weighted = df.assign(_w=params * df["sparsity"], _p=params).groupby("layer")[["_w", "_p"]].sum()
            pivot["layer (weighted)"] = (weighted["_w"] / weighted["_p"]).reindex(pivot.index)
            overall = float((params * df["sparsity"]).sum() / params.sum())
            text += f" Achieved overall (parameter-weighted): {overall:.1%}."
    table = pivot.reset_index()
    table.columns.name = None
    return [Section("Schedule", text, figure=_figure(figures, "schedule"), table=_with_kind(table, meta))]


def _grid(grid: pd.DataFrame, meta: Mapping, figures: Mapping[str, Path]) -> list[Section]:
    bands = {**DEFAULT_THRESHOLDS, **(meta.get("thresholds") or {})}
    text = (
        "Perplexity of each pruned model relative to the dense one. Verdicts: healthy below a ratio of "
        f"{bands['healthy']:g}, collapsed from {bands['collapsed']:g}, degraded between."
    )
    return [
        Section(
            "Pruning grid",
            text,
            figure=_figure(figures, "perplexity_vs_sparsity"),
            table=_pick(grid, GRID_COLUMNS, extras=True),
        )
    ]


def _objectives(tables, meta: Mapping, figures: Mapping[str, Path]) -> list[Section]:
    """One subsection per task objective: accuracy of every run, and the explainer's verdict on the objective's
    items (a method can be healthy on perplexity and collapsed on recall); then the recall and position curves."""
    objectives = _table(tables, "objectives")
    verdicts = _table(tables, "objective_verdicts")
    text = ("Every pruned model of the grid scored on each task objective besides perplexity, and the explainer run "
            "again on each objective's items (its verdict is from the ratio of the answer tokens' perplexity, "
            "pruned over dense, with the perplexity bands).")  # fmt: skip
    out = [Section("Objectives", text, figure=_figure(figures, "objectives"))]
    for task, part in objectives.groupby("objective", sort=False):
        table = part.pivot_table(index="label", columns="sparsity", values="accuracy", sort=False)
        table.columns = [f"acc @ {c:.0%}" if c else "acc" for c in table.columns]
        text = f"{part['definition'].iloc[0]}. Dense accuracy {float(part['dense_accuracy'].iloc[0]):.3f}."
        out.append(Section(f"Objective: {task}", text, table=table.reset_index(), level=3))
        if verdicts is not None and "objective" in verdicts.columns:
            v = verdicts[(verdicts["objective"] == task).to_numpy()]
            if len(v):
                what = "; ".join(f"{r.label}: {r.verdict}" for r in v.itertuples())
                cols = [c for c in (*VERDICT_COLUMNS, "text") if c in v.columns]
                out.append(Section(f"Verdicts on {task}", f"Explainer verdicts at "
                                   f"{_percent(v['sparsity'].iloc[0])}: {what}.", table=_pick(v, cols),
                                   level=3))  # fmt: skip
    if "recall_pairs" in figures:
        out.append(Section("Recall against pairs", "Recall accuracy of the dense model and of every explained run "
                           "against the number of key-value pairs (64 items each, no gap).",
                           figure=_figure(figures, "recall_pairs"), level=3))  # fmt: skip
    if "positions" in figures:
        out.append(Section("NLL by position", "Mean next-token NLL against the position in long test windows: how "
                           "each pruning method treats late positions, where the state carries the context.",
                           figure=_figure(figures, "positions"), level=3))  # fmt: skip
    return out


def _collapse(tables, meta: Mapping, figures: Mapping[str, Path]) -> list[Section]:
    drift, patching = _table(tables, "drift"), _table(tables, "patching")
    text = "Where a pruned model leaves the dense one, and which single component would bring it back."
    if drift is not None:
        text += (
            " Drift: relative error ‖h_pruned − h_dense‖ / ‖h_dense‖ of the residual stream after each layer, for "
            "each pruned model explained."
        )
    out = [Section("Why methods collapse", text, figure=_figure(figures, "drift"))]
    if patching is None or not {"label", "layer", "component", "recovered"} <= set(patching.columns):
        return out
    text = (
        "Patching: the fraction of the pruned-vs-dense loss gap closed by restoring one component of one layer to "
        "its dense weights (1 = fully recovered; negative = restoring it makes things worse)."
    )
    try:
        label, sparsity = worst_patching_target(patching, _table(tables, "verdicts"), _table(tables, "grid"))
        text += f" Shown for {_run_title(label, sparsity)}, the worst model with patching results."
    except ValueError:
        pass
    out.append(Section("Component patching", text, figure=_figure(figures, "patching"), level=3))
    rows = patching.assign(recovered=pd.to_numeric(patching["recovered"], errors="coerce"))
    whole = ~rows["component"].isin([c for c, kind in WHOLE_UNITS.items() if kind != "block"])
    rows = rows.loc[(rows["recovered"].notna() & whole).to_numpy()]  # whole-unit rows: in the heatmap only
    if len(rows):
        keys = [c for c in ("label", "sparsity") if c in rows.columns]
        groups = rows.groupby(keys, sort=False, dropna=False)
        top = pd.concat([g.nlargest(TOP_PATCHING, "recovered") for _, g in groups], ignore_index=True)
        text = (
            f"The {TOP_PATCHING} components whose restoration recovers most of the loss gap, per pruned model "
            "(restoring a whole mixer is shown in the heatmap's mixer column, not here)."
        )
        if _layer_kinds(meta) is not None:
            text = (
                f"The {TOP_PATCHING} components whose restoration recovers most of the loss gap, per pruned model "
                "(restoring a whole unit, mixer, attention, mlp or moe, is shown in the heatmap, not here)."
            )
        out.append(
            Section(
                "Most-recovering components",
                text,
                level=3,
                table=_with_kind(_pick(top, (*keys, "layer", "component", "recovered")), meta),
            )
        )
    return out


def _dynamics(tables, meta: Mapping, figures: Mapping[str, Path]) -> list[Section]:
    text = (
        "Per-token SSM quantities of dense vs pruned models: Δ (the step size), the per-step decay exp(Δ·A), the "
        "memory horizon, the state norm, how often the gate is closed and outlier rates of x, z and y."
    )
    dynamics = _table(tables, "dynamics")
    table = None
    if dynamics is not None and {"stat", "dense", "pruned", "quantity"} <= set(dynamics.columns):
        rows = dynamics.loc[(dynamics["stat"] == "median").to_numpy()]
        dense = pd.to_numeric(rows["dense"], errors="coerce").to_numpy(dtype=float)
        pruned = pd.to_numeric(rows["pruned"], errors="coerce").to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = pruned / dense
            score = np.where((ratio > 0) & np.isfinite(ratio), np.abs(np.log(np.where(ratio > 0, ratio, 1.0))), np.nan)
        rows = rows.assign(dense=dense, pruned=pruned, ratio=ratio, _score=score)
        rows = rows.sort_values("_score", ascending=False, na_position="last", kind="stable").head(TOP_DYNAMICS)
        if len(rows):
            table = _with_kind(_pick(rows, ("label", "sparsity", "layer", "quantity", "dense", "pruned", "ratio")),
                               meta)  # fmt: skip
            text += (
                f"\n\nThe table lists the {len(table)} per-layer medians that moved most "
                "(largest |log(pruned / dense)|)."
            )
    return [Section("SSM dynamics", text, figure=_figure(figures, "dynamics"), table=table)]


def _flatten(key: str, value) -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        return [pair for k, v in value.items() for pair in _flatten(f"{key}.{k}", v)]
    if isinstance(value, (list, tuple, set)):
        return [(key, ", ".join(map(str, value)))]
    return [(key, str(value))]


def _reproducibility(meta: Mapping) -> list[Section]:
    keys = [k for k in _REPRO_FIRST if k in meta]
    keys += [k for k in meta if k not in keys and k not in ("versions", "timings")]
    rows = [pair for k in keys for pair in _flatten(k, meta[k])]
    text = "Everything needed to rerun this report: seed, definitions and every other setting recorded."
    out = [Section("Reproducibility", text, table=pd.DataFrame(rows, columns=["key", "value"]))]
    versions = meta.get("versions")
    if isinstance(versions, Mapping) and versions:
        table = pd.DataFrame({"package": list(map(str, versions)), "version": list(map(str, versions.values()))})
        out.append(Section("Versions", table=table, level=3))
    timings = meta.get("timings")
    if isinstance(timings, Mapping) and timings:
        seconds = [_number(v) for v in timings.values()]
        table = pd.DataFrame(
            {"step": list(map(str, timings)), "seconds": [math.nan if s is None else s for s in seconds]}
        )
        total = float(np.nansum(table["seconds"].to_numpy(dtype=float)))
        table = pd.concat([table, pd.DataFrame({"step": ["total"], "seconds": [total]})], ignore_index=True)
        out.append(Section("Timings", "Wall-clock seconds per step.", table=table, level=3))
    return out


def sections(tables: Mapping[str, pd.DataFrame | None], meta: Mapping, figures: Mapping[str, Path]) -> list[Section]:
    """The report's sections, in order (see :data:`SECTION_TITLES`); a section whose tables are absent or empty is
    left out, except Summary and Reproducibility, which are always there.

    Args:
        tables: The pipeline's tables by name (``components``, ``probes``, ``attribution``, ``agreement``,
            ``schedule``, ``grid``, ``drift``, ``patching``, ``dynamics``, ``dynamics_samples``, ``verdicts``).
        meta: Run metadata (``model``, ``arch``, ``n_layers``, ``params``, ``dense_ppl``, ``ppl_definition``,
            ``probe_definition``, ``seed``, ``versions``, ``timings``, ``budget``, ...; all optional here).
        figures: Figure name -> PNG path, as returned by :func:`~sensitivity.report.figures.make_figures`;
            sections reference only these.

    Examples:
        >>> [s.title for s in sections({}, {"model": "m"}, {})]
        ['Summary', 'Reproducibility']
    """
    out = _summary(tables, meta)
    if (components := _table(tables, "components")) is not None and "component" in components.columns:
        out += _components(components, _table(tables, "layers"), meta)
    probes = _table(tables, "probes")
    if probes is not None and {"component", "kind", "metric", "value"} <= set(probes.columns):
        if len(component_probes(probes)) or "sensitivity_heatmap" in figures or len(_top_probes(probes)):
            out += _sensitivity(probes, meta, figures)
    if (agreement := _table(tables, "agreement")) is not None:
        out += _agreement(agreement)
    schedule = _table(tables, "schedule")
    if schedule is not None and {"layer", "component", "sparsity"} <= set(schedule.columns):
        out += _schedule(schedule, meta, figures)
    if (grid := _table(tables, "grid")) is not None:
        out += _grid(grid, meta, figures)
    if (objectives := _table(tables, "objectives")) is not None and "objective" in objectives.columns:
        out += _objectives(tables, meta, figures)
    if _table(tables, "drift") is not None or _table(tables, "patching") is not None:
        out += _collapse(tables, meta, figures)
    if _table(tables, "dynamics") is not None or _table(tables, "dynamics_samples") is not None:
        out += _dynamics(tables, meta, figures)
    out += _reproducibility(meta)
    return out


def _display(df: pd.DataFrame) -> pd.DataFrame:
    """Integer-valued float columns with integer names (layer, n, params, ...) as nullable ints: 3, not 3.0."""
    out = df.copy()
    for col in out.columns:
        if col in _INT_COLUMNS and pd.api.types.is_float_dtype(out[col]):
            values = out[col].to_numpy(dtype=float)
            finite = values[~np.isnan(values)]
            if np.isfinite(finite).all() and np.array_equal(finite, np.round(finite)):
                out[col] = out[col].astype("Int64")
    return out


def _format_float(value: float) -> str:
    """4 significant digits."""
    return f"{value:.4g}"


def _cell(value) -> str:
    """One table cell as text: floats to 4 significant digits, missing values empty."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _format_float(float(value))
    return str(value)


def _md_text(text: str) -> str:
    """Plain text safe in markdown: angle brackets escaped so they are not read as HTML."""
    return str(text).replace("<", "&lt;").replace(">", "&gt;")


def _md_cell(text) -> str:
    """Text safe in a markdown table cell: as :func:`_md_text`, pipes escaped, line breaks as spaces."""
    return _md_text(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _html_text(text) -> Markup:
    """Text safe in an HTML text node: ``&``, ``<`` and ``>`` escaped, quotes kept as they are (markupsafe's
    autoescape would also write ``'`` and ``"`` as ``&#39;`` and ``&#34;``)."""
    return Markup(html.escape(str(text), quote=False))


def _html_quoted(text) -> Markup:
    """Text safe in a quoted HTML attribute: as :func:`_html_text`, quotes as ``&quot;`` and ``&#x27;``."""
    return Markup(html.escape(str(text), quote=True))


@lru_cache(maxsize=1)
def _environment() -> Environment:
    """The jinja2 environment of the templates under ``templates/``: ``*.html.j2`` autoescaped, markdown not."""
    env = Environment(
        loader=PackageLoader("sensitivity.report", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False, default=False),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(md=_md_text, md_cell=_md_cell, text=_html_text, quoted=_html_quoted)
    return env


def _numeric_columns(df: pd.DataFrame) -> list[bool]:
    """Per column: numbers (right-aligned) or not."""
    return [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]


def _has_table(section: Section) -> bool:
    return section.table is not None and len(section.table.columns) > 0


def _table_rows(df: pd.DataFrame) -> dict:
    """``df`` as text cells for a pipe table: ``header``, ``numeric`` (per column: right-aligned) and ``rows``
    (floats to 4 significant digits, missing values empty)."""
    df = _display(df)
    rows = [[_cell(v) for v in row] for row in df.itertuples(index=False, name=None)]
    return {"header": [_cell(c) for c in df.columns], "numeric": _numeric_columns(df), "rows": rows}


def _slugs(items: Iterable[Section]) -> list[str]:
    """GitHub-style heading anchors (lower case, punctuation dropped, spaces to hyphens, repeats numbered)."""
    seen: dict[str, int] = {}
    out = []
    for section in items:
        slug = re.sub(r"[^\w\- ]", "", section.title.strip().lower()).replace(" ", "-") or "section"
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.append(slug if count == 0 else f"{slug}-{count}")
    return out


def _title(meta: Mapping) -> str:
    return f"Sensitivity report: {meta.get('model', 'unknown model')}"


def _byline(meta: Mapping) -> str:
    parts = []
    if meta.get("created"):
        parts.append(f"Created {meta['created']}")
    versions = meta.get("versions")
    if isinstance(versions, Mapping) and versions.get("sensitivity"):
        parts.append(f"sensitivity {versions['sensitivity']}")
    if meta.get("seed") is not None:
        parts.append(f"seed {meta['seed']}")
    return "; ".join(parts)


def render_markdown(sections: list[Section], meta: Mapping) -> str:
    """The report as GitHub markdown: a title, a table of contents, then each section's heading, text, figure
    (``![title](figures/NAME.png)``) and pipe table.

    Examples:
        >>> print(render_markdown([Section("Summary", "Model m.")], {"model": "m"}))  # doctest: +ELLIPSIS
        # Sensitivity report: m
        ...
    """
    items = [
        {
            "title": section.title,
            "slug": slug,
            "level": max(section.level, 2),
            "paragraphs": _paragraphs(section.text),
            "figure": section.figure or None,
            "table": _table_rows(section.table) if _has_table(section) else None,
        }
        for section, slug in zip(sections, _slugs(sections))
    ]
    template = _environment().get_template("report.md.j2")
    return template.render(title=_title(meta), byline=_byline(meta), sections=items)


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text or "") if p.strip()]


def _html_table(df: pd.DataFrame, table_id: str) -> tuple[str, str]:
    """``df`` as an escaped HTML table with id ``table_id`` (floats to 4 significant digits, missing values empty),
    and the CSS rules that right-align its numeric columns."""
    df = _display(df)
    numeric = _numeric_columns(df)
    for col in df.columns:
        if not pd.api.types.is_float_dtype(df[col]):
            df[col] = [_cell(v) for v in df[col]]  # ints, nullable ints and text: no '<NA>', no '3.0'
    table = df.to_html(
        index=False,
        float_format=_format_float,
        na_rep="",
        border=0,
        escape=True,
        classes="data",
        justify="center",
        table_id=table_id,
    )
    css = " ".join(f"#{table_id} td:nth-child({i + 1}) {{ text-align: right; }}" for i, n in enumerate(numeric) if n)
    return table, css


def _html_figure(section: Section, figures_dir: Path) -> dict[str, str] | None:
    """The section's figure as ``{"name": file name, "data": base64 PNG}``; None (with a warning) when missing."""
    path = Path(figures_dir) / str(section.figure)
    if not path.is_file():
        logger.warning("figure %s of section %r not found; left out of the HTML", path, section.title)
        return None
    return {"name": str(section.figure), "data": base64.b64encode(path.read_bytes()).decode("ascii")}


def render_html(sections: list[Section], meta: Mapping, figures_dir: Path) -> str:
    """The report as one self-contained HTML page: inline style, a linked table of contents, escaped text,
    figures embedded as ``data:image/png;base64`` images (read from ``figures_dir``), tables without index.

    Nothing is fetched from elsewhere: no scripts, no external stylesheets, fonts, images or links.

    Examples:
        >>> page = render_html([Section("Summary", "a <b> label")], {"model": "m"}, Path("figures"))
        >>> "a &lt;b&gt; label" in page
        True
    """
    items, rules = [], []
    for number, (section, slug) in enumerate(zip(sections, _slugs(sections))):
        table = None
        if _has_table(section):
            html_table, css = _html_table(section.table, f"table-{number}")
            table = Markup(html_table)  # escaped by pandas
            rules.append(css)
        items.append(
            {
                "title": section.title,
                "slug": slug,
                "level": min(max(section.level, 2), 6),
                "paragraphs": _paragraphs(section.text),
                "figure": _html_figure(section, figures_dir) if section.figure else None,
                "table": table,
            }
        )
    toc: list[dict] = []  # level-3 (and deeper) sections nested under the level-2 section before them
    for section, item in zip(sections, items):
        if section.level > 2 and toc:
            toc[-1]["children"].append(item)
        else:
            toc.append({**item, "children": []})
    template = _environment().get_template("report.html.j2")
    return template.render(
        title=_title(meta),
        byline=_byline(meta),
        table_css=Markup("\n".join(r for r in rules if r)),  # generated CSS: ids and column numbers only
        toc=toc,
        sections=items,
    )


def write_report(out_dir: Path, tables: Mapping[str, pd.DataFrame | None], meta: Mapping) -> dict[str, Path]:
    """Draw the figures into ``out_dir/figures`` and write ``report.md`` and ``report.html`` (atomically).

    Args:
        out_dir: Report folder (created).
        tables: The pipeline's tables by name; missing or empty ones drop their figures and sections.
        meta: Run metadata (see :func:`sections`).

    Returns:
        ``{"html": out_dir/report.html, "markdown": out_dir/report.md, <figure name>: PNG path, ...}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures_dir = out_dir / "figures"
    figures = make_figures(tables, meta, figures_dir)
    parts = sections(tables, meta, figures)
    paths = {"html": out_dir / "report.html", "markdown": out_dir / "report.md"}
    atomic_write_text(paths["markdown"], render_markdown(parts, meta))
    atomic_write_text(paths["html"], render_html(parts, meta, figures_dir))
    logger.info("wrote %s and %s (%d figures)", paths["html"], paths["markdown"], len(figures))
    return {**paths, **figures}

"""The report pipeline on every built-in tiny hybrid: it completes with every figure and section, its tables list
each layer with its kind, components are grouped by unit, and the heatmaps' rows are the components present."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch

import sensitivity.report.pipeline as pipeline
from sensitivity.core import load_model
from sensitivity.explain import UNIT_ROWS
from sensitivity.report import build_report
from sensitivity.report.figures import (
    FIGURES,
    METRIC_LABELS,
    WHOLE_UNITS,
    component_units,
    patching_heatmap,
    sensitivity_heatmap,
    sparsity_curves,
)
from sensitivity.report.grid import DENSE, GridRun
from sensitivity.report.render import SECTION_TITLES

HYBRIDS = ["tiny:bamba", "tiny:granitemoehybrid", "tiny:nemotron-h", "tiny:jamba", "tiny:falcon-h1", "tiny:zamba2"]
SMALL = dict(data="sample", seqlen=12, probe_windows=1, probe_kinds=["zero", "wanda"], probe_sparsities=[0.5],
             attribution_windows=1, calib_windows=2, eval_windows=1, eval_seqlen=12, explain_windows=1,
             sparsities=[0.5], structured_sparsities=[0.5])  # fmt: skip


def _grid(registry, sparsities, structured, *, allocators=("sensitivity",), nm="2:4"):
    """The weight-pruning runs only (structured pruning of hybrids is tested with the pruners)."""
    s = sparsities[0]
    return [GridRun(DENSE, 0.0), GridRun("magnitude", s), GridRun("wanda", s), GridRun("wanda", s, "sensitivity")]


@pytest.fixture(scope="module", params=HYBRIDS)
def report(request, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("report") / request.param.split(":")[1]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipeline, "plan_grid", _grid)
            mp.setattr(pipeline, "_explained", lambda registry, s: [GridRun("magnitude", s), GridRun("wanda", s)])
            paths = build_report(out, model=request.param, show_progress=False, **SMALL)
    finally:
        torch.set_num_threads(n)
    return out, paths, load_model(request.param).registry


def _md_table(md: str, title: str) -> pd.DataFrame:
    """The first pipe table after the heading ``title`` in report.md, as strings."""
    lines = md.split(f"# {title}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines[start:end]]
    return pd.DataFrame(cells[2:], columns=cells[0])


def test_every_figure_section_and_table_is_written(report):
    out, paths, reg = report
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for title in SECTION_TITLES:
        assert f"\n## {title}\n" in md and f">{title}</h2>" in html, title
    assert "\n### Layers\n" in md
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    probes = pd.read_csv(out / "data" / "probes.csv")
    assert {c.name for c in reg.components if c.unit in ("attention", "mlp")} <= set(probes.component)
    patching = pd.read_csv(out / "data" / "patching.csv")

    def parts(layer: int, kind: str) -> int:
        return len([c for c in reg.components_at(layer) if c.unit == kind and c.tensors])

    kinds = {k for u in reg.units for k in u}
    wholes = {UNIT_ROWS[k] for k in kinds if any(parts(i, k) > 1 for i in range(reg.n_layers))}
    assert wholes <= set(patching.component)
    dynamics = pd.read_csv(out / "data" / "dynamics.csv")
    assert set(dynamics.layer) == {i for i in range(reg.n_layers) if "ssm" in reg.units[i]}


def test_tables_list_each_layer_with_its_kind(report):
    out, _, reg = report
    kinds = [reg.layer_kind(i) for i in range(reg.n_layers)]
    layers = pd.read_csv(out / "data" / "layers.csv")
    assert layers.layer.tolist() == list(range(reg.n_layers)) and layers.kind.tolist() == kinds
    md = (out / "report.md").read_text()
    listed = _md_table(md, "Layers")
    assert listed.layer.astype(int).tolist() == list(range(reg.n_layers)) and listed.kind.tolist() == kinds
    for title in ("Schedule", "Most damaging probes", "Most-recovering components"):
        table = _md_table(md, title)
        assert "layer kind" in table.columns, title
        assert all(kinds[int(layer)] == kind for layer, kind in zip(table.layer, table["layer kind"])), title
    assert _md_table(md, "Schedule").layer.astype(int).tolist() == list(range(reg.n_layers))
    summary = _md_table(md, "Summary")
    assert all(kinds[int(t)] == k for t, k in zip(summary.top_layer, summary.top_layer_kind) if t)
    shared = layers.set_index("layer").shares_tensors_with.fillna("").astype(str)
    for layer in range(reg.n_layers):  # Zamba2: the hybrid layers share their transformer
        others = sorted({o for c in reg.components_at(layer) for o in reg.sharing(layer, c.name)} - {layer})
        assert shared[layer].replace(".0", "") == ", ".join(map(str, others)), layer


def test_components_are_grouped_by_unit(report):
    out, _, reg = report
    table = _md_table((out / "report.md").read_text(), "Components")
    order = {"ssm": 0, "attention": 1, "mlp": 2, "moe": 3}
    assert table.unit.map(order).is_monotonic_increasing
    assert set(table.component) == set(reg.component_names)
    for row in table.itertuples():
        assert row.layers == ", ".join(map(str, reg.layers_with(row.component))), row.component


def test_heatmap_rows_are_the_components_present(report):
    """Rows: the components of the probe table, grouped by unit and labelled with it; columns: layers with their
    kinds; a cell only where the layer holds the component (the others blank, not annotated)."""
    out, _, reg = report
    probes = pd.read_csv(out / "data" / "probes.csv")
    units = component_units(pd.read_csv(out / "data" / "components.csv"))
    kinds = [reg.layer_kind(i) for i in range(reg.n_layers)]
    fig = sensitivity_heatmap(probes, kind="zero", units=units, layer_kinds=kinds)
    ax = fig.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    zero = probes[(probes.kind == "zero") & (probes.metric == "delta_nll") & probes["index"].isna()]
    present = list(dict.fromkeys(zero.component))
    assert sorted(rows) == sorted(f"{c} ({units[c]})" for c in present)
    rank = {"ssm": 0, "attention": 1, "mlp": 2, "moe": 3, "block": 4}
    groups = [rank[re.search(r"\((\w+)\)$", r).group(1)] for r in rows]
    assert groups == sorted(groups)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{i}\n{k}" for i, k in enumerate(kinds)]
    assert len(ax.texts) == len(set(zip(zero.layer, zero.component)))  # annotated: held pairs only
    patching = pd.read_csv(out / "data" / "patching.csv")
    rows = [t.get_text() for t in patching_heatmap(patching, label="wanda", sparsity=0.5, units=units,
                                                   layer_kinds=kinds).axes[0].get_yticklabels()]  # fmt: skip
    wholes = [r for r in rows if r.split(" ")[0] in WHOLE_UNITS]
    assert wholes and all(r == f"{r.split(' ')[0]} ({WHOLE_UNITS[r.split(' ')[0]]})" for r in wholes)
    curves = sparsity_curves(probes, units=units)
    legend = curves.axes[-1].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [f"{c} ({units[c]})" for c in (label.split(" ")[0] for label in labels)]
    groups = [rank[units[label.split(" ")[0]]] for label in labels]
    assert groups == sorted(groups) and legend.get_title().get_text() == "component (unit)"
    assert curves.axes[0].get_ylabel() == f"{METRIC_LABELS['delta_nll']}, mean over layers"

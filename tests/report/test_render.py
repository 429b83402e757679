"""Report rendering: every figure written as a real PNG, heatmap annotations equal to the input numbers, a
self-contained HTML page and a markdown page with the right sections, figures and verdict numbers, missing tables
skipped quietly, text escaped, and global matplotlib state left alone."""

from __future__ import annotations

import base64
import logging
import re
import shutil
from pathlib import Path

import matplotlib as mpl
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from sensitivity.report.figures import (
    FIGURES,
    default_ablation_kind,
    drift_plot,
    dynamics_plot,
    make_figures,
    patching_heatmap,
    perplexity_vs_sparsity,
    sensitivity_heatmap,
    worst_patching_target,
)
from sensitivity.report.render import Section, render_html, render_markdown, sections, write_report

LAYERS = (0, 1, 2)
COMPONENTS = ("z", "x", "B", "C", "dt", "A_log", "out_proj")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOP_TITLES = (
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


def _tables() -> dict[str, pd.DataFrame]:
    """Small but realistic tables of a 3-layer Mamba-2: two pruned models at 50% (wanda healthy, magnitude
    collapsed) explained."""
    rng = np.random.default_rng(0)
    components = pd.DataFrame(
        [
            {
                "layer": layer,
                "component": comp,
                "tensor": tensor,
                "rows": "",
                "cols": "",
                "shape": shape,
                "layout": "",
                "hook": comp,
                "description": f"{comp} rows",
            }
            for layer in LAYERS
            for comp, tensor, shape in (
                ("z", "in_proj.weight", "128x64"),
                ("x", "in_proj.weight", "128x64"),
                ("B", "in_proj.weight", "32x64"),
                ("C", "in_proj.weight", "32x64"),
                ("dt", "in_proj.weight", "8x64"),
                ("dt", "dt_bias", "8"),
                ("A_log", "A_log", "8"),
                ("out_proj", "out_proj.weight", "64x128"),
            )
        ]
    )
    probes = []
    for layer in LAYERS:
        for c, comp in enumerate((*COMPONENTS, "mixer")):
            for seed in (0, 1):
                for kind in ("zero", "mean"):
                    base = 0.05 * (c + 1) * (layer + 1) + (0.3 if kind == "zero" else 0.0)
                    for metric, value in (("delta_nll", base), ("ppl_ratio", np.exp(base)), ("kl", base / 2)):
                        probes.append((layer, comp, np.nan, kind, np.nan, metric, value + 0.01 * seed, seed))
                if comp in ("mixer", "A_log"):
                    continue
                for kind in ("wanda", "magnitude"):
                    for sparsity in (0.25, 0.5, 0.75):
                        value = sparsity**2 * (c + 1) * (2.0 if kind == "magnitude" else 1.0) + 0.01 * seed
                        probes.append((layer, comp, np.nan, kind, sparsity, "delta_nll", value, seed))
        for head in range(4):  # per-head unit probes: never in the heatmaps
            probes.append((layer, "head", float(head), "zero", np.nan, "delta_nll", 9.0 + head, 0))
    probes = pd.DataFrame(
        probes, columns=["layer", "component", "index", "kind", "sparsity", "metric", "value", "seed"]
    )
    attribution = pd.DataFrame(
        [
            (layer, comp, kind, "sum", rng.random(), "extra")
            for layer in LAYERS
            for comp in COMPONENTS
            for kind in ("act_norm", "taylor")
        ],
        columns=["layer", "component", "kind", "metric", "value", "unused"],
    )
    agreement = pd.DataFrame(
        [
            ("act_norm", "sum", "zero", "delta_nll", 21, 0.31, 0.22),
            ("taylor", "abs_sum", "zero", "delta_nll", 21, 0.74, 0.58),
            ("fisher", "sum", "mean", "delta_nll", 21, np.nan, np.nan),
            ("gblm", "sum", "zero", "delta_nll", 21, -0.12, -0.08),
        ],
        columns=["attribution", "attribution_metric", "ablation", "probe_metric", "n", "spearman", "kendall"],
    )
    schedule = pd.DataFrame(
        [
            (layer, comp, params, round(0.2 + 0.1 * layer + 0.02 * c, 4))
            for layer in LAYERS
            for c, (comp, params) in enumerate((("z", 8192), ("x", 8192), ("B", 2048), ("out_proj", 8192)))
        ],
        columns=["layer", "component", "params", "sparsity"],
    )
    grid = pd.DataFrame(
        [
            ("dense", "dense", 0.0, 20.0, 1.0, 3.0, 1000, 100_000, 100_000, "dense"),
            ("magnitude", "magnitude", 0.25, 22.0, 1.1, 3.09, 1000, 100_000, 75_000, "healthy"),
            ("magnitude", "magnitude", 0.5, 60.0, 3.0, 4.09, 1000, 100_000, 50_000, "collapsed"),
            ("magnitude", "magnitude", 0.75, np.inf, np.inf, np.inf, 1000, 100_000, 25_000, "collapsed"),
            ("wanda", "wanda", 0.25, 20.5, 1.025, 3.02, 1000, 100_000, 75_000, "healthy"),
            ("wanda", "wanda", 0.5, 22.469, 1.12345, 3.11, 1000, 100_000, 50_000, "healthy"),
            ("wanda", "wanda", 0.75, 31.0, 1.55, 3.43, 1000, 100_000, 25_000, "degraded"),
            ("wanda 2:4", "wanda", 0.5, 25.0, 1.25, 3.22, 1000, 100_000, 50_000, "degraded"),
            ("head", "head", 0.5, 44.0, 2.2, 3.78, 1000, 50_000, 50_000, "collapsed"),
        ],
        columns=[
            "label",
            "method",
            "sparsity",
            "perplexity",
            "ppl_ratio",
            "nll",
            "tokens",
            "params",
            "nonzero",
            "verdict",
        ],
    )
    drift = pd.DataFrame(
        [
            (label, 0.5, layer, scale * 10.0**layer, 1.0 - 0.1 * layer)
            for label, scale in (("wanda", 0.01), ("magnitude", 0.5))
            for layer in LAYERS
        ],
        columns=["label", "sparsity", "layer", "rel_error", "cosine"],
    )
    patching = pd.DataFrame(
        [
            (label, 0.5, layer, comp, round(float(rng.uniform(-0.2, 1.1)), 4))
            for label in ("wanda", "magnitude")
            for layer in LAYERS
            for comp in (*COMPONENTS, "mixer")
        ],
        columns=["label", "sparsity", "layer", "component", "recovered"],
    )
    dynamics = pd.DataFrame(
        [
            (label, 0.5, layer, quantity, stat, dense, dense * factor * (1 + layer))
            for label, factor in (("wanda", 1.05), ("magnitude", 3.0))
            for layer in LAYERS
            for quantity, dense in (("delta", 0.05), ("decay", 0.9), ("state_norm", 4.0), ("outlier_x", 0.01))
            for stat in ("median", "mean", "p10", "p90")
        ],
        columns=["label", "sparsity", "layer", "quantity", "stat", "dense", "pruned"],
    )
    samples = []
    for label, factor in (("wanda", 1.1), ("magnitude", 4.0)):
        for model, scale in (("dense", 1.0), ("pruned", factor)):
            delta = np.exp(rng.normal(np.log(0.05 * scale), 1.5, 400))
            for quantity, values in (("delta", delta), ("decay", np.exp(-delta))):
                samples.append(
                    pd.DataFrame(
                        {
                            "label": label,
                            "sparsity": 0.5,
                            "layer": 1,
                            "quantity": quantity,
                            "model": model,
                            "value": values,
                        }
                    )
                )
    dynamics_samples = pd.concat(samples, ignore_index=True)
    verdicts = pd.DataFrame(
        [
            ("wanda", 0.5, 1.12345, "healthy", np.nan, 1, "x", 0.4567, "WANDA keeps the residual stream close."),
            ("magnitude", 0.5, 3.0, "collapsed", 1.0, 2, "dt", 0.8123, "Magnitude pruning wrecks dt in layer 2."),
        ],
        columns=[
            "label",
            "sparsity",
            "ppl_ratio",
            "verdict",
            "first_layer",
            "top_layer",
            "top_component",
            "recovered",
            "explanation",
        ],
    )
    return {
        "components": components,
        "probes": probes,
        "attribution": attribution,
        "agreement": agreement,
        "schedule": schedule,
        "grid": grid,
        "drift": drift,
        "patching": patching,
        "dynamics": dynamics,
        "dynamics_samples": dynamics_samples,
        "verdicts": verdicts,
    }


def _meta(**extra) -> dict:
    return {
        "model": "tiny:mamba2",
        "arch": "mamba2",
        "n_layers": 3,
        "params": 123_456,
        "dense_ppl": 20.0,
        "ppl_definition": "exp(mean NLL per token) over 4 windows of 256 tokens",
        "probe_definition": "Δ NLL = NLL(ablated) − NLL(dense), nats/token.",
        "seed": 1234,
        "versions": {"sensitivity": "0.1.0", "torch": "2.13.0"},
        "timings": {"probes": 12.5, "grid": 30.25},
        "budget": 0.5,
        "explain_sparsity": 0.5,
        "created": "2025-01-01T00:00:00+00:00",
        "thresholds": {"healthy": 1.2, "collapsed": 2.0},
        "device": "cpu",
        **extra,
    }


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return _tables()


@pytest.fixture(scope="module")
def report(tables, tmp_path_factory):
    """The full report, written once."""
    out = tmp_path_factory.mktemp("report")
    return out, write_report(out, tables, _meta())


def _texts(path) -> tuple[str, str]:
    return (path / "report.html").read_text(encoding="utf-8"), (path / "report.md").read_text(encoding="utf-8")


def test_every_figure_is_a_valid_png(report):
    out, paths = report
    assert set(paths) == {"html", "markdown", *FIGURES}
    for name in FIGURES:
        path = paths[name]
        assert path == out / "figures" / f"{name}.png"
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, name
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 200, (name, image.shape)
    assert not list((out / "figures").glob(".*"))  # no temporary files left


def _annotations(fig) -> dict[tuple[str, str], str]:
    """(layer, component) -> annotation text of a seaborn heatmap, located by the texts' cell centres."""
    ax = fig.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    out = {}
    for text in ax.texts:
        x, y = text.get_position()
        out[(rows[int(y)], cols[int(x)])] = text.get_text()
    return out


@pytest.mark.parametrize("kind", [None, "mean"])
def test_heatmap_annotations_equal_the_pivoted_probes(tables, kind):
    probes = tables["probes"]
    fig = sensitivity_heatmap(probes, kind=kind)
    shown = kind or "zero"
    rows = probes[probes["index"].isna() & probes["sparsity"].isna()]
    rows = rows[(rows["kind"] == shown) & (rows["metric"] == "delta_nll")]
    expected = rows.groupby(["layer", "component"])["value"].mean()  # mean over the two seeds
    annotations = _annotations(fig)
    assert len(annotations) == len(expected) == len(LAYERS) * (len(COMPONENTS) + 1)
    for (layer, component), value in expected.items():
        assert annotations[(str(layer), component)] == f"{value:.3g}"
    columns = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert columns == [*COMPONENTS, "mixer"]  # table order, whole mixer last, no per-head rows
    assert shown in fig.axes[0].get_title() and "Δ NLL (nats/token)" in fig.axes[0].get_title()


def test_default_kind_is_zero_else_the_first_present(tables):
    probes = tables["probes"]
    assert default_ablation_kind(probes) == "zero"
    assert default_ablation_kind(probes[probes["kind"] != "zero"]) == "mean"
    assert default_ablation_kind(probes[probes["component"] == "head"]) is None
    with pytest.raises(ValueError, match="no component-level"):
        sensitivity_heatmap(probes, kind="resample")


def test_large_heatmaps_are_not_annotated(tables):
    probes = tables["probes"]
    many = pd.concat([probes.assign(layer=probes["layer"] + 3 * k) for k in range(6)], ignore_index=True)
    assert not sensitivity_heatmap(many).axes[0].texts


def test_patching_shows_the_worst_label(tables):
    assert worst_patching_target(tables["patching"], tables["verdicts"]) == ("magnitude", 0.5)
    only_grid = worst_patching_target(tables["patching"], None, tables["grid"])
    assert only_grid == ("magnitude", 0.5)
    fig = patching_heatmap(tables["patching"], verdicts=tables["verdicts"])
    assert "magnitude @ 50%" in fig.axes[0].get_title()
    rows = tables["patching"][tables["patching"]["label"] == "magnitude"]
    annotations = _annotations(fig)
    for row in rows.itertuples():
        assert annotations[(str(row.layer), row.component)] == f"{row.recovered:.2f}"


def test_perplexity_bands_follow_thresholds(tables):
    fig = perplexity_vs_sparsity(tables["grid"], thresholds={"healthy": 1.5, "collapsed": 4.0})
    ax = fig.axes[0]
    edges = sorted({round(y, 6) for p in ax.patches for y in (p.get_y(), p.get_y() + p.get_height())})
    assert 1.5 in edges and 4.0 in edges
    assert ax.get_yscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["dense", "magnitude", "wanda", "wanda 2:4", "head"]


def test_html_is_self_contained(report, tables):
    out, _ = report
    page, _ = _texts(out)
    for title in TOP_TITLES:
        assert f">{title}</h2>" in page, title
        assert f'href="#{title.lower().replace(" ", "-")}"' in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(FIGURES)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    for row in tables["verdicts"].itertuples():
        assert f"<td>{row.label}</td>" in page
        assert row.explanation in page
    assert "<th>spearman</th>" in page


def test_markdown_references_figures_and_verdict_numbers(report):
    out, _ = report
    _, md = _texts(out)
    on_disk = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(on_disk) == len(FIGURES)
    for name in on_disk:
        assert f"](figures/{name})" in md
    assert "| label | sparsity | ppl_ratio | verdict | first_layer | top_layer | top_component |" in md
    assert "| wanda | 0.5 | 1.123 | healthy |  | 1 | x |" in md  # 4 significant digits; NaN first_layer empty
    assert "| magnitude | 0.5 | 3 | collapsed | 1 | 2 | dt |" in md  # 1.0 layer shown as an int
    for title in TOP_TITLES:
        assert f"\n## {title}\n" in md
    assert "- [Pruning grid](#pruning-grid)" in md and "  - [wanda at 50%](#wanda-at-50)" in md


def test_section_contents(tables):
    figs = {name: f"figures/{name}.png" for name in FIGURES}
    parts = {s.title: s for s in sections(tables, _meta(), figs)}
    assert [t for t in parts if t in TOP_TITLES] == list(TOP_TITLES)
    agreement = parts["Attribution agreement"].table
    assert agreement["spearman"].tolist()[:3] == [0.74, 0.31, -0.12] and np.isnan(agreement["spearman"].iloc[3])
    top = parts["Most damaging probes"].table
    assert len(top) == 10 and top["delta_nll"].is_monotonic_decreasing and top["component"].iloc[0] == "head"
    dyn = parts["SSM dynamics"].table
    assert list(dyn.columns) == ["label", "sparsity", "layer", "quantity", "dense", "pruned", "ratio"]
    assert len(dyn) == 20 and np.allclose(dyn["ratio"], dyn["pruned"] / dyn["dense"])
    assert np.abs(np.log(dyn["ratio"])).is_monotonic_decreasing
    assert dyn.iloc[0][["label", "layer"]].tolist() == ["magnitude", 2]  # 3.0 x 3 = the largest change
    schedule = parts["Schedule"].table
    assert list(schedule.columns) == ["layer", "z", "x", "B", "out_proj", "layer (weighted)"]
    assert schedule.loc[0, "z"] == pytest.approx(0.2)
    patch = parts["Most-recovering components"].table
    assert patch.groupby(["label", "sparsity"]).size().tolist() == [5, 5] and "mixer" not in set(patch["component"])
    expected = tables["patching"].query("label == 'wanda' and component != 'mixer'").nlargest(5, "recovered")
    assert patch["recovered"].iloc[:5].tolist() == expected["recovered"].tolist()
    assert parts["Components"].table.set_index("component").loc["dt", "params_per_layer"] == 8 * 64 + 8
    repro = dict(parts["Reproducibility"].table.itertuples(index=False, name=None))
    assert repro["seed"] == "1234" and repro["device"] == "cpu" and repro["thresholds.healthy"] == "1.2"
    assert parts["Timings"].table["seconds"].iloc[-1] == pytest.approx(42.75)
    assert parts["Summary"].figure is None and parts["Sensitivity"].figure == "sensitivity_heatmap.png"


def test_missing_tables_skip_figures_and_sections(report, tables, tmp_path, caplog):
    shutil.copytree(report[0], tmp_path, dirs_exist_ok=True)  # a full report to overwrite: stale PNGs must go
    assert (tmp_path / "figures" / "drift.png").exists()
    partial = {k: v for k, v in tables.items() if k not in ("drift", "patching", "dynamics", "dynamics_samples")}
    partial["grid"] = tables["grid"].iloc[0:0]
    partial["schedule"] = None
    with caplog.at_level(logging.WARNING, logger="sensitivity.report.figures"):
        paths = write_report(tmp_path, partial, _meta())
    gone = {"drift", "patching", "dynamics", "perplexity_vs_sparsity", "schedule"}
    assert set(paths) == {"html", "markdown", *(set(FIGURES) - gone)}
    assert sorted(p.stem for p in (tmp_path / "figures").glob("*.png")) == sorted(set(FIGURES) - gone)
    assert all(any(name in r.getMessage() for r in caplog.records) for name in gone)
    page, md = _texts(tmp_path)
    for title in ("Schedule", "Pruning grid", "Why methods collapse", "SSM dynamics"):
        assert f">{title}</h2>" not in page and f"## {title}\n" not in md
    for name in gone:
        assert f"{name}.png" not in md
    assert len(re.findall(r"<img ", page)) == len(FIGURES) - len(gone)


def test_only_summary_and_reproducibility_without_tables(tmp_path):
    meta = {"model": "m", "seed": 0, "extra_key": [1, 2]}
    assert [s.title for s in sections({}, meta, {})] == ["Summary", "Reproducibility"]
    assert make_figures({"probes": None}, meta, tmp_path / "figures") == {}
    paths = write_report(tmp_path, {}, meta)
    page, md = _texts(tmp_path)
    assert "Summary" in md and "| extra_key | 1, 2 |" in md and "<img" not in page
    assert set(paths) == {"html", "markdown"}


def test_text_and_labels_are_escaped(tables):
    verdicts = tables["verdicts"].assign(label=["<b>bold</b>", "a|b"], explanation=["x < y & z", "plain"])
    meta = _meta(model="<script>alert(1)</script>")
    parts = sections({"verdicts": verdicts}, meta, {})
    page = render_html(parts, meta, Path("."))
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "x &lt; y &amp; z" in page
    md = render_markdown(parts, meta)
    assert "<b>" not in md and "&lt;b&gt;bold&lt;/b&gt;" in md
    assert "| a\\|b | 0.5 |" in md  # a pipe in a cell does not split the row


def test_section_is_frozen_and_hashable():
    section = Section("T", "text", table=pd.DataFrame({"a": [1]}))
    with pytest.raises(AttributeError):
        section.title = "U"
    assert section == Section("T", "text", table=pd.DataFrame({"a": [2]}))  # tables are not compared
    assert hash(section) == hash(Section("T", "text"))


def test_figures_leave_global_style_alone(tables, tmp_path):
    before = dict(mpl.rcParams)
    make_figures({"drift": tables["drift"], "schedule": tables["schedule"]}, _meta(), tmp_path)
    after = dict(mpl.rcParams)
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}


def test_tables_without_sparsity_and_dollar_labels(tables):
    drift = tables["drift"].drop(columns="sparsity").assign(label=lambda d: d["label"].replace("wanda", "$5 method"))
    fig = drift_plot(drift)
    assert fig.axes[0].get_legend_handles_labels()[1] == ["\\$5 method", "magnitude"]  # one line per label
    fig.canvas.draw()  # a '$' draws as is instead of failing as mathtext
    samples = tables["dynamics_samples"].drop(columns="sparsity")
    assert len(dynamics_plot(samples).axes) == 4
    patching = tables["patching"].drop(columns="sparsity")
    assert worst_patching_target(patching, tables["verdicts"])[0] == "magnitude"


def test_templates_render_every_section_cell_and_figure(tables, tmp_path):
    """The jinja2 templates ship as package data and render everything: each section's heading and contents entry,
    table cells of the input, the embedded figure and the stylesheet; HTML text is escaped by the HTML template."""
    from importlib.resources import files

    templates = files("sensitivity.report") / "templates"
    for name in ("report.md.j2", "report.html.j2", "report.css"):
        assert templates.joinpath(name).is_file(), name
    png = PNG_MAGIC + b"not really an image"
    (tmp_path / "drift.png").write_bytes(png)
    meta = _meta(model="<b>model</b>")
    parts = sections(tables, meta, {"drift": tmp_path / "drift.png"})
    parts.append(Section("<b>bold</b> label", "x <b>y</b> & z", table=pd.DataFrame({"name": ["<b>cell</b>"]})))
    md, page = render_markdown(parts, meta), render_html(parts, meta, tmp_path)
    assert md.startswith("# Sensitivity report: &lt;b&gt;model&lt;/b&gt;\n") and md.endswith(" |\n")
    assert not md.endswith("\n\n") and "Created 2025-01-01T00:00:00+00:00; sensitivity 0.1.0; seed 1234." in md
    assert page.startswith("<!DOCTYPE html>\n") and page.endswith("</html>\n")
    assert "<title>Sensitivity report: &lt;b&gt;model&lt;/b&gt;</title>" in page
    assert ":root {" in page and "#table-0 td:nth-child(2) { text-align: right; }" in page  # report.css + rules
    for part in parts[:-1]:
        level = max(part.level, 2)
        assert f"\n{'#' * level} {part.title}\n" in md, part.title
        assert f">{part.title}</h{level}>" in page, part.title
        assert f"[{part.title}](#" in md and f'">{part.title}</a>' in page, part.title
    for cell in ("22.47", "taylor", "0.74", "in_proj.weight, dt_bias"):  # grid, agreement, components
        assert f"| {cell} |" in md and f"<td>{cell}</td>" in page, cell
    assert page.count("<section ") == len(parts) and page.count("<table ") == sum(p.table is not None for p in parts)
    assert "](figures/drift.png)" in md
    assert f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="Why methods collapse">' in page
    assert "<b>" not in md and "<b>" not in page
    assert "## &lt;b&gt;bold&lt;/b&gt; label\n\nx &lt;b&gt;y&lt;/b&gt; & z\n" in md
    assert "<h2>&lt;b&gt;bold&lt;/b&gt; label</h2>\n<p>x &lt;b&gt;y&lt;/b&gt; &amp; z</p>" in page
    assert "<td>&lt;b&gt;cell&lt;/b&gt;</td>" in page and "| &lt;b&gt;cell&lt;/b&gt; |" in md

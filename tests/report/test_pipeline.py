"""The report pipeline end to end on a tiny model: every file, section and table; resuming; bad settings."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import sensitivity.report.grid
import sensitivity.report.pipeline
from sensitivity.report import ReportOptions, build_report
from sensitivity.report.render import SECTION_TITLES

TINY = dict(model="tiny:mamba2", data="sample", seqlen=32, probe_windows=2, probe_kinds=["zero", "wanda"],
            probe_sparsities=[0.25, 0.5, 0.75, 0.9], attribution_windows=2, calib_windows=2, eval_windows=3,
            eval_seqlen=64, explain_windows=2)  # fmt: skip
FIGURES = ["sensitivity_heatmap", "sparsity_curves", "perplexity_vs_sparsity", "schedule", "drift", "dynamics",
           "patching"]  # fmt: skip
TABLES = ["components", "probes", "attribution", "agreement", "schedule", "grid", "drift", "patching", "dynamics",
          "dynamics_samples", "states", "verdicts"]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "tiny"
    return out, build_report(out, show_progress=False, **TINY)


def test_every_section_figure_and_table_is_written(report):
    out, paths = report
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for title in SECTION_TITLES:
        assert f">{title}</h2>" in html and f"## {title}" in md, title
    for name in FIGURES:
        png = out / "figures" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}.png" in md
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert "http://" not in html and "https://" not in html
    for name in TABLES:
        df = pd.read_csv(out / "data" / f"{name}.csv")
        assert len(df) > 0, name
    assert paths["html"] == out / "report.html" and paths["schedule_yaml"] == out / "schedule.yaml"


def test_grid_and_verdicts_are_consistent(report):
    out, _ = report
    grid = pd.read_csv(out / "data" / "grid.csv")
    labels = set(grid.label)
    assert {"dense", "magnitude", "wanda", "wanda+sensitivity", "wanda 2:4", "state", "head", "headdim"} <= labels
    runs = grid[grid.sparsity == 0.5].set_index("label")  # method, allocator, structure: columns; label: display
    assert runs.loc["wanda+sensitivity", ["method", "allocator"]].tolist() == ["wanda", "sensitivity"]
    assert runs.loc["wanda 2:4", ["method", "structure", "sparsity"]].tolist() == ["wanda", "2:4", 0.5]
    assert runs.loc["head", ["method", "allocator", "structure"]].fillna("").tolist() == ["head", "", ""]
    dense = grid[grid.label == "dense"].iloc[0]
    assert dense.ppl_ratio == pytest.approx(1.0)
    # ppl_ratio is exp of the NLL difference, and the verdict follows the thresholds
    ratio = (grid.nll - dense.nll).map(lambda d: __import__("math").exp(d))
    assert (grid.ppl_ratio - ratio).abs().max() < 1e-6
    pruned = grid[grid.label != "dense"]
    expected = ["healthy" if r <= 1.2 else "collapsed" if r >= 2.0 else "degraded" for r in pruned.ppl_ratio]
    assert list(pruned.verdict) == expected
    verdicts = pd.read_csv(out / "data" / "verdicts.csv")
    assert set(verdicts.label) == {"magnitude", "wanda", "wanda+sensitivity", "state", "head", "headdim"}
    merged = verdicts.merge(grid, on=["label", "sparsity"], suffixes=("", "_grid"))
    assert len(merged) == len(verdicts) and (merged.verdict == merged.verdict_grid).all()
    assert verdicts.explanation.str.len().min() > 50


def test_manifest_records_seed_versions_config_and_outputs(report):
    out, _ = report
    m = json.loads((out / "manifest.json").read_text())
    assert m["job"] == "report" and m["status"] == "complete"
    assert m["seed"] == 0 and m["spec"]["model"] == "tiny:mamba2" and "torch" in m["versions"]
    assert m["spec"]["out"] == str(out) and m["spec"]["probe_kinds"] == ["zero", "wanda"]
    assert set(m["steps"]) == {"components", "probes", "attribution", "agreement", "schedule", "grid", "explain",
                               "render"}  # fmt: skip
    assert "report.html" in m["outputs"] and "data/grid.csv" in m["outputs"]
    assert "token-level perplexity" in m["meta"]["ppl_definition"]
    schedule = (out / "schedule.yaml").read_text()
    assert "sparsity" in schedule and (out / "recipe.yaml").is_file()


def test_rerun_resumes_without_recomputing(report, monkeypatch):
    out, _ = report
    grid_before = pd.read_csv(out / "data" / "grid.csv")

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a finished step")

    monkeypatch.setattr(sensitivity.report.grid, "perplexity", fail)
    monkeypatch.setattr(sensitivity.report.pipeline, "explain", fail)
    build_report(out, show_progress=False, **TINY)
    pd.testing.assert_frame_equal(pd.read_csv(out / "data" / "grid.csv"), grid_before)
    assert json.loads((out / "manifest.json").read_text())["resumed"] is True


def test_an_interrupted_run_finishes_only_what_is_missing(report, monkeypatch):
    out, _ = report
    grid = pd.read_csv(out / "data" / "grid.csv")
    grid[grid.label != "state"].to_csv(out / "data" / "grid.csv", index=False)  # as if killed before "state" ran
    calls = []
    real = sensitivity.report.grid.perplexity
    monkeypatch.setattr(sensitivity.report.grid, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    build_report(out, show_progress=False, **TINY)
    assert len(calls) == (grid.label == "state").sum()
    again = pd.read_csv(out / "data" / "grid.csv")
    assert len(again) == len(grid) and set(again.label) == set(grid.label)


def test_other_settings_in_the_same_directory_are_refused(report, tmp_path):
    out, _ = report
    with pytest.raises(ValueError, match=r"holds a report run with other settings \(seed\)"):
        build_report(out, show_progress=False, **{**TINY, "seed": 1})
    (tmp_path / "junk.txt").write_text("x")
    for overwrite in (False, True):  # --overwrite never deletes a directory that holds no report
        with pytest.raises(ValueError, match="not empty and holds no sensitivity output"):
            build_report(tmp_path, show_progress=False, overwrite=overwrite, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.txt"]  # nothing half-written


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"grid": "huge"}, "grid: 'huge' is invalid; allowed: one of 'reduced' or 'full'"),
        ({"budget": 1.0}, "budget: 1.0 is out of range; allowed: 0 < value < 1"),
        ({"eval_windows": 0}, "eval_windows: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        ({"sparsities": [0.5, 1.2]}, "sparsities.1: 1.2 is out of range"),
        ({"healthy": 2.5}, "collapsed: 2.0 is not above healthy=2.5"),
        ({"probe_kinds": ["zero", "zap"]}, "probe_kinds: unknown ablation kind 'zap'"),
        ({"exact": "top:0"}, "exact: 'top:0' is not one of all, none, top:K"),
        ({"colour": "red"}, "colour: unknown field; allowed: healthy, collapsed, backend"),
    ],
)
def test_bad_settings_are_named(options, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        ReportOptions(**options)
    assert ReportOptions(eval_windows="all").eval_windows is None  # the command line's word for the whole split


def test_exact_top_k_estimates_every_probe_and_measures_the_k_worst_exactly(tmp_path):
    # the K most damaging by the estimate, and every WANDA probe (the sensitivity schedule's curves: exact)
    out = tmp_path / "topk"
    build_report(out, show_progress=False, exact="top:3", **TINY)
    probes = pd.read_csv(out / "data" / "probes.csv")
    estimates = pd.read_csv(out / "probes-estimate" / "probes.csv")
    exact = pd.read_csv(out / "probes" / "probes.csv")
    damage = estimates[estimates.metric == "delta_nll"]
    wanted = pd.concat([damage.nlargest(3, "value"), damage[damage.kind == "wanda"]]).drop_duplicates()
    assert estimates.estimated.all() and not exact.estimated.any() and len(exact) == 3 * len(wanted)
    assert len(wanted) < len(damage)
    measured = probes[~probes.estimated]
    key = ["layer", "component", "kind", "sparsity"]
    assert sorted(map(tuple, measured[measured.metric == "delta_nll"][key].fillna(-1).values.tolist())) == sorted(
        map(tuple, wanted[key].fillna(-1).values.tolist()))  # fmt: skip
    got = measured.set_index(key + ["metric"]).value.sort_index()
    assert got.to_numpy() == pytest.approx(exact.set_index(key + ["metric"]).value.sort_index().to_numpy())
    assert len(probes) == len(estimates) and probes.estimated.sum() == len(probes) - 3 * len(wanted)
    assert set(probes[~probes.estimated].estimator) == {"exact"}
    assert set(probes[probes.estimated].estimator) == {"fisher K=2, layer"}  # zero probes: read at the layer output
    md = (out / "report.md").read_text()
    assert f"{len(probes) // 3 - len(wanted)} of {len(probes) // 3} probes are estimates ('fisher K=2, layer'" in md
    assert json.loads((out / "manifest.json").read_text())["spec"]["exact"] == "top:3"

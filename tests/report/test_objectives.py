"""The grid and the report with task objectives: an accuracy column per objective, a section per objective."""

from __future__ import annotations

import pandas as pd
import pytest

from sensitivity.core import load_model
from sensitivity.eval.objectives import objective_column, objective_scores
from sensitivity.eval.recall import recall_accuracy
from sensitivity.eval.tasks import score_builtin
from sensitivity.jobs import run
from sensitivity.report import build_report
from sensitivity.report.job import GridSpec


def test_objective_scores_equal_each_scorer(one_thread):
    lm = load_model("tiny:mamba2")
    got = objective_scores(lm, lm.tokenizer, ["text", "cloze", "recall:3"], items=6, seed=1)
    assert set(got) == {"cloze_acc", "recall3_acc"} and objective_column("recall") == "recall_acc"
    cloze = score_builtin(lm, "cloze", max_items=6, show_progress=False)
    assert got["cloze_acc"] == next(r["value"] for r in cloze if r["metric"] == "acc")
    recall = recall_accuracy(lm, lm.tokenizer, pairs=(3,), items=6, seed=1, show_progress=False)
    assert got["recall3_acc"] == recall.correct.mean()


def test_grid_has_a_column_per_objective(tmp_path, one_thread):
    spec = GridSpec(models=["tiny:mamba2"], data="sample", sparsities=[0.5], structured_sparsities=[0.5],
                    allocators=["depth"], structure="unstructured", calib_windows=2, seqlen=32, eval_seqlen=64,
                    eval_windows=2, tasks="choice,recall:2", task_items=4, out=str(tmp_path / "g"))  # fmt: skip
    df = run(spec, show_progress=False).value
    assert {"choice_acc", "recall2_acc"} <= set(df.columns)
    assert df.choice_acc.between(0, 1).all() and df.recall2_acc.between(0, 1).all()
    csv = pd.read_csv(tmp_path / "g" / "grid.csv")
    assert list(csv.choice_acc.round(6)) == list(df.choice_acc.round(6))
    lm = load_model("tiny:mamba2")
    dense = objective_scores(lm, lm.tokenizer, ["choice", "recall:2"], items=4)
    assert df[df.method == "dense"].iloc[0].recall2_acc == pytest.approx(dense["recall2_acc"])
    assert df[df.method == "dense"].iloc[0].choice_acc == pytest.approx(dense["choice_acc"])


def test_report_has_a_section_per_objective(tmp_path, one_thread):
    out = tmp_path / "r"
    paths = build_report(out, model="tiny:mamba2", data="sample", tasks=["recall:2"], task_items=4, explain_items=4,
                         recall_pairs=[1, 2], long_seqlen=64, long_windows=2, probe_windows=2, calib_windows=2,
                         eval_windows=2, eval_seqlen=64, explain_windows=2, attribution_windows=2, seqlen=32,
                         sparsities=[0.5], structured_sparsities=[0.5], probe_kinds=["wanda"], show_progress=False)
    assert {"objectives", "recall_pairs", "positions"} <= set(paths)
    md = (out / "report.md").read_text()
    assert "## Objectives" in md and "### Objective: recall:2" in md and "### Verdicts on recall:2" in md
    objectives = pd.read_csv(out / "data" / "objectives.csv")
    grid = pd.read_csv(out / "data" / "grid.csv")
    assert list(objectives.accuracy) == list(grid.recall2_acc)
    verdicts = pd.read_csv(out / "data" / "objective_verdicts.csv")
    assert set(verdicts.objective) == {"recall:2"} and len(verdicts) == len(pd.read_csv(out / "data" /
                                                                                       "verdicts.csv"))
    curves = pd.read_csv(out / "data" / "curves.csv")
    assert set(curves.curve) == {"recall_pairs", "position_nll"} and "dense" in set(curves.label)
    dense = curves[(curves.label == "dense") & (curves.curve == "recall_pairs")].set_index("x").value
    lm = load_model("tiny:mamba2")
    expected = recall_accuracy(lm, lm.tokenizer, pairs=(1, 2), items=64, seed=0, show_progress=False)
    assert dense.to_dict() == pytest.approx(expected.groupby("pairs").correct.mean().to_dict())
    # resumed: nothing recomputed, the same tables
    again = build_report(out, model="tiny:mamba2", data="sample", tasks=["recall:2"], task_items=4,
                         explain_items=4, recall_pairs=[1, 2], long_seqlen=64, long_windows=2, probe_windows=2,
                         calib_windows=2, eval_windows=2, eval_seqlen=64, explain_windows=2, attribution_windows=2,
                         seqlen=32, sparsities=[0.5], structured_sparsities=[0.5], probe_kinds=["wanda"],
                         show_progress=False)  # fmt: skip
    assert pd.read_csv(again["data"] / "curves.csv").equals(curves)

"""``sensitivity evaluate --tasks``, run as a user would: printed table, tasks.csv, JSON, exit codes."""

import csv
import json
import re
import subprocess
import sys

import pytest

from sensitivity import load_model
from sensitivity.core.spec import SpecError
from sensitivity.eval import evaluate_tasks
from sensitivity.eval.job import EvaluateSpec


def run(*args):
    return subprocess.run([sys.executable, "-m", "sensitivity", *args], capture_output=True, text=True, timeout=300)


BASE = ("evaluate", "--model", "tiny:mamba2", "--seqlen", "32", "--max-windows", "1")


def test_evaluate_tasks_prints_a_table_and_writes_tasks_csv(tmp_path):
    out = tmp_path / "run"
    proc = run(*BASE, "--tasks", "cloze,choice", "--limit", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    table = lines[lines.index("tasks") + 1 : lines.index("tasks") + 6]
    assert table[0].split() == ["task", "metric", "value", "stderr", "n"]
    assert [row.split()[:2] for row in table[1:]] == [["cloze", "acc"], ["cloze", "perplexity"], ["choice", "acc"],
                                                      ["choice", "acc_norm"]]  # fmt: skip
    assert f"wrote       {out / 'tasks.csv'}" in lines
    rows = list(csv.DictReader((out / "tasks.csv").open()))
    assert [r["metric"] for r in rows] == ["acc", "perplexity", "acc", "acc_norm"]
    assert list(rows[0]) == ["task", "metric", "value", "stderr", "n", "definition"]
    expected = evaluate_tasks(load_model("tiny:mamba2"), ["cloze", "choice"], limit=4, show_progress=False)
    assert [float(r["value"]) for r in rows] == pytest.approx(list(expected.value), rel=1e-6)
    assert {r["n"] for r in rows} == {"4"}
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert [t["metric"] for t in evaluation["tasks"]] == [r["metric"] for r in rows] and "perplexity" in evaluation
    spec = json.loads((out / "manifest.json").read_text())["spec"]
    assert (spec["tasks"], spec["engine"], spec["limit"], spec["max_length"]) == (["cloze", "choice"], "auto", 4, None)


def test_evaluate_tasks_json_is_clean():
    proc = run(*BASE, "--tasks", "choice", "--limit", "2", "--engine", "builtin", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [(t["task"], t["metric"], t["n"]) for t in out["tasks"]] == [("choice", "acc", 2), ("choice", "acc_norm", 2)]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "nope", "--engine", "builtin"],
         "argument --tasks: task 'nope' has no built-in scorer; allowed with engine 'builtin': cloze, choice"),
        (["--tasks", "cloze,/no/such.yaml"], "argument --tasks: task YAML '/no/such.yaml' does not exist"),
    ],
)
def test_bad_tasks_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "never"
    proc = run(*BASE, *args, "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert proc.stdout == "" and not out.exists()


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"tasks": "cloze,,choice"}, "tasks: 'cloze,,choice' is not a comma-separated list of names"),
        ({"tasks": "cloze", "engine": "fast"}, "engine: 'fast' is invalid; allowed: one of 'auto', 'builtin' or"),
        ({"tasks": "cloze", "limit": 0}, "limit: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        ({"tasks": "cloze", "max_length": 1}, "max_length: 1 is out of range; allowed: 2 <= value <= 67,108,864"),
    ],
)
def test_task_fields_are_validated_by_the_spec(fields, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        EvaluateSpec(**fields)


def test_task_fields_round_trip_and_default_to_none():
    spec = EvaluateSpec(tasks="cloze,choice", limit=50)
    assert spec.tasks == ("cloze", "choice") and EvaluateSpec.from_yaml(spec.to_yaml()) == spec
    assert EvaluateSpec().tasks == () and EvaluateSpec(tasks="none").tasks == ()


@pytest.mark.parametrize(("argv", "message"), [
    (["probe", "--task", "recal", "--out"], "argument --task: unknown task 'recal'; allowed: text, cloze, choice"),
    (["explain", "--method", "wanda", "--sparsity", "0.5", "--task", "recall:0", "--out"], "'recall:0' has 0 pairs"),
    (["grid", "--tasks", "cloze,nope", "--out"], "argument --tasks: 1: unknown task 'nope'"),
    (["probe", "--task-items", "0", "--out"], "argument --task-items: 0 is out of range"),
])  # fmt: skip
def test_bad_objective_flags_exit_2_with_one_line_and_write_nothing(tmp_path, argv, message):
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sensitivity", *argv, str(out)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()

"""`sensitivity explain` and `sensitivity report`, as a user runs them."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from sensitivity.cli.main import main

SMALL = ["--data", "sample", "--seqlen", "32", "--windows", "2"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "sensitivity", *args], capture_output=True, text=True, timeout=300)


def test_explain_a_method_writes_the_explanation_and_prints_it(tmp_path):
    out = tmp_path / "e"
    proc = run("explain", "--dense", "tiny:mamba2", "--method", "magnitude", "--sparsity", "0.5", *SMALL,
               "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "explanation.json").read_text())
    assert record["label"] == "magnitude" and record["sparsity"] == 0.5
    assert record["verdict"] in ("healthy", "degraded", "collapsed")
    assert proc.stdout.startswith(record["explanation"])
    patching = pd.read_csv(out / "patching.csv")
    assert patching.recovered.iloc[0] == patching.recovered.max()
    assert f"{patching.component.iloc[0]}" in proc.stdout and "token-level perplexity" in proc.stdout


def test_explain_a_pruned_checkpoint_reads_its_manifest(tmp_path):
    pruned = tmp_path / "p"
    proc = run("prune", "--model", "tiny:mamba", "--data", "sample", "--seqlen", "32", "--method", "magnitude",
               "--sparsity", "0.4", "--out", str(pruned))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "e"
    proc = run("explain", "--dense", "tiny:mamba", "--pruned", str(pruned), *SMALL, "--top-layers", "1",
               "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "explanation.json").read_text())
    assert record["label"] == "magnitude" and record["sparsity"] == 0.4
    assert "components of the top 1 layers only" in record["meta"]["patched"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "wanda"], "argument --sparsity: method wanda needs a sparsity"),
        (["--method", "wanda", "--sparsity", "1.5"], "argument --sparsity: 1.5 is out of range"),
        (["--pruned", "no/where/at/all"], "argument --pruned: model path 'no/where/at/all' does not exist"),
        (["--pruned", ".", "--sparsity", "0.5"], "argument --sparsity: goes with method"),
        (["--method", "wanda", "--sparsity", "0.5", "--healthy", "3"], "argument --collapsed: 2.0 is not above "
                                                                       "healthy=3.0; need 1 <= healthy < collapsed"),
        (["--method", "obs", "--sparsity", "0.5"], "argument --method: unknown pruning method 'obs'"),
        (["--sparsity", "0.5"], "argument --method: give exactly one of a pruned checkpoint (pruned) or a method"),
    ],
)
def test_explain_bad_arguments_exit_2_without_writing(tmp_path, capsys, args, message):
    out = tmp_path / "e"
    with pytest.raises(SystemExit) as exit_info:  # in-process: the same main() as the console script
        main(["explain", "--dense", "tiny:mamba2", *args, "--out", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_explain_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("keep")
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--dense", "tiny:mamba2", "--method", "magnitude", "--sparsity", "0.5", *SMALL,
              "--out", str(tmp_path)])  # fmt: skip
    assert exit_info.value.code == 2 and "is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eval-windows", "0"], "argument --eval-windows: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        (["--budget", "1.5"], "argument --budget: 1.5 is out of range; allowed: 0 < value < 1"),
        (["--grid", "all"], "argument --grid: 'all' is invalid; allowed: one of 'reduced' or 'full'"),
        (["--explain-sparsity", "0"], "argument --explain-sparsity: 0.0 is out of range"),
    ],
)
def test_report_bad_arguments_exit_2_without_writing(tmp_path, capsys, args, message):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--model", "tiny:mamba2", *args, "--out", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()

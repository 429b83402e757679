"""The command line, run as a user would: subprocesses, output, exit codes."""

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sensitivity import eval_windows, load_corpus, load_model, perplexity
from sensitivity.zoo import list_models


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sensitivity", *args], capture_output=True, text=True, timeout=300)


def test_components_csv_matches_registry():
    proc = run("components", "--model", "tiny:mamba2", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    reg = load_model("tiny:mamba2").registry
    assert len(rows) == reg.n_layers * sum(max(1, len(c.tensors)) for c in reg.components)
    b = next(r for r in rows if r["layer"] == "1" and r["component"] == "B")
    ED, GN = reg.dims["ED"], reg.dims["G"] * reg.dims["N"]
    assert (b["tensor"], b["rows"], b["shape"], b["hook"]) == ("in_proj.weight", f"{2 * ED}:{2 * ED + GN}",
                                                               f"{GN}x{reg.dims['D']}", "B")


def test_components_table_and_json():
    proc = run("components", "--model", "tiny:falcon-mamba")
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[0].startswith("tiny:falcon-mamba: falcon_mamba, 2 layers")
    assert "dt_proj.weight" in proc.stdout and "B_norm" in proc.stdout
    data = json.loads(run("components", "--model", "tiny:mamba", "--format", "json").stdout)
    assert data["arch"] == "mamba" and data["dims"]["N"] == 8


def test_evaluate_json_equals_python_api():
    proc = run("evaluate", "--model", "tiny:mamba", "--seqlen", "64", "--max-windows", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"perplexity", "nll", "tokens", "windows", "seqlen", "definition", "seed", "versions"} <= out.keys()
    assert (out["windows"], out["seqlen"], out["tokens"], out["split"]) == (3, 64, 3 * 63, "test")
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"]))
    lm = load_model("tiny:mamba")
    corpus = load_corpus("austen-kjv")  # the default --data
    expected = perplexity(lm, eval_windows(corpus, lm.tokenizer, 64, max_windows=3), show_progress=False)
    assert out["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)


def test_evaluate_text_output_with_reference(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n\n" * 40)
    proc = run("evaluate", "--model", "tiny:mamba2", "--data", str(text), "--seqlen", "32",
               "--reference", "tiny:mamba2")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert float(lines["perplexity"]) > 1
    assert lines["kl"].startswith("0.00000 nats/token")
    assert "non-overlapping windows of 32 tokens (stride 32)" in lines["definition"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["evaluate", "--seqlen", "1"], "argument --seqlen: 1 is out of range; allowed: 2 <= value <= 67,108,864"),
        (["evaluate", "--max-windows", "x"], "argument --max-windows: 'x' is invalid; allowed: an integer"),
        (["evaluate", "--batch-size", "0"],
         "argument --batch-size: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        (["evaluate", "--dtype", "int8"], "argument --dtype: 'int8' is invalid; allowed: one of 'float32'"),
        (["evaluate", "--colour", "red"], "unrecognized arguments: --colour red"),
        (["evaluate", "--model", "tiny:gpt"], "unknown built-in model 'tiny:gpt'"),
        (["evaluate", "--data", "/no/such/file.txt"], "'/no/such/file.txt' is neither an existing path"),
        (["evaluate", "--seqlen", "1000000"], "fewer than one window of 1000000"),
        (["components", "--format", "xml"], "argument --format: 'xml' is invalid; allowed: table, csv, json"),
        (["components", "--model", "/no/such/dir/"], "model path '/no/such/dir/' does not exist"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    proc = run(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "sensitivity"
    if not script.exists():
        pytest.skip("package not installed into this interpreter's environment (make test installs it)")
    proc = subprocess.run([str(script), "components", "--model", "tiny:mamba", "--format", "csv"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("layer,unit,component,tensor")


def test_zoo_list_shows_both_models_with_their_cards():
    proc = run("zoo", "list")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert rows[0][:4] == ["name", "arch", "parameters", "size"]
    cards = {m.name: m.card for m in list_models()}
    by_name = {row[0]: row for row in rows[1:3]}
    assert set(by_name) == {"default", "default-mamba1"}
    for name, row in by_name.items():
        assert row[1] == cards[name]["arch"]
        assert f"{cards[name]['test_perplexity']:.2f}" in row
        assert f"{cards[name]['tokens_seen']:,}" in row
    assert "default-mamba2" in by_name["default"]
    assert json.loads(run("zoo", "list", "--json").stdout)[1]["name"] == "default-mamba1"


@pytest.mark.slow
def test_evaluate_without_arguments_reports_the_default_models_test_perplexity():
    proc = run("evaluate")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    card = list_models()[0].card
    assert lines["model"].startswith("default (mamba2")
    assert lines["data"] == "austen-kjv, split 'test'"
    assert float(lines["perplexity"]) == pytest.approx(card["test_perplexity"], rel=0.01)
    assert lines["definition"] == card["test_definition"]


def test_an_unexpected_error_is_one_line_exit_1_and_its_traceback_only_under_debug(monkeypatch, capsys):
    import importlib

    import pytest

    cli = importlib.import_module("sensitivity.cli.main")

    def broken(args, flags):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "_run_job", broken)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--model", "tiny:mamba2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err == ("sensitivity evaluate: internal error: RuntimeError: boom second line (a bug: rerun with --debug "
                   "for the traceback and report it)\n")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", "evaluate", "--model", "tiny:mamba2"])

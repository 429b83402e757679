"""`sensitivity probe`, `attribute` and `agreement` as a user runs them: files written, exit codes, resume."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from sensitivity import load_corpus, load_model
from sensitivity.probes import probe

SMALL = ["--model", "tiny:mamba2", "--data", "sample", "--seqlen", "32", "--windows", "2"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "sensitivity", *args], capture_output=True, text=True, timeout=300)


def test_probe_writes_csv_and_manifest_equal_to_the_python_api(tmp_path):
    out = tmp_path / "p"
    proc = run("probe", *SMALL, "--calib-windows", "2", "--out", str(out), "--layers", "1", "--kinds", "zero,wanda",
               "--sparsities", "0.5", "--components", "dt,B,mixer")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "probes of tiny:mamba2" in proc.stdout and "most damaging" in proc.stdout
    df = pd.read_csv(out / "probes.csv")
    expected = probe(load_model("tiny:mamba2"), load_corpus("sample"), components=["dt", "B", "mixer"],
                     kinds=["zero", "wanda"], sparsities=[0.5], layers=[1], windows=2, calib_windows=2,
                     seqlen=32, show_progress=False)  # fmt: skip
    assert list(df.kind.unique()) == ["zero", "wanda"] and len(df) == len(expected)
    assert set(df[df.kind == "wanda"].sparsity) == {0.5} and df[df.kind == "zero"].sparsity.isna().all()
    assert df.value.to_numpy() == pytest.approx(expected.value.to_numpy(), rel=1e-8, abs=1e-12)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["model"] == "tiny:mamba2" and manifest["seed"] == 0 and manifest["seqlen"] == 32
    assert manifest["status"] == "complete" and "sweep_s" in manifest["timings"] and "torch" in manifest["versions"]
    again = run("probe", *SMALL, "--calib-windows", "2", "--out", str(out), "--layers", "1", "--kinds", "zero,wanda",
                "--sparsities", "0.5", "--components", "dt,B,mixer")  # fmt: skip
    assert again.returncode == 0 and json.loads((out / "manifest.json").read_text())["resumed_with"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kinds", "zap"], "argument --kinds: unknown ablation kind 'zap'; allowed: zero, mean, resample"),
        (["--components", "q_proj"], "argument --components: unknown component 'q_proj' for mamba2; allowed: z, x, B"),
        (["--layers", "5"], "argument --layers: 5 is out of range; allowed: 0..1"),
        (["--layers", "x"], "argument --layers: 0: 'x' is invalid; allowed: an integer"),
        (["--sparsities", "0.9,2"], "argument --sparsities: 1: 2.0 is out of range; allowed: 0 < value < 1"),
        (["--windows", "0"], "argument --windows: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        (["--data", "/nonexistent.txt"], "/nonexistent.txt"),
    ],
)
def test_probe_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    from sensitivity.cli.main import main

    with pytest.raises(SystemExit) as exit_info:  # in-process: the same main() as the console script
        main(["probe", *SMALL, "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_probe_into_another_sweeps_directory_exits_2_and_keeps_it(tmp_path):
    out = tmp_path / "p"
    assert run("probe", *SMALL, "--out", str(out), "--components", "D", "--kinds", "zero").returncode == 0
    before = (out / "probes.csv").read_bytes()
    proc = run("probe", *SMALL, "--out", str(out), "--components", "D", "--kinds", "zero", "--seed", "3")
    assert proc.returncode == 2 and "holds a probe run with other settings (seed)" in proc.stderr
    assert (out / "probes.csv").read_bytes() == before


def test_attribute_then_agreement(tmp_path):
    p = run("probe", *SMALL, "--out", str(tmp_path / "p"), "--kinds", "zero,bypass", "--components", "x,z,dt,B,C")
    assert p.returncode == 0, p.stderr
    a = run("attribute", *SMALL, "--out", str(tmp_path / "a"), "--methods", "taylor,act_norm")
    assert a.returncode == 0, a.stderr
    att = pd.read_csv(tmp_path / "a" / "attribution.csv")
    assert list(att.columns) == ["layer", "component", "kind", "metric", "value", "seed"]
    assert set(att.kind) == {"taylor", "act_norm"}
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["methods"] == ["taylor", "act_norm"] and manifest["seed"] == 0
    g = run("agreement", "--probes", str(tmp_path / "p"), "--attribution", str(tmp_path / "a" / "attribution.csv"))
    assert g.returncode == 0, g.stderr
    table = pd.read_csv(tmp_path / "p" / "agreement.csv")
    assert {"attribution", "ablation", "spearman", "kendall", "n"} <= set(table.columns)
    assert set(table.ablation) == {"zero", "bypass"} and (table.n == 10).any()
    assert "spearman" in g.stdout
    bad_out = run("agreement", "--probes", str(tmp_path / "p"), "--attribution", str(tmp_path / "a"), "--out",
                  str(tmp_path / "no" / "where.csv"))  # fmt: skip
    assert bad_out.returncode == 2 and "argument --out: cannot write" in bad_out.stderr
    assert "no does not exist" in bad_out.stderr
    assert not (tmp_path / "no").exists()
    missing = run("agreement", "--probes", str(tmp_path / "nowhere"), "--attribution", str(tmp_path / "a"))
    assert missing.returncode == 2 and "probes.csv" in missing.stderr


def test_attribute_unknown_method_exits_2_before_loading(tmp_path, capsys):
    from sensitivity.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["attribute", "--model", "/no/such/model", "--out", str(tmp_path / "a"), "--methods", "taylor,zap"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown attribution method 'zap'; allowed: act_norm, taylor" in err
    assert not (tmp_path / "a").exists()

"""`sensitivity schedule`, `prune` and `evaluate` of the result, as a user runs them."""

import json
import subprocess
import sys

import pytest
import torch

from sensitivity import load_corpus, load_model
from sensitivity.allocation import Schedule
from sensitivity.data import calibration_windows
from sensitivity.pruning import prune

SMALL = ["--model", "tiny:mamba2", "--data", "sample", "--seqlen", "32", "--calib-windows", "2"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "sensitivity", *args], capture_output=True, text=True, timeout=300)


def test_prune_then_evaluate_matches_the_python_api(tmp_path):
    out = tmp_path / "w"
    proc = run("prune", *SMALL, "--method", "wanda", "--sparsity", "0.5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "wanda pruned tiny:mamba2" in proc.stdout and "targets     0.5000 zeros" in proc.stdout
    lm = load_model("tiny:mamba2")
    prune(lm, "wanda", sparsity=0.5, windows=calibration_windows(load_corpus("sample"), lm.tokenizer, 2, 32, seed=0),
          show_progress=False)  # fmt: skip
    saved = load_model(out)
    for a, b in zip(lm.model.parameters(), saved.model.parameters()):
        assert torch.equal(a, b)
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["data"] == "sample" and manifest["calibration"]["n"] == 2
    ev = run("evaluate", "--model", str(out), "--data", "sample", "--seqlen", "32", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["perplexity"] > 1


def test_schedule_then_prune_with_it(tmp_path):
    yaml_path, recipe = tmp_path / "s.yaml", tmp_path / "recipe.yaml"
    proc = run("schedule", *SMALL, "--method", "depth", "--budget", "0.4", "--out", str(yaml_path),
               "--recipe", str(recipe))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    schedule = Schedule.from_yaml(yaml_path)
    assert schedule.overall() == pytest.approx(0.4, abs=1e-9) and schedule.meta["seed"] == 0
    assert schedule.per_layer()[0] < schedule.per_layer()[1]
    assert "sparsity" in recipe.read_text()
    out = tmp_path / "m"
    proc = run("prune", *SMALL, "--method", "magnitude", "--schedule", str(yaml_path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["schedule"]["method"] == "depth"
    layer0 = [r for r in manifest["sparsity"] if r["layer"] == 0 and r["component"] == "x"][0]
    assert layer0["sparsity"] == pytest.approx(schedule.get(0, "x"), abs=1 / 64)


def test_structured_prune_shrinks_and_reloads(tmp_path):
    out = tmp_path / "h"
    proc = run("prune", *SMALL, "--method", "head", "--sparsity", "0.5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "mode shrink" in proc.stdout
    lm = load_model(out)
    assert lm.model.config.num_heads == 4 and lm.registry.dims["H"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "wanda", "--sparsity", "1.5"], "argument --sparsity: 1.5 is out of range; allowed: 0 <="),
        (["--method", "wanda"], "argument --sparsity: wanda needs a sparsity, a schedule or an n:m structure"),
        (["--method", "obs", "--sparsity", "0.5"], "argument --method: unknown pruning method 'obs'"),
        (["--method", "wanda", "--structure", "2-4"], "argument --structure: '2-4' is invalid"),
        (["--method", "wanda", "--schedule", "/nonexistent.yaml"], "argument --schedule: '/nonexistent.yaml' does "
                                                                     "not exist"),
        (["--method", "head", "--sparsity", "0.5", "--model", "tiny:mamba"],
         "pruning method 'head' does not apply to mamba models; it needs mamba2"),
        (["--method", "wanda", "--sparsity", "0.5", "--score", "flap"], "argument --score: not an option of 'wanda'"),
        (["--method", "wanda", "--sparsity", "0.5", "--model", "default", "--out", "@ZOO@"],
         "is inside the source checkpoint"),
    ],
)
def test_prune_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    from sensitivity.cli.main import main
    from sensitivity.zoo import zoo_path

    out = str(zoo_path("default") / "pruned") if "@ZOO@" in args else str(tmp_path / "o")
    args = [a for a in args if a not in ("--out", "@ZOO@")]
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", *SMALL, *args, "--out", out])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (zoo_path("default") / "pruned").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "owl", "--budget", "1.0"], "argument --budget: 1.0 is out of range"),
        (["--method", "sensitivity", "--budget", "0.5"], "argument --probes: sensitivity with these"),
        (["--method", "sensitivity", "--budget", "0.5", "--probes", "/nonexistent"],
         "argument --probes: '/nonexistent' does not exist"),
        (["--method", "depth", "--budget", "0.5", "--owl-m", "3"], "argument --owl-m: not an option of 'depth'"),
    ],
)
def test_schedule_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    from sensitivity.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", *SMALL, *args, "--out", str(tmp_path / "s.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s.yaml").exists()


def test_exclude_none_prunes_conv1d_too(tmp_path, capsys):
    from sensitivity.cli.main import main

    for exclude, conv_zeros in ((["--exclude", "none"], True), ([], False)):
        out = tmp_path / f"m{len(exclude)}"
        assert main(["prune", *SMALL, "--method", "magnitude", "--sparsity", "0.5", *exclude, "--out", str(out)]) == 0
        conv = load_model(out).registry.mixer(load_model(out).model, 0).conv1d.weight
        assert bool((conv == 0).any()) is conv_zeros
    assert "targets     0.5000 zeros" in capsys.readouterr().out


def test_schedule_from_a_probe_run_equals_the_python_api(tmp_path, capsys):
    from sensitivity.allocation import allocate
    from sensitivity.cli.main import main
    from sensitivity.probes import probe

    probe(load_model("tiny:mamba2"), load_corpus("sample"), kinds=["wanda"], sparsities=[0.25, 0.5, 0.75],
          components=["z", "x", "B", "C", "dt", "out_proj"], windows=2, calib_windows=2, seqlen=32,
          out=tmp_path / "p", show_progress=False)  # fmt: skip
    out = tmp_path / "s.yaml"
    assert main(["schedule", *SMALL, "--method", "sensitivity", "--budget", "0.5", "--probes", str(tmp_path / "p"),
                 "--out", str(out)]) == 0  # fmt: skip
    got = Schedule.from_yaml(out)
    expected = allocate(load_model("tiny:mamba2"), "sensitivity", 0.5, probes=tmp_path / "p", show_progress=False)
    assert got.sparsity == expected.sparsity and got.overall() == pytest.approx(0.5, abs=1e-12)
    assert "sensitivity schedule for tiny:mamba2" in capsys.readouterr().out


def test_schedule_bad_recipe_path_writes_nothing(tmp_path, capsys):
    from sensitivity.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", *SMALL, "--method", "uniform", "--budget", "0.5", "--out", str(tmp_path / "s.yaml"),
              "--recipe", str(tmp_path / "missing" / "r.yaml")])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--recipe" in capsys.readouterr().err and not (tmp_path / "s.yaml").exists()


def test_schedule_refuses_one_path_for_the_schedule_and_its_recipe(tmp_path, capsys):
    from sensitivity.cli.main import main

    same = tmp_path / "s.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", *SMALL, "--method", "uniform", "--budget", "0.5", "--out", str(same), "--recipe",
              str(tmp_path / "." / "s.yaml")])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"argument --recipe: {same} is also where the schedule goes; the schedule and its recipe must be two " \
           "files" in err, err
    assert not same.exists()


def test_calibration_windows_that_would_not_fit_exit_2_and_write_nothing(tmp_path, capsys):
    from sensitivity.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", "tiny:mamba2", "--method", "wanda", "--sparsity", "0.5", "--data", "sample",
              "--calib-windows", "1000000", "--out", str(tmp_path / "w")])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "1000000 calibration windows of 256 tokens are 256,000,000 tokens; at most 67,108,864" in err
    assert not (tmp_path / "w").exists()

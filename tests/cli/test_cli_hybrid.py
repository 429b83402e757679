"""Every command on every built-in tiny hybrid, as a user runs it (in process: the commands are the same code)."""

import contextlib
import io
import json

import pandas as pd
import pytest

from sensitivity import load_corpus, load_model
from sensitivity.cli.main import main
from sensitivity.data import calibration_windows
from sensitivity.pruning import prune

HYBRIDS = ["tiny:bamba", "tiny:granitemoehybrid", "tiny:nemotron-h", "tiny:jamba", "tiny:falcon-h1", "tiny:zamba2"]
DATA = ["--data", "sample", "--seqlen", "32"]


def cli(*argv: str) -> tuple[int, str, str]:
    """``sensitivity ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", HYBRIDS)
def test_components_lists_each_layers_units(name):
    code, out, err = cli("components", "--model", name, "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    reg = load_model(name).registry
    assert data["layers"] == [reg.layer_kind(i) for i in range(reg.n_layers)]
    for layer in range(reg.n_layers):
        listed = {r["component"] for r in data["components"] if r["layer"] == layer}
        assert listed == {c.name for c in reg.components_at(layer)}
    code, out, _ = cli("components", "--model", name)
    assert code == 0 and out.splitlines()[1].startswith("layers: 0 ")


@pytest.mark.parametrize("name", HYBRIDS)
def test_probe_attribute_agreement_schedule_prune_evaluate(name, tmp_path):
    lm = load_model(name)
    attn = lm.registry.layers_with("q")[0]
    code, _, err = cli("probe", "--model", name, *DATA, "--windows", "2", "--calib-windows", "2", "--layers",
                       str(attn), "--kinds", "zero,remove,wanda", "--sparsities", "0.5", "--out", str(tmp_path / "p"))
    assert code == 0, err
    probes = pd.read_csv(tmp_path / "p" / "probes.csv")
    assert {"q", "k", "v", "o", "attention", "block"} <= set(probes.component)
    assert set(probes.layer) == {attn}

    code, _, err = cli("attribute", "--model", name, *DATA, "--windows", "2", "--methods", "taylor,act_norm",
                       "--out", str(tmp_path / "a"))  # fmt: skip
    assert code == 0, err
    attribution = pd.read_csv(tmp_path / "a" / "attribution.csv")
    assert {"q", "o"} <= set(attribution.component) and set(attribution.layer) == set(range(lm.registry.n_layers))
    code, out, err = cli("agreement", "--probes", str(tmp_path / "p"), "--attribution", str(tmp_path / "a"))
    assert code == 0, err

    schedule = tmp_path / "s.yaml"
    code, _, err = cli("schedule", "--model", name, *DATA, "--method", "unit", "--budget", "0.5", "--unit-offset",
                       "attention=-0.2", "--out", str(schedule))  # fmt: skip
    assert code == 0, err
    code, out, err = cli("prune", "--model", name, *DATA, "--calib-windows", "2", "--method", "wanda", "--schedule",
                         str(schedule), "--out", str(tmp_path / "w"))  # fmt: skip
    assert code == 0, err
    manifest = json.loads((tmp_path / "w" / "pruning_manifest.json").read_text())
    per_component = pd.DataFrame(manifest["schedule"]["entries"]).groupby("component").sparsity.mean()
    assert per_component["q"] == pytest.approx(per_component["x"] - 0.2)

    # the saved model is what the Python API prunes, and evaluates as one
    expected = load_model(name)
    from sensitivity.allocation import Schedule

    prune(expected, "wanda", schedule=Schedule.from_yaml(schedule), show_progress=False,
          windows=calibration_windows(load_corpus("sample"), expected.tokenizer, 2, 32, seed=0))  # fmt: skip
    saved = load_model(tmp_path / "w")
    for (k, a), b in zip(expected.model.state_dict().items(), saved.model.state_dict().values()):
        assert a.equal(b), k
    code, out, err = cli("evaluate", "--model", str(tmp_path / "w"), *DATA, "--max-windows", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["perplexity"] > 1


@pytest.mark.parametrize("name", HYBRIDS)
def test_explain_and_report(name, tmp_path):
    code, out, err = cli("explain", "--dense", name, "--method", "wanda", "--sparsity", "0.5", *DATA, "--windows",
                         "2", "--out", str(tmp_path / "e"))  # fmt: skip
    assert code == 0, err
    record = json.loads((tmp_path / "e" / "explanation.json").read_text())
    assert record["verdict"] in ("healthy", "degraded", "collapsed") and out.startswith(record["explanation"])
    small = ["--probe-windows", "2", "--attribution-windows", "2", "--calib-windows", "2", "--eval-windows", "2",
             "--eval-seqlen", "32", "--sparsities", "0.5", "--probe-sparsities", "0.5"]  # fmt: skip
    code, out, err = cli("report", "--model", name, *DATA, *small, "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert (tmp_path / "r" / "report.html").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["probe", "--model", "tiny:bamba", "--components", "attn_head,gate_up"], "unknown component 'gate_up'"),
        (["probe", "--model", "tiny:jamba", "--components", "head"], "'head' needs Mamba-2 mixers"),
        (["probe", "--model", "tiny:mamba2", "--components", "attention"], "'attention' needs attention layers"),
        (["prune", "--model", "tiny:bamba", "--method", "wanda", "--sparsity", "0.5", "--components", "q,moe"],
         "unknown component 'moe' for bamba"),
        (["schedule", "--model", "tiny:bamba", "--method", "unit", "--budget", "0.5", "--unit-offset", "moe=0.1"],
         "'moe' is invalid; allowed: one of 'ssm', 'attention' or 'mlp'"),
    ],
)  # fmt: skip
def test_bad_hybrid_input_exits_2_with_one_line(args, message, tmp_path):
    code, out, err = cli(*args, *DATA, "--out", str(tmp_path / "o" if args[0] != "schedule" else tmp_path / "o.yaml"))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.yaml").exists()

"""Jobs: every spec round-trips, a manifest runs its job again to the same numbers, and the method tables drive the
command line (a method registered in a test, or by a plugin module, appears in --help and runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from sensitivity import jobs, load_model
from sensitivity.cli.main import main
from sensitivity.core.jobs import JOBS
from sensitivity.core.masks import unstructured_mask
from sensitivity.pruning import METHODS, UnstructuredOptions, prune, sparsity_report

TINY = {"model": "tiny:mamba2", "data": "sample"}


def _specs(tmp_path) -> dict:
    """A small valid spec of every built-in job."""
    probes = tmp_path / "probes.csv"
    pd.DataFrame({"layer": [0], "component": ["x"], "index": [None], "kind": ["zero"], "sparsity": [None],
                  "metric": ["delta_nll"], "value": [0.1], "seed": [0]}).to_csv(probes, index=False)  # fmt: skip
    return {
        "evaluate": {**TINY, "seqlen": 32, "max_windows": 2},
        "probe": {**TINY, "components": ["dt", "x"], "kinds": ["zero", "wanda"], "sparsities": [0.5], "windows": 2,
                  "calib_windows": 2, "seqlen": 32, "out": str(tmp_path / "probe")},
        "attribute": {**TINY, "methods": ["taylor", "act_norm"], "windows": 2, "seqlen": 32,
                      "out": str(tmp_path / "attribute")},
        "agreement": {"probes": str(probes), "attribution": str(tmp_path / "attribute"),
                      "out": str(tmp_path / "agreement.csv")},
        "schedule": {**TINY, "method": "owl", "budget": 0.5, "options": {"owl_m": 3}, "calib_windows": 2,
                     "seqlen": 32, "out": str(tmp_path / "schedule.yaml")},
        "prune": {**TINY, "method": "head", "sparsity": 0.5, "options": {"score": "taylor", "mode": "mask"},
                  "calib_windows": 2, "seqlen": 32, "out": str(tmp_path / "prune")},
        "explain": {"dense": "tiny:mamba2", "data": "sample", "method": "wanda", "sparsity": 0.5, "windows": 2,
                    "seqlen": 32, "calib_windows": 2, "top_layers": 1, "out": str(tmp_path / "explain")},
        "report": {**TINY, "seqlen": 32, "probe_windows": 2, "probe_kinds": ["zero", "wanda"],
                   "attribution_windows": 2, "calib_windows": 2, "eval_windows": 2, "eval_seqlen": 32,
                   "explain_windows": 1, "out": str(tmp_path / "report")},
        "grid": {"models": ["tiny:mamba"], "data": "sample", "sparsities": [0.5], "structured_sparsities": [0.25],
                 "calib_windows": 2, "seqlen": 32, "probe_windows": 2, "probe_sparsities": [0.25, 0.5, 0.75],
                 "eval_windows": 2, "eval_seqlen": 32, "out": str(tmp_path / "grid")},
    }  # fmt: skip


def test_every_job_has_a_spec_here():
    assert set(JOBS) == {"evaluate", "probe", "attribute", "agreement", "schedule", "prune", "explain", "report",
                         "grid"}  # fmt: skip


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_spec_round_trips_through_yaml_and_json(job, tmp_path):
    spec = jobs.spec_of({"job": job, **_specs(tmp_path)[job]})
    text = spec.to_yaml()
    assert text.startswith(f"job: {job}\n")
    assert jobs.spec_of(__import__("yaml").safe_load(text)) == spec
    assert jobs.spec_of(json.loads(spec.to_json())) == spec
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert jobs.load_spec(path) == spec
    with pytest.raises(ValueError, match=r"^colour: unknown field; allowed: "):
        jobs.spec_of({**spec.to_dict(), "colour": "red"})


def _outputs(job: str, result) -> dict[str, bytes]:
    """The bytes of what a run computed (its CSVs, the pruned weights), without its timings."""
    skip = {"manifest", "summary"}
    files = {k: p for k, p in result.outputs.items() if k not in skip and p.suffix in (".csv", ".yaml")}
    if job == "prune":
        files["weights"] = result.outputs["checkpoint"] / "model.safetensors"
    if job == "explain":
        files = {n: result.outputs["explanation"].parent / f"{n}.csv" for n in ("drift", "patching", "dynamics")}
    if job == "grid":
        return {"grid": result.outputs["grid"].read_bytes()}  # wall times are in the manifest, not the CSV
    out = {k: p.read_bytes() for k, p in files.items()}
    if job == "schedule":  # the meta records the spec (and so where it was written) and versions
        schedule = result.value
        out = {"entries": json.dumps(schedule.to_dict()["entries"]).encode()}
    return out


@pytest.mark.parametrize("job", ["probe", "attribute", "schedule", "prune", "explain", "grid"])
def test_a_manifest_runs_its_job_again_to_the_same_numbers(job, tmp_path):
    first = jobs.run(jobs.spec_of({"job": job, **_specs(tmp_path)[job]}), show_progress=False)
    manifest = {"probe": "manifest", "attribute": "manifest", "prune": "manifest", "grid": "manifest"}.get(job)
    record = first.outputs[manifest] if manifest in first.outputs else None
    if job == "schedule":
        record = first.outputs["schedule"]  # a schedule carries its spec in meta.spec
    if job == "explain":
        record = first.outputs["explanation"].parent / "manifest.json"
    if job in ("attribute", "grid"):
        record = first.outputs[job if job == "grid" else "attribution"].parent / "manifest.json"
    spec = jobs.load_spec(record)
    assert spec == first.spec
    target = tmp_path / "again" / ("schedule.yaml" if job == "schedule" else job)
    target.parent.mkdir(exist_ok=True)
    again = jobs.run(spec.replace(out=str(target)), show_progress=False)
    assert _outputs(job, again) == _outputs(job, first)


def test_evaluate_and_agreement_record_their_spec(tmp_path):
    specs = _specs(tmp_path)
    jobs.run(jobs.spec_of({"job": "attribute", **specs["attribute"]}), show_progress=False)
    agreement = jobs.run(jobs.spec_of({"job": "agreement", **specs["agreement"]}))
    assert jobs.load_spec(agreement.outputs["manifest"]) == agreement.spec
    evaluated = jobs.run(jobs.spec_of({"job": "evaluate", **specs["evaluate"], "out": str(tmp_path / "ev")}),
                         show_progress=False)  # fmt: skip
    again = jobs.run(jobs.load_spec(tmp_path / "ev" / "manifest.json").replace(out=None), show_progress=False)
    assert again.value["perplexity"] == evaluated.value["perplexity"]


# ---- a method registered from user code ----


def _prune_random(lm, options, *, sparsity, schedule, windows, seed, batch_size, show_progress):
    """Zero a random fraction of every targeted weight (a baseline a user might add)."""
    from sensitivity.allocation import uniform_schedule

    schedule = schedule or uniform_schedule(lm, sparsity, exclude=options.exclude, components=options.components)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (layer, comp), s in schedule.sparsity.items():
            for t in lm.registry.weights(comp):
                w = t.get(lm.registry.mixer(lm.model, layer))
                w.mul_(unstructured_mask(torch.rand(w.shape, generator=gen), s))
    return schedule, None


@pytest.fixture
def random_method():
    METHODS.register("random", options=UnstructuredOptions, description="zero random weights (a baseline)")(
        _prune_random)  # fmt: skip
    yield
    METHODS.unregister("random")


def test_a_registered_method_runs_through_the_api_cli_and_help(random_method, tmp_path, capsys):
    lm = prune(load_model("tiny:mamba2"), "random", sparsity=0.5, seed=1).model
    report = sparsity_report(lm)
    targeted = report[report.prunable & (report.component != "conv1d")]
    assert (targeted.zeros / targeted.numel).between(0.49, 0.51).all()
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "Choices: magnitude, wanda, state, head, headdim, blocks, random." in shown
    code = main(["prune", "--model", "tiny:mamba2", "--method", "random", "--sparsity", "0.5", "--seed", "1",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 0 and "random pruned tiny:mamba2" in capsys.readouterr().out
    saved = load_model(str(tmp_path / "r"))
    for a, b in zip(saved.model.parameters(), lm.model.parameters()):
        assert torch.equal(a, b)
    manifest = json.loads((tmp_path / "r" / "pruning_manifest.json").read_text())
    assert manifest["method"] == "random" and manifest["spec"]["method"] == "random"
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", "tiny:mamba2", "--method", "random", "--score", "flap", "--sparsity", "0.5",
              "--out", str(tmp_path / "bad")])  # fmt: skip
    assert exit_info.value.code == 2
    assert "argument --score: not an option of 'random'; its options: structure, compare" in capsys.readouterr().err


def test_a_plugin_module_named_in_the_environment_registers_its_methods(tmp_path):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent('''
        from sensitivity.allocation import METHODS
        from sensitivity.core.spec import Spec


        class EvenOptions(Spec):
            last: float = 0.0
            """Sparsity of the last layer."""


        @METHODS.register("even-odd", options=EvenOptions, description="odd layers at twice the budget")
        def even_odd(ctx, options):
            import torch
            return ctx.fit(torch.where(ctx.layer_of % 2 == 1, 2 * ctx.common.budget, 0.0).double()), {}
    '''))  # fmt: skip
    env = {**os.environ, "SENSITIVITY_PLUGINS": "my_methods", "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "sensitivity", "schedule"]
    helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert "even-odd" in helped.stdout and "--last" in helped.stdout
    ran = subprocess.run([*cmd, "--model", "tiny:mamba", "--method", "even-odd", "--budget", "0.25", "--out",
                          str(tmp_path / "s.yaml")], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    schedule = __import__("sensitivity").Schedule.from_yaml(tmp_path / "s.yaml")
    assert schedule.per_layer() == pytest.approx([0.0, 0.5])
    missing = subprocess.run(cmd, capture_output=True, text=True, env={**env, "SENSITIVITY_PLUGINS": "nowhere"})
    assert missing.returncode == 2 and "cannot import plugin module 'nowhere'" in missing.stderr


def test_plugin_module_found_in_working_directory(tmp_path):
    """The ``sensitivity`` script (unlike ``python -m``) does not put the working directory on ``sys.path``; plugins
    are looked up there anyway, as the docs' "Add a method" page runs them."""
    (tmp_path / "cwd_methods.py").write_text(
        "from sensitivity.allocation import METHODS\nfrom sensitivity.core.spec import Spec\n\n\n"
        "@METHODS.register('from-cwd', options=Spec, description='a plugin beside the data')\n"
        "def from_cwd(ctx, options):\n    return ctx.fit(ctx.common.budget + 0 * ctx.layer_of.double()), {}\n"
    )
    script = Path(sys.executable).parent / "sensitivity"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"SENSITIVITY_PLUGINS": "cwd_methods"}
    helped = subprocess.run([str(script), "schedule", "--help"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    assert "from-cwd" in helped.stdout

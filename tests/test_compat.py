"""The compatibility subset's end-to-end part: one CLI run of every job on a tiny model, and every notebook's imports.

``make test-latest`` runs the tests marked ``compat`` (these, the forward-equality tests of every family, the
streamed conversions and the private-surface check) against the newest release of every dependency; see
``tools/canary.py``. Each job runs in this process through the CLI's ``main`` (no interpreter start-up per job)
and its outputs are checked against the Python API or the files it must write.
"""

import ast
import json
from pathlib import Path

import pandas as pd
import pytest

from sensitivity.cli.main import main

pytestmark = pytest.mark.compat

TINY = ["--data", "sample", "--seqlen", "32"]
NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every job once, each later one reading what the earlier ones wrote (module scope: run once)."""
    root = tmp_path_factory.mktemp("jobs")
    model = ["--model", "tiny:mamba2"]
    commands = {
        "evaluate": ["evaluate", *model, *TINY, "--max-windows", "2", "--json"],
        "probe": ["probe", *model, *TINY, "--windows", "2", "--kinds", "zero,wanda", "--sparsities", "0.5",
                  "--out", str(root / "probe")],
        "attribute": ["attribute", *model, *TINY, "--windows", "2", "--methods", "taylor", "--out",
                      str(root / "attribute")],
        "agreement": ["agreement", "--probes", str(root / "probe" / "probes.csv"), "--attribution",
                      str(root / "attribute" / "attribution.csv"), "--out", str(root / "agreement.csv")],
        "schedule": ["schedule", *model, *TINY, "--method", "owl", "--budget", "0.5", "--calib-windows", "2",
                     "--out", str(root / "schedule.yaml")],
        "prune": ["prune", *model, *TINY, "--method", "wanda", "--sparsity", "0.5", "--calib-windows", "2",
                  "--out", str(root / "pruned")],
        "explain": ["explain", "--dense", "tiny:mamba2", "--pruned", str(root / "pruned"), *TINY, "--windows", "2",
                    "--out", str(root / "explain")],
        "report": ["report", *model, *TINY, "--probe-windows", "2", "--probe-kinds", "zero,wanda",
                   "--probe-sparsities", "0.5,0.9", "--attribution-windows", "2", "--calib-windows", "2",
                   "--eval-windows", "2", "--eval-seqlen", "32", "--explain-windows", "2", "--sparsities", "0.5",
                   "--structured-sparsities", "0.5", "--out", str(root / "report")],
        "grid": ["grid", "--models", "tiny:mamba2", *TINY, "--sparsities", "0.5", "--structured-sparsities", "0.5",
                 "--allocators", "uniform", "--calib-windows", "2", "--probe-windows", "2", "--eval-windows", "2",
                 "--eval-seqlen", "32", "--out", str(root / "grid")],
    }  # fmt: skip
    codes = {job: main(argv) for job, argv in commands.items()}
    return root, codes


@pytest.mark.parametrize("job", ["evaluate", "probe", "attribute", "agreement", "schedule", "prune", "explain",
                                 "report", "grid"])  # fmt: skip
def test_every_job_runs_from_the_cli(runs, job):
    root, codes = runs
    assert codes[job] == 0, job
    written = {
        "probe": root / "probe" / "probes.csv",
        "attribute": root / "attribute" / "attribution.csv",
        "agreement": root / "agreement.csv",
        "schedule": root / "schedule.yaml",
        "prune": root / "pruned" / "model.safetensors",
        "explain": root / "explain" / "manifest.json",
        "report": root / "report" / "report.html",
        "grid": root / "grid" / "grid.csv",
    }
    if job in written:
        assert written[job].is_file() and written[job].stat().st_size > 0, written[job]


def test_the_pruned_checkpoint_is_half_zero_and_the_probes_name_every_layer(runs):
    from safetensors.torch import load_file

    root, _ = runs
    tensors = load_file(root / "pruned" / "model.safetensors")
    weight = tensors["backbone.layers.0.mixer.out_proj.weight"]
    assert abs((weight == 0).float().mean().item() - 0.5) < 0.02
    probes = pd.read_csv(root / "probe" / "probes.csv")
    assert set(probes["layer"]) == set(range(json.loads((root / "pruned" / "config.json").read_text())
                                             ["num_hidden_layers"]))  # fmt: skip


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_resolve(notebook):
    """Every import statement of the notebook's code cells runs (a renamed module or name fails here)."""
    cells = json.loads(notebook.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    lines = [line for line in code.splitlines() if not line.lstrip().startswith(("%", "!"))]
    imports = [node for node in ast.walk(ast.parse("\n".join(lines))) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports, notebook.name
    for node in imports:
        exec(compile(ast.Module([node], type_ignores=[]), notebook.name, "exec"), {})  # noqa: S102

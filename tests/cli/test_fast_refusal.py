"""Refusals come before the heavy imports: every job's spec, its method tables and the command line's parser load
without torch, transformers, pandas, numpy, scipy, captum, matplotlib, lm-eval or Ray, so a bad flag is refused
in a fraction of a second (``benchmarks/bench_refusal.py`` times it).

The check runs the real command line in a fresh interpreter whose import system refuses those packages: a refusal
that needed one of them would fail with the blocked import instead of its one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sensitivity.core.names import ARCHITECTURES, MAMBA2_ARCHS

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "pandas", "numpy", "scipy", "captum", "matplotlib", "seaborn", "lm_eval", "ray",
         "safetensors", "tokenizers")  # fmt: skip

CASES = {  # argv -> the one line it must print (exit 2)
    ("prune", "--sparsity", "2"): "sensitivity prune: error: argument --sparsity: 2.0 is out of range; allowed: 0 <= "
                                  "value < 1",
    ("prune", "--method", "lottery", "--sparsity", "0.5", "--out", "x"): "sensitivity prune: error: argument "
    "--method: unknown pruning method 'lottery'; allowed: magnitude, wanda, state, head, headdim, blocks",
    ("prune", "--method", "wanda", "--sparsity", "0.5", "--structure", "5:4", "--out", "x"): "sensitivity prune: "
    "error: argument --structure: '5:4' is invalid; allowed: 'unstructured' or 'n:m' with 0 < n < m, e.g. '2:4' or "
    "'4:8'",
    ("probe", "--windows", "0", "--out", "x"): "sensitivity probe: error: argument --windows: 0 is out of range; "
                                               "allowed: 1 <= value <= 67,108,864",
    ("probe", "--kinds", "shred", "--out", "x"): "sensitivity probe: error: argument --kinds: unknown ablation kind "
    "'shred'; allowed: zero, mean, resample, bypass, magnitude, wanda, remove",
    ("probe", "--task", "recall", "--task-items", "10000000", "--out", "x"): "sensitivity probe: error: argument "
    "--task-items: 10,000,000 recall items of 65 tokens (16 pairs) are 650,000,000 tokens; at most 67,108,864 tokens "
    "of task items (items x item length) are built",
    ("attribute", "--methods", "shap", "--out", "x"): "sensitivity attribute: error: argument --methods: unknown "
    "attribution method 'shap'; allowed: act_norm, taylor, fisher, gblm, grad_x_act, integrated_gradients, "
    "conductance",
    ("agreement", "--probes", "p", "--attribution", "a", "--metric", "x"): "sensitivity agreement: error: argument "
    "--metric: 'x' is invalid; allowed: one of 'delta_nll', 'kl' or 'ppl_ratio'",
    ("schedule", "--method", "owl", "--owl-m", "-1", "--budget", "0.5", "--out", "s.yaml"): "sensitivity schedule: "
    "error: argument --owl-m: '-1' is out of range; allowed: value > 0",
    ("evaluate", "--seed", "-1"): "sensitivity evaluate: error: argument --seed: -1 is out of range; allowed: 0 <= "
                                  "value <= 4,294,967,295",
    ("explain", "--method", "wanda", "--out", "x"): "sensitivity explain: error: argument --sparsity: method wanda "
                                                    "needs a sparsity",
    ("report", "--grid", "huge", "--out", "x"): "sensitivity report: error: argument --grid: 'huge' is invalid; "
                                                "allowed: one of 'reduced' or 'full'",
    ("grid", "--allocators", "nope", "--out", "x"): "sensitivity grid: error: argument --allocators: unknown "
    "allocation method 'nope'; allowed: uniform, depth, owl, sensitivity, unit",
    ("components", "--format", "xml"): "sensitivity components: error: argument --format: 'xml' is invalid; allowed: "
                                       "table, csv, json",
}

_RUNNER = textwrap.dedent("""
    import contextlib, importlib.abc, io, json, sys
    HEAVY = set(sys.argv[1].split(","))

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"blocked import of {name}")

    sys.meta_path.insert(0, Blocker())
    from sensitivity.cli.main import main

    results = []
    for argv in json.loads(sys.stdin.read()):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
            except BaseException as e:
                code, _ = 99, err.write(f"{type(e).__name__}: {e}")
        results.append([code, err.getvalue()])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    print(json.dumps({"results": results, "loaded": loaded}))
""")


@pytest.fixture(scope="module")
def refused() -> dict:
    argvs = [list(a) for a in CASES] + [["--help"], ["prune", "--help"]]
    done = subprocess.run([sys.executable, "-c", _RUNNER, ",".join(HEAVY)], input=json.dumps(argvs), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"results": dict(zip(map(tuple, argvs), out["results"])), "loaded": out["loaded"]}


@pytest.mark.parametrize("argv", list(CASES), ids=[" ".join(a) for a in CASES])
def test_a_bad_flag_is_refused_without_the_heavy_imports(refused, argv):
    code, err = refused["results"][argv]
    assert (code, err.strip()) == (2, CASES[argv])


def test_help_needs_no_heavy_import(refused):
    assert refused["results"][("--help",)][0] == 0
    assert refused["results"][("prune", "--help")][0] == 0
    assert refused["loaded"] == []


def test_the_mamba2_architectures_are_the_registrys():
    """:data:`MAMBA2_ARCHS` (where head pruning applies, declared without torch) is what the registry says."""
    from sensitivity.core.loading import tiny_config
    from sensitivity.core.registry import build_registry

    assert MAMBA2_ARCHS == tuple(a for a in ARCHITECTURES if build_registry(tiny_config(a)).ssm_style == "mamba2")


@pytest.mark.parametrize("table", ["pruning", "probes", "allocation", "attribution"])
def test_every_declared_method_is_implemented(table):
    """Each built-in entry is declared where its options live and implemented by its module: reading ``fn`` imports
    that module and finds the implementation, with the runtime ``info`` the stage reads."""
    import importlib

    module = importlib.import_module(f"sensitivity.{table}.options" if table != "pruning" else
                                     "sensitivity.pruning.methods")  # fmt: skip
    entries = module.KINDS if table == "probes" else module.METHODS
    for name in entries:
        entry = entries[name]
        assert entry.module is not None, name
        assert callable(entry.fn), name
    if table == "probes":
        assert all(callable(entries[k].info["applies"]) for k in entries)
    if table == "attribution":
        assert all(callable(entries[m].info["covers"]) for m in entries)


def test_a_package_export_that_is_also_a_module_name_stays_the_export():
    """``sensitivity.eval.perplexity`` is the function even after the module ``perplexity`` is imported (as the
    eager imports left it)."""
    import sensitivity.allocation.allocate  # noqa: F401
    import sensitivity.eval.perplexity  # noqa: F401
    from sensitivity.allocation import allocate
    from sensitivity.core import hooks
    from sensitivity.eval import perplexity

    assert callable(perplexity) and perplexity.__module__ == "sensitivity.eval.perplexity"
    assert callable(allocate) and callable(hooks)


def test_a_method_registered_over_a_declared_one_keeps_its_implementation():
    """Replacing a built-in before its module is imported: importing the module later leaves the replacement."""
    from sensitivity.core.methods import Methods
    from sensitivity.core.spec import Spec

    table = Methods("test method")
    table.declare("m", "sensitivity.core.spec", options=Spec, description="declared")

    def mine():
        return "mine"

    table.register("m", replace=True, description="mine")(mine)
    table.implement("m")(lambda: "built-in")  # what the implementing module does when it is imported
    assert table["m"].fn is mine and table["m"].description == "mine"
    table.declare("n", "sensitivity.core.spec", description="declared")
    table.implement("n", extra=1)(mine)
    assert table["n"].fn is mine and table["n"].info["extra"] == 1

"""Bad input to every subcommand: exit 2, one line naming the value and what is allowed, no traceback, and nothing
written, changed or left behind (the workspace listing before and after is the same).

The command line runs in this process (``main(argv)``), in a workspace of good and broken checkpoints, corpora,
schedules and tables (``conftest.build_workspace``); paths are given relative to it, as a user in it would.
"""

from __future__ import annotations

import pytest

from .conftest import MARKER, cli, listing

FAST = ["--seqlen", "16"]  # cheap windows where a case would otherwise run
# The checkpoints a model flag may name, and what the one-line error must say about each.
BAD_MODELS = {
    "truncated": ["truncated/model.safetensors", "not a complete safetensors file"],
    "header-only": ["header-only/model.safetensors", "not a complete safetensors file"],
    "noweights": ["noweights", "has no weights", "model.safetensors"],
    "pickled": ["pickled/pytorch_model.bin", "never loaded", "convert", "safetensors"],
    "badjson": ["badjson/config.json", "not valid JSON"],
    "notype": ["notype/config.json", "model_type", "allowed"],
    "listjson": ["listjson/config.json", "not a JSON object"],
    "wrongshape": ["wrongshape/model.safetensors", "out_proj.weight", "shape"],
    "nan": ["nan", "out_proj.weight", "non-finite", "allow-nonfinite"],
    "llama": ["'llama'", "allowed model types"],
    "emptydir": ["emptydir", "no config.json"],
    "file.txt": ["file.txt", "not a directory"],
    "no/such/dir": ["no/such/dir", "does not exist"],
    "tiny:gpt": ["tiny:gpt", "allowed: tiny:mamba"],
}
MODEL_FLAG = {"evaluate": "--model", "probe": "--model", "attribute": "--model", "schedule": "--model",
              "prune": "--model", "explain": "--dense", "report": "--model", "components": "--model"}  # fmt: skip
REST = {  # the other arguments each subcommand needs
    "evaluate": [*FAST, "--data", "text.txt"],
    "probe": [*FAST, "--data", "text.txt", "--out", "new"],
    "attribute": [*FAST, "--data", "text.txt", "--out", "new"],
    "schedule": [*FAST, "--data", "text.txt", "--method", "owl", "--budget", "0.5", "--out", "new.yaml"],
    "prune": [*FAST, "--data", "text.txt", "--method", "wanda", "--sparsity", "0.5", "--out", "new"],
    "explain": [*FAST, "--data", "text.txt", "--method", "wanda", "--sparsity", "0.5", "--out", "new"],
    "report": [*FAST, "--data", "text.txt", "--out", "new"],
    "components": [],
}
CASES: list = []
for job, flag in MODEL_FLAG.items():
    for model, said in BAD_MODELS.items():
        CASES.append(pytest.param([job, flag, model, *REST[job]], said, id=f"{job}-model-{model}"))

# Corpora: every job that reads one.
BAD_DATA = {
    "no-such.txt": ["no-such.txt", "neither an existing path"],
    "empty.txt": ["empty.txt", "contains no text"],
    "binary.txt": ["binary.txt", "not valid UTF-8"],
    "bad.jsonl": ["bad.jsonl", "line 2", "not valid JSON"],
    "nofield.jsonl": ["nofield.jsonl", "no field 'text'"],
    "short.txt": ["short.txt", "window"],
    "emptydir": ["emptydir", "contains no documents"],
}
for job in ("evaluate", "probe", "attribute", "schedule", "prune", "explain", "report"):
    for data, said in BAD_DATA.items():
        args = [a if a != "text.txt" else data for a in REST[job]]
        CASES.append(pytest.param([job, MODEL_FLAG[job], "good", *args], said, id=f"{job}-data-{data}"))

# Output locations.
DIR_OUT = {"evaluate": REST["evaluate"], "probe": REST["probe"][:-2], "attribute": REST["attribute"][:-2],
           "prune": REST["prune"][:-2], "explain": REST["explain"][:-2], "report": REST["report"][:-2],
           "grid": ["--models", "good", "--data", "text.txt", *FAST]}  # fmt: skip
BAD_DIRS = {
    "": ["--out", "empty", "allowed"],
    "file.txt": ["file.txt", "is a file", "directory"],
    "/dev/null/x": ["/dev/null/x", "/dev/null", "not a directory"],
    "/sys/x": ["/sys/x", "cannot create"],
    "existing-dir": ["existing-dir", "not empty"],
}
for job, args in DIR_OUT.items():
    for out, said in BAD_DIRS.items():
        model = [] if job == "grid" else [MODEL_FLAG[job], "good"]
        CASES.append(pytest.param([job, *model, *args, "--out", out], said, id=f"{job}-out-{out or 'empty'}"))
BAD_FILES = {
    "": ["--out", "empty", "allowed"],
    "file.txt": ["file.txt", "exists", "overwrite"],
    "/dev/null/x": ["/dev/null/x", "not a directory"],
    "/sys/x": ["/sys/x", "cannot"],
    "existing-dir": ["existing-dir", "is a directory"],
}
for out, said in BAD_FILES.items():
    CASES.append(pytest.param(["schedule", "--model", "good", *REST["schedule"][:-2], "--out", out], said,
                              id=f"schedule-out-{out or 'empty'}"))  # fmt: skip
    CASES.append(pytest.param(["schedule", "--model", "good", *REST["schedule"][:-2], "--out", "new.yaml",
                               "--recipe", out], [s.replace("--out", "--recipe") for s in said],
                              id=f"schedule-recipe-{out or 'empty'}"))  # fmt: skip

# Ranges, names, N:M structures and the like.
P = ["prune", "--model", "good", *REST["prune"][:-4]]  # prune without --method/--sparsity/--out
S = ["schedule", "--model", "good", "--budget", "0.5"]
CASES += [
    pytest.param([*P, "--method", "wanda", "--sparsity", "1.5", "--out", "n"], ["--sparsity", "1.5", "< 1"],
                 id="prune-sparsity-1.5"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "-0.1", "--out", "n"], ["--sparsity", "-0.1", "0 <="],
                 id="prune-sparsity-negative"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "nan", "--out", "n"], ["--sparsity", "nan"],
                 id="prune-sparsity-nan"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "inf", "--out", "n"], ["--sparsity", "inf"],
                 id="prune-sparsity-inf"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "half", "--out", "n"], ["--sparsity", "'half'", "a number"],
                 id="prune-sparsity-word"),
    pytest.param([*P, "--method", "wanda", "--out", "n"], ["sparsity", "schedule"], id="prune-no-target"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--schedule", "s.yaml", "--out", "n"],
                 ["sparsity", "schedule"], id="prune-both-targets"),
    pytest.param([*P, "--method", "lottery", "--sparsity", "0.5", "--out", "n"], ["--method", "'lottery'", "wanda"],
                 id="prune-unknown-method"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--structure", "4:2", "--out", "n"],
                 ["--structure", "4:2"], id="prune-nm-n-above-m"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--structure", "0:4", "--out", "n"],
                 ["--structure", "0:4"], id="prune-nm-zero"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--structure", "2-4", "--out", "n"],
                 ["--structure", "2-4", "n:m"], id="prune-nm-syntax"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--structure", "2:4:8", "--out", "n"],
                 ["--structure", "2:4:8"], id="prune-nm-three"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--components", "attn", "--out", "n"],
                 ["attn", "out_proj"], id="prune-unknown-component"),
    pytest.param([*P, "--method", "head", "--sparsity", "0.5", "--score", "vibes", "--out", "n"],
                 ["--score", "'vibes'"], id="prune-unknown-score"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--score", "taylor", "--out", "n"],
                 ["score", "wanda"], id="prune-option-of-another-method"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--calib-windows", "0", "--out", "n"],
                 ["--calib-windows", "0", "1 <= value"], id="prune-calib-zero"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--seed", "1.5", "--out", "n"],
                 ["--seed", "1.5", "integer"], id="prune-seed-float"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--dtype", "int8", "--out", "n"],
                 ["--dtype", "'int8'", "float32"], id="prune-dtype"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--out", "good"],
                 ["good", "source checkpoint"], id="prune-into-source"),
    pytest.param([*P, "--method", "wanda", "--sparsity", "0.5", "--out", "good/pruned"],
                 ["good/pruned", "source checkpoint"], id="prune-inside-source"),
    pytest.param(["probe", "--model", "good", *FAST, "--data", "text.txt", "--kinds", "shred", "--out", "n"],
                 ["--kinds", "'shred'", "zero"], id="probe-unknown-kind"),
    pytest.param(["probe", "--model", "good", *FAST, "--data", "text.txt", "--layers", "7", "--out", "n"],
                 ["layer", "7", "0", "1"], id="probe-layer-out-of-range"),
    pytest.param(["probe", "--model", "good", *FAST, "--data", "text.txt", "--layers", "-1", "--out", "n"],
                 ["-1"], id="probe-layer-negative"),
    pytest.param(["probe", "--model", "good", *FAST, "--data", "text.txt", "--components", "q_proj", "--out", "n"],
                 ["q_proj", "out_proj"], id="probe-unknown-component"),
    pytest.param(["probe", "--model", "good", *FAST, "--data", "text.txt", "--sparsities", "0,1", "--out", "n"],
                 ["--sparsities", "0"], id="probe-sparsities-bounds"),
    pytest.param(["probe", "--model", "good", *FAST, "--data", "text.txt", "--windows", "0", "--out", "n"],
                 ["--windows", "0"], id="probe-windows-zero"),
    pytest.param(["probe", "--model", "good", "--seqlen", "1", "--out", "n"], ["--seqlen", "1", "2 <= value"],
                 id="probe-seqlen-one"),
    pytest.param(["probe", "--model", "good", *FAST, "--data", "text.txt", "--sweep", "fast", "--out", "n"],
                 ["--sweep", "'fast'"], id="probe-sweep"),
    pytest.param(["probe", "--model", "good", *FAST, "--data", "text.txt", "--split", "dev", "--out", "n"],
                 ["'dev'", "test"], id="probe-split"),
    pytest.param(["probe", "--model", "good", *FAST, "--data", "text.txt", "--top", "x", "--out", "n"],
                 ["--top", "'x'"], id="probe-top"),
    pytest.param(["attribute", "--model", "good", *FAST, "--data", "text.txt", "--methods", "shap", "--out", "n"],
                 ["--methods", "'shap'", "taylor"], id="attribute-unknown-method"),
    pytest.param(["attribute", "--model", "good", *FAST, "--data", "text.txt", "--n-steps", "0", "--out", "n"],
                 ["--n-steps", "0"], id="attribute-n-steps"),
    pytest.param(["attribute", "--model", "good", *FAST, "--data", "text.txt", "--objective", "acc", "--out", "n"],
                 ["--objective", "'acc'"], id="attribute-objective"),
    pytest.param([*S, "--method", "depth", "--depth-spread", "5", "--out", "n.yaml"],
                 ["--depth-spread", "5"], id="schedule-depth-spread-clips"),
    pytest.param(["schedule", "--model", "good", "--method", "uniform", "--budget", "1", "--out", "n.yaml"],
                 ["--budget", "1"], id="schedule-budget-one"),
    pytest.param([*S, "--method", "uniform", "--min-sparsity", "0.6", "--max-sparsity",
                  "0.4", "--out", "n.yaml"], ["0.6", "0.4"], id="schedule-min-above-max"),
    pytest.param([*S, "--method", "sensitivity", "--out", "n.yaml"],
                 ["--probes", "needs probes"], id="schedule-sensitivity-without-probes"),
    pytest.param([*S, "--method", "sensitivity", "--probes", "no-such-dir", "--out",
                  "n.yaml"], ["no-such-dir", "does not exist"], id="schedule-probes-missing"),  # fmt: skip
    pytest.param([*S, "--method", "owl", "--owl-m", "-1", "--out", "n.yaml"],
                 ["--owl-m", "-1"], id="schedule-owl-m"),
    pytest.param([*S, "--method", "magic", "--out", "n.yaml"],
                 ["--method", "'magic'", "uniform"], id="schedule-unknown-method"),
    pytest.param(["explain", "--dense", "good", "--out", "n"], ["pruned", "method"], id="explain-neither"),
    pytest.param(["explain", "--dense", "good", "--pruned", "good", "--method", "wanda", "--sparsity", "0.5",
                  "--out", "n"], ["exactly one"], id="explain-both"),  # fmt: skip
    pytest.param(["explain", "--dense", "good", "--method", "wanda", "--out", "n"], ["--sparsity", "needs"],
                 id="explain-method-without-sparsity"),
    pytest.param(["explain", "--dense", "good", "--pruned", "no-such", "--out", "n"],
                 ["'no-such'", "not a local directory"], id="explain-pruned-missing"),
    pytest.param(["explain", "--dense", "good", "--pruned", "truncated", *REST["explain"][:-6], "--out", "n"],
                 ["truncated/model.safetensors"], id="explain-pruned-truncated"),
    pytest.param(["explain", "--dense", "good", "--pruned", "tiny:mamba", *REST["explain"][:-6], "--out", "n"],
                 ["tiny:mamba", "mamba2"], id="explain-pruned-other-architecture"),
    pytest.param(["explain", "--dense", "good", "--method", "wanda", "--sparsity", "0.5", "--healthy", "3",
                  "--collapsed", "2", "--out", "n"], ["healthy", "collapsed"], id="explain-thresholds"),  # fmt: skip
    pytest.param(["report", "--model", "good", "--grid", "huge", "--out", "n"], ["--grid", "'huge'"],
                 id="report-grid"),
    pytest.param(["report", "--model", "good", "--eval-windows", "some", "--out", "n"], ["--eval-windows", "'some'"],
                 id="report-eval-windows"),
    pytest.param(["report", "--model", "good", "--probe-kinds", "shred", "--out", "n"], ["'shred'"],
                 id="report-probe-kinds"),
    pytest.param(["grid", "--models", "good", "--allocators", "nope", "--out", "n"], ["--allocators", "'nope'"],
                 id="grid-allocator"),
    pytest.param(["grid", "--models", "good", "--structure", "5:4", "--out", "n"], ["--structure", "5:4"],
                 id="grid-structure"),
    pytest.param(["grid", "--models", "good,no/such", "--out", "n"], ["no/such", "not a local directory"],
                 id="grid-missing-model"),
    pytest.param(["evaluate", "--model", "good", "--reference", "truncated", *REST["evaluate"]],
                 ["truncated/model.safetensors"], id="evaluate-reference-truncated"),
    pytest.param(["evaluate", "--model", "good", "--reference", "nan", *REST["evaluate"]],
                 ["'nan'", "non-finite", "--allow-nonfinite"], id="evaluate-reference-nan"),
    pytest.param(["evaluate", "--model", "good", "--max-windows", "-3", *REST["evaluate"]],
                 ["--max-windows", "-3"], id="evaluate-max-windows"),
    pytest.param(["evaluate", "--model", "good", "--split", "train2", *REST["evaluate"]], ["'train2'"],
                 id="evaluate-split"),
    pytest.param(["evaluate", "--model", "good", "--text-field", "body", "--data", "bad.jsonl"], ["bad.jsonl"],
                 id="evaluate-text-field"),
    pytest.param(["components", "--format", "xml"], ["--format", "'xml'", "csv"], id="components-format"),
    pytest.param(["components", "--dtype", "fp8"], ["--dtype", "'fp8'", "float32"], id="components-dtype"),
    pytest.param(["zoo", "show"], ["'show'", "list"], id="zoo-subcommand"),
    pytest.param(["frobnicate"], ["'frobnicate'", "evaluate"], id="unknown-subcommand"),
    pytest.param(["evaluate", "--colour", "red"], ["--colour"], id="unknown-flag"),
]

# Schedules, specs and tables given as files.
BAD_YAML = {
    "bomb.yaml": ["bomb.yaml", "aliases"],
    "pyobj.yaml": ["pyobj.yaml", "python/object"],
    "pyobj-meta.yaml": ["pyobj-meta.yaml", "python/object"],
    "empty.yaml": ["empty.yaml", "empty"],
    "binary.yaml": ["binary.yaml", "not UTF-8 text"],
    "list.yaml": ["list.yaml", "mapping"],
    "malformed.yaml": ["malformed.yaml", "line"],
    "no-such.yaml": ["no-such.yaml", "does not exist"],
    "existing-dir": ["existing-dir", "is a directory", "YAML or JSON file"],
    "text.txt": ["text.txt"],
}
for name, said in BAD_YAML.items():
    CASES.append(pytest.param([*P, "--method", "wanda", "--schedule", name, "--out", "n"], said,
                              id=f"prune-schedule-{name}"))  # fmt: skip
    CASES.append(pytest.param(["run", name], said, id=f"run-{name}"))
BAD_CSV = {
    "empty.csv": ["empty.csv", "empty"],
    "binary.csv": ["binary.csv", "not a CSV"],
    "wrongcols.csv": ["wrongcols.csv", "column"],
    "no-such.csv": ["no-such.csv", "does not exist"],
    "emptydir": ["emptydir", "probes.csv"],
}
for name, said in BAD_CSV.items():
    CASES.append(pytest.param(["agreement", "--probes", name, "--attribution", "empty.csv", "--out", "a.csv"], said,
                              id=f"agreement-probes-{name}"))  # fmt: skip
    CASES.append(pytest.param([*S, "--method", "sensitivity", "--probes", name, "--out",
                               "n.yaml"], said, id=f"schedule-probes-{name}"))  # fmt: skip


@pytest.mark.parametrize("argv,said", CASES)
def test_bad_input_is_refused_in_one_line_and_leaves_nothing(workspace, monkeypatch, argv, said):
    monkeypatch.chdir(workspace)
    before = listing(workspace)
    code, _, err = cli(*argv)
    last = err.strip().splitlines()[-1] if err.strip() else "(nothing on stderr)"
    assert "Traceback" not in err, f"traceback: {last}"
    assert code == 2, f"exit {code}: {last}"
    assert len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("sensitivity"), line
    for part in said:
        assert part in line, f"{part!r} not in: {line}"
    assert ".tmp" not in line and "PosixPath" not in line, line
    assert listing(workspace) == before
    assert not (workspace / MARKER).exists()


def test_the_matrix_is_large():
    assert len(CASES) >= 150

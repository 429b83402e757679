"""Schedules: prunable components and sizes against the real tensors, budget arithmetic, exact YAML round trips,
error messages, validation against a registry, and llm-compressor recipes checked by selecting modules the way
llm-compressor does."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from torch import nn
from transformers import AutoModelForCausalLM

from sensitivity.allocation import Schedule, uniform_schedule
from sensitivity.core import load_model, tiny_config
from sensitivity.core.loading import as_loaded

M1_COMPONENTS = ("x", "z", "conv1d", "dt", "B", "C", "out_proj")


@pytest.fixture(scope="module")
def m2():
    return load_model("tiny:mamba2", instrument=False)


@pytest.fixture(scope="module")
def m1():
    return load_model("tiny:mamba", instrument=False)


def _schedule(**overrides) -> Schedule:
    """A hand-made 3-layer Mamba-2 schedule with unequal sizes: layer 0 {z: 100 @ 0.2, out_proj: 300 @ 0.6},
    layer 2 {x: 100 @ 0.9}; layer 1 has no entries."""
    base = dict(
        arch="mamba2",
        n_layers=3,
        sparsity={(0, "z"): 0.2, (0, "out_proj"): 0.6, (2, "x"): 0.9},
        params={(0, "z"): 100, (0, "out_proj"): 300, (2, "x"): 100},
        method="custom",
        exclude=("conv1d",),
    )
    return Schedule(**{**base, **overrides})


# ---- the schedule object ----


def test_budget_arithmetic_by_hand():
    s = _schedule()
    assert s.get(0, "z") == 0.2 and s.get(1, "z") == 0.0 and s.get(0, "B") == 0.0
    assert s.components == ("out_proj", "x", "z")
    # (100 * 0.2 + 300 * 0.6 + 100 * 0.9) / 500 = 290 / 500
    assert s.overall() == pytest.approx(0.58, abs=1e-15)
    assert s.per_layer() == pytest.approx([200 / 400, 0.0, 0.9], abs=1e-15)
    df = s.frame()
    assert list(df.columns) == ["layer", "component", "params", "sparsity"]
    assert df.to_dict("records")[1] == {"layer": 0, "component": "out_proj", "params": 300, "sparsity": 0.6}
    assert _schedule(budget=0.58).budget == 0.58


def test_budget_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"prune 0\.58000000 of their parameters but budget is 0\.50000000"):
        _schedule(budget=0.5)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"arch": "llama"}, "^arch: 'llama' is invalid; allowed: one of 'mamba', 'mamba2', 'falcon_mamba', 'bamba', "
         "'granitemoehybrid', 'nemotron_h', 'jamba', 'falcon_h1' or 'zamba2'"),
        ({"n_layers": 0}, "^n_layers: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        ({"sparsity": {(3, "z"): 0.1}, "params": {(3, "z"): 1}}, r"^entries.0.layer: 3 is out of range; .* 0\.\.2"),
        ({"sparsity": {(0, "z"): 1.0}, "params": {(0, "z"): 1}}, r"^entries.0.sparsity: 1\.0 .* 0 <= value < 1"),
        ({"sparsity": {(0, "z"): True}, "params": {(0, "z"): 1}}, "^entries.0.sparsity: True is a boolean"),
        ({"sparsity": {(0, "z"): 0.1}, "params": {(0, "z"): 0}}, "^entries.0.params: 0 is out of range"),
        ({"sparsity": {(0, "z"): 0.1}, "params": {}}, "has a sparsity but no params"),
        ({"sparsity": {(0, "z"): 0.1}, "params": {(0, "z"): 1, (1, "z"): 1}}, "params count but no sparsity"),
        ({"sparsity": {(0, "conv1d"): 0.1}, "params": {(0, "conv1d"): 1}}, "'conv1d' is excluded"),
        ({"sparsity": {}, "params": {}}, "^entries: \\[\\] is invalid; allowed: at least 1 item"),
        ({"budget": 1.5}, "^budget: 1.5 is out of range; allowed: 0 <= value < 1"),
        ({"meta": {"x": object()}}, "^meta.x: <object object at"),
        ({"meta": {"x": float("nan")}}, "^meta.x: nan is invalid; allowed: a finite number"),
    ],
)
def test_construction_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        _schedule(**overrides)


def test_validate_against_registry(m2, m1):
    s = uniform_schedule(m2, 0.3)
    assert s.validate(m2.registry, m2) is s
    with pytest.raises(ValueError, match="schedule is for arch 'mamba2' but the model is 'mamba'"):
        s.validate(m1.registry)
    with pytest.raises(ValueError, match="schedule is for 3 layers but the model has 2"):
        _schedule().validate(m2.registry)
    bad = Schedule("mamba2", 2, {(0, "A_log"): 0.5}, {(0, "A_log"): 8}, exclude=())
    with pytest.raises(ValueError, match=r"'A_log' \(layer 0\) is not prunable .* allowed: z, x, B, C, dt, conv1d"):
        bad.validate(m2.registry)
    conv = Schedule("mamba2", 2, {(1, "conv1d"): 0.5}, {(1, "conv1d"): 768}, exclude=())
    conv.validate(m2.registry, m2)  # conv1d is prunable once it is not excluded
    wrong = Schedule("mamba2", 2, {(1, "z"): 0.5}, {(1, "z"): 7})
    with pytest.raises(ValueError, match=r"\(1, 'z'\) lists 7 params but the model's prunable weights have 8192"):
        wrong.validate(m2.registry, m2)


def test_uniform_schedule(m2, m1):
    s = uniform_schedule(m1, 0.25, exclude=())
    assert s.method == "uniform" and s.budget == 0.25 and s.exclude == ()
    assert set(s.sparsity.values()) == {0.25} and s.components == tuple(sorted(M1_COMPONENTS))
    s = uniform_schedule(m2, 0.0, components=["x", "B"])
    assert set(s.sparsity) == {(layer, c) for layer in range(2) for c in ("x", "B")}
    assert s.overall() == 0.0
    with pytest.raises(ValueError, match="^budget: 1.0 is out of range; allowed: 0 <= value < 1"):
        uniform_schedule(m2, 1)


# ---- YAML ----


def _awkward() -> Schedule:
    sparsity = {(0, "z"): 0.1 + 0.2, (0, "B"): 1e-05, (1, "out_proj"): 1 / 3, (1, "dt"): 0.0}
    params = {(0, "z"): 8192, (0, "B"): 2048, (1, "out_proj"): 8192, (1, "dt"): 512}
    overall = math.fsum(params[k] * s for k, s in sparsity.items()) / sum(params.values())
    meta = {"owl_m": 5.0, "ratios": [0.25, 1e-7], "nested": {"source": "probes", "n": 3, "ok": True, "none": None}}
    return Schedule("mamba2", 2, sparsity, params, method="owl", budget=overall, exclude=("conv1d",), meta=meta)


def test_yaml_round_trip_is_exact(tmp_path):
    s = _awkward()
    text = s.to_yaml()
    back = Schedule.from_yaml(text)
    assert back == s and back.sparsity[(0, "z")] == 0.1 + 0.2 and back.sparsity[(1, "out_proj")] == 1 / 3
    assert list(back.sparsity) == list(s.sparsity)  # entry order kept
    doc = yaml.safe_load(text)["schedule"]
    assert doc["entries"][0] == {"layer": 0, "component": "z", "params": 8192, "sparsity": 0.30000000000000004}
    assert doc["exclude"] == ["conv1d"] and doc["method"] == "owl" and doc["n_layers"] == 2
    assert "- {layer: 0, component: z, params: 8192, sparsity: 0.30000000000000004}" in text  # one line per entry
    path = tmp_path / "s.yaml"
    assert s.to_yaml(path) == text and path.read_text() == text
    assert Schedule.from_yaml(path) == s and Schedule.from_yaml(str(path)) == s
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_hand_written_yaml_without_optional_keys():
    s = Schedule.from_yaml("schedule:\n  arch: mamba\n  n_layers: 4\n  entries:\n"
                           "  - {layer: 3, component: conv1d, params: 512, sparsity: 0}\n")  # fmt: skip
    assert s.method == "custom" and s.budget is None and s.exclude == () and s.meta == {}
    assert s.sparsity == {(3, "conv1d"): 0.0} and isinstance(s.sparsity[(3, "conv1d")], float)


GOOD_ENTRY = "  - {layer: 0, component: z, params: 10, sparsity: 0.5}\n"


@pytest.mark.parametrize(
    "text,match",
    [
        ("schedule: [unclosed\n", r"malformed YAML in the YAML text at line 2"),
        ("schedule:\n  arch: mamba2\n   n_layers: 2\n", "malformed YAML"),
        ("arch: mamba2\n", "no top-level 'schedule:' mapping"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n", "^schedule.entries: required"),
        ("schedule:\n  n_layers: 2\n  entries: []\n", "^schedule.arch: required"),
        ("schedule:\n  arch: mamba2\n  n_layers: two\n  entries: []\n",
         "^schedule.n_layers: 'two' is invalid; allowed: an integer"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  entries: {}\n", "^schedule.entries: {} .* a list"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  budget: high\n  entries: []\n",
         "^schedule.budget: 'high' is invalid; allowed: a number"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  exclude: 3\n  entries: []\n",
         "^schedule.exclude: 3 is invalid; allowed: a list"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  colour: red\n  entries:\n" + GOOD_ENTRY,
         "^schedule.colour: unknown field; allowed: arch, n_layers, method, budget, exclude, meta, units, entries"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  entries:\n  - {layer: 0, component: z, params: 10}\n",
         r"^schedule.entries.0.sparsity: required"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  entries:\n" + GOOD_ENTRY
         + "  - {layer: 1, component: z, params: 10, sparsity: 'half'}\n",
         r"^schedule.entries.1.sparsity: 'half' is invalid; allowed: a number"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  entries:\n  - {layer: 0, component: z, params: 1.5, "
         "sparsity: 0}\n",
         r"^schedule.entries.0.params: 1.5 is invalid; allowed: an integer"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  entries:\n" + GOOD_ENTRY + GOOD_ENTRY,
         r"^schedule.entries.1: repeats \(layer, component\) \(0, 'z'\)"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  entries:\n  - {layer: 0, component: z, params: 9, sparsity: 1}\n",
         "^schedule.entries.0.sparsity: 1.0 is out of range; allowed: 0 <= value < 1"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  entries:\n  - {layer: 0, component: z, params: 9, sparsity: 0.1,"
         " note: hi}\n", r"^schedule.entries.0.note: unknown field"),
        ("schedule:\n  arch: mamba2\n  n_layers: 2\n  entries: []\nextra: 1\n", "unknown top-level key 'extra'"),
        ("schedule: &a\n  arch: mamba2\nother: *a\n", "aliases \\(\\*name\\) are not allowed"),
    ],
)
def test_bad_yaml_errors_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_yaml(text)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="^'.*nope.yaml' does not exist$"):
        Schedule.from_yaml(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="does not exist"):
        Schedule.from_yaml(tmp_path / "nope")
    with pytest.raises(ValueError, match="'runs/sched' is neither an existing schedule file nor schedule YAML"):
        Schedule.from_yaml("runs/sched")


# ---- llm-compressor recipes ----


def _llmc_selection(model: nn.Module, modifier: dict) -> dict[str, float]:
    """Module name -> sparsity, as llm-compressor's SparsityModifierBase picks them: target layers by ``re.match``
    on module names (``re:`` prefix), the list indexed by target layer, every Linear/Conv inside that does not match
    ``ignore``."""

    def match(name, patterns):
        return any(re.match(p[3:], name) if p.startswith("re:") else name == p for p in patterns)

    layers = [(n, m) for n, m in model.named_modules() if match(n, modifier["targets"])]
    assert len(layers) == len(modifier["sparsity"])
    out = {}
    for (name, layer), s in zip(layers, modifier["sparsity"]):
        for sub, m in layer.named_modules():
            full = f"{name}.{sub}"
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not match(full, modifier["ignore"]):
                out[full] = s
    return out


def test_recipe_fields_and_module_selection(m2):
    s = uniform_schedule(m2, 0.5)
    text = s.to_recipe()
    assert "averaged per layer" in text
    doc = yaml.safe_load(text)
    mod = doc["sparsity_stage"]["sparsity_modifiers"]["WandaPruningModifier"]
    assert set(mod) == {"sparsity", "mask_structure", "targets", "ignore"}
    assert mod["sparsity"] == [0.5, 0.5] and mod["mask_structure"] == "0:0"
    assert "re:.*lm_head" in mod["ignore"]
    picked = _llmc_selection(m2.model, mod)
    assert picked == {f"backbone.layers.{i}.mixer.{m}": 0.5 for i in range(2) for m in ("in_proj", "out_proj")}


def test_recipe_per_layer_values_ignores_and_notes(m1):
    # layer 0: x (8192 @ 0.2) and out_proj (8192 @ 0.6) -> 0.4; layer 1: conv1d only (512 @ 0.1) -> 0.1
    s = Schedule("mamba", 2, {(0, "x"): 0.2, (0, "out_proj"): 0.6, (1, "conv1d"): 0.1},
                 {(0, "x"): 8192, (0, "out_proj"): 8192, (1, "conv1d"): 512}, method="custom")  # fmt: skip
    text = s.to_recipe("SparseGPTModifier")
    mod = yaml.safe_load(text)["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert mod["sparsity"] == pytest.approx([0.4, 0.1], abs=1e-15)
    picked = _llmc_selection(m1.model, mod)
    assert picked == pytest.approx({"backbone.layers.0.mixer.in_proj": 0.4, "backbone.layers.0.mixer.out_proj": 0.4,
                                    "backbone.layers.1.mixer.conv1d": 0.1})  # fmt: skip
    assert "# note: in_proj of layer(s) 0 also holds z, dense in the schedule" in text


def test_recipe_errors_and_nm(m2):
    s = uniform_schedule(m2, 0.5)
    nm = yaml.safe_load(s.to_recipe(mask_structure="2:4"))
    assert nm["sparsity_stage"]["sparsity_modifiers"]["WandaPruningModifier"]["mask_structure"] == "2:4"
    with pytest.raises(ValueError, match="mask_structure '2:4' prunes 0.5 of every weight but layer 0 .* 0.25"):
        uniform_schedule(m2, 0.25).to_recipe(mask_structure="2:4")
    with pytest.raises(ValueError, match="unknown modifier 'MagnitudePruningModifier'; allowed: WandaPruning"):
        s.to_recipe("MagnitudePruningModifier")
    with pytest.raises(ValueError, match="^mask_structure: '4:2' is invalid"):
        s.to_recipe(mask_structure="4:2")


@pytest.mark.parametrize("name", ["tiny:mamba2", "tiny:bamba"])
def test_recipe_of_a_deeper_model_selects_every_layer(name):
    """The recipe's module paths come from the schedule's layout, not from a tiny registry of another depth."""
    lm = load_model(name) if name == "tiny:bamba" else as_loaded(
        AutoModelForCausalLM.from_config(tiny_config("mamba2", num_hidden_layers=5)))  # fmt: skip
    s = uniform_schedule(lm, 0.5)
    mod = yaml.safe_load(s.to_recipe())["sparsity_stage"]["sparsity_modifiers"]["WandaPruningModifier"]
    assert mod["sparsity"] == [0.5] * lm.registry.n_layers
    picked = _llmc_selection(lm.model, mod)
    assert {name.split(".")[2] for name in picked} == {str(i) for i in range(lm.registry.n_layers)}
    assert all(v == 0.5 for v in picked.values())

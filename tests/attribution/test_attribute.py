"""The attribute() table on every architecture, argument errors, and the shipped default model."""

import time

import numpy as np
import pytest

from sensitivity.attribution import COLUMNS, METHODS, attribute, default_methods

LINEAR = {"x", "z", "B", "C", "dt", "conv1d", "out_proj"}  # components with a weight that has an input hook
EXPECTED = {  # arch -> kind -> components
    "mamba": {"act_norm": LINEAR, "gblm": LINEAR, "taylor": LINEAR | {"A_log", "D"}, "fisher": LINEAR | {"A_log", "D"},
              "captum": LINEAR},
    "mamba2": {"act_norm": LINEAR, "gblm": LINEAR, "taylor": LINEAR | {"A_log", "D", "norm"},
               "fisher": LINEAR | {"A_log", "D", "norm"}, "captum": LINEAR | {"norm"}},
    "falcon_mamba": {"act_norm": LINEAR, "gblm": LINEAR, "taylor": LINEAR | {"A_log", "D"},
                     "fisher": LINEAR | {"A_log", "D"}, "captum": LINEAR | {"dt_norm"}},
}  # fmt: skip
METRICS = {"act_norm": {"l2_mean", "max_over_median", "outlier_ratio"}, "taylor": {"sum", "mean"},
           "fisher": {"sum", "mean"}, "gblm": {"sum", "mean"}, "captum": {"abs_sum", "sum"}}  # fmt: skip


def test_every_architecture_gives_the_expected_table(tiny_lm, make_windows):
    df = attribute(tiny_lm, make_windows(2, 12), methods=list(METHODS), layers=[1], n_steps=2, seed=3,
                   show_progress=False)
    assert list(df.columns) == list(COLUMNS)
    assert df.dtypes.to_dict() == {"layer": np.int64, "component": object, "kind": object, "metric": object,
                                   "value": np.float64, "seed": np.int64}  # fmt: skip
    assert np.isfinite(df["value"]).all()
    assert set(df["layer"]) == {1} and set(df["seed"]) == {3}
    assert not df.duplicated(["layer", "component", "kind", "metric"]).any()
    expected = EXPECTED[tiny_lm.arch]
    for kind in METHODS:
        group = "captum" if kind in ("grad_x_act", "integrated_gradients", "conductance") else kind
        rows = df[df["kind"] == kind]
        assert set(rows["component"]) == expected[group], kind
        assert len(rows) == len(expected[group]) * len(METRICS[group]), kind
        for _, per_component in rows.groupby("component"):
            assert set(per_component["metric"]) == METRICS[group], kind
    assert set(df["component"]) <= set(tiny_lm.registry.component_names)
    sums = df[(df["kind"] == "taylor") & (df["metric"] == "sum")]
    assert (sums["value"] > 0).all()


def test_defaults_and_selection(tiny_lm, make_windows):
    df = attribute(tiny_lm, make_windows(2, 10), components="dt", show_progress=False)
    assert set(df["kind"]) == set(default_methods())
    assert set(df["component"]) == {"dt"} and set(df["layer"]) == {0, 1}
    assert set(df["seed"]) == {0}
    none = attribute(tiny_lm, make_windows(2, 10), methods="act_norm", components=["A_log", "D"], show_progress=False)
    assert none.empty and list(none.columns) == list(COLUMNS)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"methods": ["taylor", "saliency"]}, "methods: unknown attribution method 'saliency'; allowed: act_norm, "
                                              "taylor, fisher, gblm, grad_x_act, integrated_gradients, conductance"),
        ({"methods": []}, "allowed: at least 1 item"),
        ({"components": ["x", "q"]}, "unknown component 'q' for mamba2; allowed: z, x, B, C, dt, conv1d, A_log, D"),
        ({"layers": [0, 2]}, "layers: 2 is out of range; allowed: 0..1"),
        ({"layers": -1}, "layers: -1 is out of range; allowed: 0..1"),
        ({"layers": ["x"]}, "layers.0: 'x' is invalid; allowed: an integer"),
        ({"n_steps": 0}, "n_steps: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        ({"batch_size": 0}, "batch_size: 0 is out of range"),
        ({"internal_batch_size": 0}, "internal_batch_size: 0 is out of range"),
        ({"objective": "nll"}, "objective: 'nll' is invalid; allowed: one of 'loss' or 'logprob'"),
        ({"baseline": "mean"}, "baseline: 'mean' is invalid; allowed: one of 'zeros'"),
        ({"owl_m": 0}, "owl_m: 0 is out of range; allowed: value > 0"),
        ({"gblm_alpha": -1.0}, "gblm_alpha: -1.0 is out of range; allowed: value >= 0"),
        ({"owl_m": float("inf")}, "owl_m: inf is invalid; allowed: a finite number"),
        ({"windows": "tensor"}, "windows: Tensor is not sensitivity.data.Windows"),
    ],
)
def test_bad_arguments_name_the_value_and_the_allowed_ones(kwargs, match, make_windows):
    from sensitivity.core import load_model

    lm = load_model("tiny:mamba2")
    windows = {"tensor": make_windows(1).ids}.get(kwargs.pop("windows", None), make_windows(1))
    with pytest.raises(ValueError, match=match.replace("(", "\\(").replace(")", "\\)").replace(".", "\\.")):
        attribute(lm, windows, show_progress=False, **kwargs)


def test_rejects_seed_and_model_it_cannot_use(make_windows):
    from transformers import AutoModelForCausalLM

    from sensitivity.core import load_model, tiny_config

    with pytest.raises(ValueError, match="^seed: 1.5 is invalid; allowed: an integer$"):
        attribute(load_model("tiny:mamba"), make_windows(1), seed=1.5, show_progress=False)
    plain = AutoModelForCausalLM.from_config(tiny_config("mamba"))
    with pytest.raises(ValueError, match="model is not instrumented"):
        attribute(plain, make_windows(1), show_progress=False)
    with pytest.raises(ValueError, match="model must be a LoadedModel or a HF Mamba causal LM, got str"):
        attribute("tiny:mamba", make_windows(1), show_progress=False)


def test_accepts_a_bare_instrumented_model(make_windows):
    from sensitivity.core import load_model

    lm = load_model("tiny:mamba")
    windows = make_windows(2, 10)
    a = attribute(lm, windows, methods=["act_norm", "grad_x_act"], layers=[0], show_progress=False)
    b = attribute(lm.model, windows, methods=["act_norm", "grad_x_act"], layers=[0], show_progress=False)
    assert a.equals(b)


@pytest.mark.slow
def test_default_model_default_methods():
    from sensitivity import calibration_windows, load_corpus, load_model

    lm = load_model("default")
    windows = calibration_windows(load_corpus(), lm.tokenizer, 4, 128, seed=0)
    start = time.perf_counter()
    df = attribute(lm, windows, show_progress=False)
    elapsed = time.perf_counter() - start
    assert set(df["kind"]) == set(default_methods())
    assert np.isfinite(df["value"]).all()
    assert set(df["layer"]) == set(range(lm.registry.n_layers))
    taylor = df[(df["kind"] == "taylor") & (df["metric"] == "sum")].pivot(index="layer", columns="component",
                                                                            values="value")  # fmt: skip
    assert taylor.shape == (lm.registry.n_layers, len(lm.registry.component_names))
    ranks = taylor.rank(axis=1)  # per layer, the components' rank order
    assert not (ranks.nunique(axis=0) == 1).all(), "taylor ranks identical in every layer"
    assert elapsed < 120


def test_a_method_registered_from_user_code_runs_in_attribute(tiny_lm, make_windows):
    from sensitivity.attribution import METHODS

    @METHODS.register("weight_l1", covers=lambda registry: registry.prunable_components,
                      description="sum |W| of the component's weight matrices")  # fmt: skip
    def weight_l1(ctx):
        return [(layer, name, "weight_l1", "sum", sum(t.get(ctx.registry.mixer(ctx.module, layer)).abs().sum().item()
                                                      for t in ctx.registry.weights(name)))
                for layer, name in ctx.pairs if name in ctx.registry.prunable_components]  # fmt: skip

    try:
        df = attribute(tiny_lm, make_windows(1, 8), methods=["weight_l1", "taylor"], layers=[0], show_progress=False)
        got = df[df.kind == "weight_l1"].set_index("component").value
        mixer = tiny_lm.registry.mixer(tiny_lm.model, 0)
        assert got["out_proj"] == pytest.approx(mixer.out_proj.weight.abs().sum().item(), rel=1e-6)
        assert set(df.kind) == {"weight_l1", "taylor"}
    finally:
        METHODS.unregister("weight_l1")

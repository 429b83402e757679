"""The explainer on tiny random models: drift, restoration patching, dynamics, verdicts, saving, errors."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from sensitivity.core import LoadedModel, load_model
from sensitivity.data import Windows
from sensitivity.explain import Explanation, explain, explain_method, verdict
from sensitivity.explain.faults import Fault, default_faults, plant
from sensitivity.pruning import prune


def _windows(n=4, L=32, seed=0) -> Windows:
    ids = torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(seed))
    return Windows(ids=ids, seqlen=L, split="validation", source="random", kind="calibration", seed=seed, stride=0)


def _copy(lm: LoadedModel, name: str = "copy") -> LoadedModel:
    return LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.registry, name)


@pytest.fixture(scope="module", params=["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba"])
def dense(request):
    return load_model(request.param)


def test_verdict_thresholds_and_errors():
    assert [verdict(r) for r in (1.0, 1.2, 1.21, 1.99, 2.0, 50.0)] == [
        "healthy", "healthy", "degraded", "degraded", "collapsed", "collapsed"]  # fmt: skip
    assert verdict(1.5, healthy=1.6, collapsed=3.0) == "healthy"
    with pytest.raises(ValueError, match="need 1 <= healthy < collapsed"):
        verdict(1.5, healthy=2.0, collapsed=1.5)
    with pytest.raises(ValueError, match="positive number"):
        verdict(-1.0)


def test_identical_models_have_no_drift_and_nothing_to_attribute(dense):
    e = explain(dense, _copy(dense), _windows(), label="same", show_progress=False)
    assert e.verdict == "healthy" and e.ppl_ratio == pytest.approx(1.0, abs=1e-9)
    assert e.first_layer is None and (e.drift.rel_error == 0).all() and (e.drift.cosine > 0.9999).all()
    assert e.top is None and e.patching.recovered.isna().all()
    med = e.dynamics[e.dynamics.stat.isin(["median", "share"]).to_numpy()]
    assert (med.dense == med.pruned).all()
    assert "No layer's hidden-state drift exceeds 0.1" in e.text


def test_a_planted_fault_is_named_and_drift_starts_at_its_layer(dense):
    layer = 1
    faulty = plant(_copy(dense), Fault("conv", layer, "conv1d", "zero"))
    before = {k: v.clone() for k, v in faulty.model.state_dict().items()}
    e = explain(dense, faulty, _windows(), label="conv", show_progress=False)
    assert e.top[:2] == (layer, "conv1d") and e.top[2] == pytest.approx(1.0, abs=1e-5)  # restoring it undoes it
    assert (e.drift[e.drift.layer < layer].rel_error == 0).all() and e.drift.rel_error[layer] > 0
    mixer = e.patching[(e.patching.component == "mixer") & (e.patching.layer == layer)]
    assert mixer.recovered.iloc[0] == pytest.approx(1.0, abs=1e-5)
    # every other restoration changes nothing: recovered exactly 0, no forward needed
    others = e.patching[(e.patching.layer != layer)]
    assert (others.recovered == 0).all()
    # patching restores the pruned model's own tensors afterwards
    assert all(torch.equal(before[k], v) for k, v in faulty.model.state_dict().items())
    assert f"conv1d of layer {layer} alone recovers 100%" in e.text


def test_patching_recovery_is_the_loss_share_an_independent_forward_gives_back(dense):
    pruned = _copy(dense)
    prune(pruned, "magnitude", sparsity=0.6, show_progress=False)
    w = _windows()
    e = explain(dense, pruned, w, show_progress=False)
    layer, comp, recovered = e.top
    # independently: copy the dense tensors into a fresh copy of the pruned model and evaluate it
    fixed = _copy(pruned)
    reg = dense.registry
    with torch.no_grad():
        for d, s in zip(reg.tensors(fixed.model, layer, comp), reg.tensors(dense.model, layer, comp)):
            d.copy_(s)

    def nll(lm):
        logits = lm.model(w.ids, use_cache=False).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w.ids[:, 1:].reshape(-1)).item()

    gap = nll(pruned) - nll(dense)
    assert e.nll_pruned - e.nll_dense == pytest.approx(gap, rel=1e-4)
    assert recovered == pytest.approx((nll(pruned) - nll(fixed)) / gap, rel=1e-3, abs=1e-5)
    assert e.ppl_ratio == pytest.approx(math.exp(gap), rel=1e-4)


def test_top_layers_patches_components_only_in_the_best_layers(dense):
    pruned = _copy(dense)
    prune(pruned, "magnitude", sparsity=0.6, show_progress=False)
    e = explain(dense, pruned, _windows(), top_layers=1, show_progress=False)
    mixers = e.patching[e.patching.component == "mixer"]
    assert len(mixers) == dense.registry.n_layers
    best = int(mixers.sort_values("nll").layer.iloc[0])
    assert set(e.patching[e.patching.component != "mixer"].layer) == {best}
    assert "components of the top 1 layers only" in e.meta["patched"]


def test_masked_heads_leave_the_dynamics_statistics():
    dense = load_model("tiny:mamba2")
    e = explain_method(dense, "head", 0.5, _windows(), calibration=_windows(seed=1), show_progress=False)
    live = e.dynamics[(e.dynamics.quantity == "live_units")]
    assert (live.dense == 1.0).all() and (live.pruned == 0.5).all()
    assert not e.patching.empty  # mask mode keeps shapes, so restoration applies
    assert e.sparsity == 0.5 and e.label == "head"
    # both models are measured on the heads the pruned one keeps: layer 0 sees the same input, so they agree
    first = e.dynamics[(e.dynamics.layer == 0) & e.dynamics.quantity.isin(["delta", "memory", "outlier_x"]).to_numpy()]
    assert (first.dense - first.pruned).abs().max() < 1e-6


def test_masked_head_channels_leave_the_activation_statistics():
    dense = load_model("tiny:mamba2")
    e = explain_method(dense, "headdim", 0.5, _windows(), calibration=_windows(seed=1), show_progress=False)
    first = e.dynamics[e.dynamics.layer == 0].set_index(["quantity", "stat"])
    assert first.loc[("live_units", "share"), "pruned"] == 1.0  # every head keeps some channels
    for q in ("outlier_x", "gate_closed"):  # kept channels of layer 0 are unchanged; zeroed ones are left out
        assert first.loc[(q, "share"), "pruned"] == pytest.approx(first.loc[(q, "share"), "dense"], abs=1e-9)


def test_a_shrunk_model_is_explained_without_patching():
    dense = load_model("tiny:mamba2")
    shrunk = _copy(dense)
    prune(shrunk, "state", sparsity=0.5, score="magnitude", mode="shrink", show_progress=False)
    e = explain(dense, shrunk, _windows(), show_progress=False)
    assert e.patching.empty and "structurally shrunk" in e.meta["patching_note"]
    assert e.top is None and "restoration patching skipped" in e.text
    assert len(e.drift) == dense.registry.n_layers


def test_save_and_load_round_trip(tmp_path, dense):
    pruned = _copy(dense)
    prune(pruned, "magnitude", sparsity=0.5, show_progress=False)
    e = explain(dense, pruned, _windows(), label="magnitude", sparsity=0.5, show_progress=False)
    out = e.save(tmp_path / "exp")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["drift.csv", "patching.csv", "dynamics.csv", "samples.csv", "states.csv", "explanation.json",
         "explanation.md"])  # fmt: skip
    back = Explanation.load(out)
    assert back.verdict == e.verdict and back.top[:2] == e.top[:2] and back.text == e.text
    pd.testing.assert_frame_equal(back.drift, e.drift, check_exact=False, rtol=1e-6)
    frames = e.frames()
    assert list(frames["drift"].columns[:2]) == ["label", "sparsity"] and (frames["drift"].label == "magnitude").all()
    with pytest.raises(ValueError, match="exp is not empty; choose another directory or overwrite it"):
        e.save(out)
    e.save(out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_bad_inputs_are_named(dense):
    other = load_model("tiny:mamba2" if dense.arch == "mamba" else "tiny:mamba")
    with pytest.raises(ValueError, match="dense is .* but pruned is"):
        explain(dense, other, _windows(), show_progress=False)
    with pytest.raises(ValueError, match="^drift_threshold: -1 is out of range; allowed: value > 0"):
        explain(dense, _copy(dense), _windows(), drift_threshold=-1, show_progress=False)
    with pytest.raises(ValueError, match="unknown component 'gate'"):
        explain(dense, _copy(dense), _windows(), components=["gate"], show_progress=False)
    with pytest.raises(ValueError, match="^n_samples: 0 is out of range; allowed: 1 <= value <= 67,108,864"):
        explain(dense, _copy(dense), _windows(), n_samples=0, show_progress=False)
    with pytest.raises(ValueError, match="^top_layers: 0 is out of range"):
        explain(dense, _copy(dense), _windows(), top_layers=0, show_progress=False)
    with pytest.raises(ValueError, match="^collapsed: 1.1 is not above healthy=1.5"):
        explain(dense, _copy(dense), _windows(), healthy=1.5, collapsed=1.1, show_progress=False)
    with pytest.raises(ValueError, match="unknown pruning method 'obs'"):
        explain_method(dense, "obs", 0.5, _windows())
    with pytest.raises(ValueError, match="^windows: wanda needs calibration windows"):
        explain_method(dense, "wanda", 0.5, _windows())


def test_default_faults_fit_every_architecture(tiny_lm):
    faults = default_faults(tiny_lm)
    assert len(faults) == 10 and len({f.name for f in faults}) == 10
    for f in faults:
        lm = _copy(tiny_lm)
        plant(lm, f)
        changed = [t for t, s in zip(lm.registry.tensors(lm.model, f.layer, f.component),
                                     tiny_lm.registry.tensors(tiny_lm.model, f.layer, f.component))
                   if not torch.equal(t, s)]  # fmt: skip
        assert changed, f.describe()
    with pytest.raises(ValueError, match="has no tensor matching 'nope'"):
        plant(_copy(tiny_lm), Fault("x", 0, "dt", "zero", tensor="nope"))
    with pytest.raises(ValueError, match="unknown fault kind 'melt'"):
        plant(_copy(tiny_lm), Fault("x", 0, "dt", "melt"))


@pytest.mark.slow
def test_planted_faults_on_the_default_model_are_named():
    """The issue's acceptance test: 10 planted faults on top of 25% WANDA, at least 9 named exactly."""
    from sensitivity import calibration_windows, load_corpus

    lm = load_model("default")
    corpus = load_corpus()
    windows = calibration_windows(corpus, lm.tokenizer, 4, 256, seed=0, split="validation")
    background = _copy(lm, "wanda25")
    prune(background, "wanda", sparsity=0.25, windows=calibration_windows(corpus, lm.tokenizer, 16, 256, seed=0),
          show_progress=False)  # fmt: skip
    named = []
    for f in default_faults(lm):
        faulty = plant(_copy(background, f.name), f)
        e = explain(lm, faulty, windows, label=f.name, top_layers=2, show_progress=False)
        named.append(e.top is not None and e.top[:2] == (f.layer, f.component))
    assert sum(named) >= 9, [f.name for f, ok in zip(default_faults(lm), named) if not ok]

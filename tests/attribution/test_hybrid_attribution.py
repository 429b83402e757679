"""Attribution on every built-in tiny hybrid: every method over every (layer, component) a layer holds, captum's
forward equal to the model's, grad x activation against autograd through the model's own forward, agreement."""

from __future__ import annotations

import math

import pytest
import torch

from sensitivity.attribution import METHODS, agreement, attribute, covered_components, weight_scores
from sensitivity.attribution.captum_methods import (
    captum_components,
    captum_scores,
    captum_target,
    forward_embed_scale,
    make_forward,
)
from sensitivity.core import hooks, load_model
from sensitivity.core.spec import SpecError
from sensitivity.core.stats import grad_state, window_objective
from sensitivity.probes import probe

HYBRIDS = ["tiny:bamba", "tiny:granitemoehybrid", "tiny:nemotron-h", "tiny:jamba", "tiny:falcon-h1", "tiny:zamba2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=HYBRIDS)
def lm(request):
    return load_model(request.param)


def test_captum_forward_computes_the_models_logits(lm, make_windows):
    """From the looked-up embeddings, captum's forward gives the logits the model gives from the token ids (Granite
    scales inputs_embeds itself, Falcon-H1 does not, so the forward scales them there)."""
    ids = make_windows(2, 12, seed=3).ids
    module, reg = lm.model, lm.registry
    embeds = module.get_input_embeddings()(ids)  # (B, L, D)
    scale = forward_embed_scale(reg)
    assert scale == (reg.embed_scale if reg.arch == "falcon_h1" else 1.0)
    kept = []
    head = module.get_output_embeddings().register_forward_hook(lambda m, a, out: kept.append(out))
    with torch.no_grad():
        expected = module(input_ids=ids, use_cache=False)
        got = make_forward(module, "logprob", scale)(embeds, ids)  # (B,)
    head.remove()
    torch.testing.assert_close(kept[1], kept[0], rtol=1e-5, atol=1e-5)  # the LM head's output, both forwards
    torch.testing.assert_close(got, window_objective(expected.logits, ids, "logprob"), rtol=1e-5, atol=1e-4)
    if scale != 1.0:  # without the scale the forward computes something else: the check above can fail
        with torch.no_grad():
            wrong = make_forward(module, "logprob")(embeds, ids)
        assert (wrong - got).abs().max() > 1e-2


def _targets(reg) -> list[tuple[int, str]]:
    """One layer of each unit kind with captum-covered components: SSM x, attention q and o, MLP gate/up/down."""
    out = [(reg.layers_with("x")[-1], "x"), (reg.layers_with("q")[0], "q"), (reg.layers_with("o")[-1], "o")]
    for name in ("gate", "up", "down"):
        if name in reg.component_names:
            out.append((reg.layers_with(name)[-1], name))
    return out


def test_grad_x_act_equals_gradient_times_activation_by_hand(lm, make_windows):
    """captum's LayerGradientXActivation from embeddings vs autograd of the model's own forward from the token ids,
    with the activations read by hook points (and, for gate and up, by a plain hook on their projection)."""
    reg, module = lm.registry, lm.model
    windows = make_windows(3, 12, seed=5)
    targets = _targets(reg)
    got = captum_scores(lm, windows, "grad_x_act", targets, batch_size=2, show_progress=False)
    acts: dict[tuple[int, str], torch.Tensor] = {}
    channels: dict[tuple[int, str], tuple[int, int]] = {}  # gate/up of a packed projection: their output rows
    handles, fns = [], {}
    for layer, name in targets:
        comp = reg.component(name)
        if name in ("gate", "up"):
            proj, rows = captum_target(module, reg, layer, name)
            assert isinstance(proj, torch.nn.Linear)
            if rows is not None:
                channels[(layer, name)] = rows
            handles.append(proj.register_forward_hook(lambda m, a, out, key=(layer, name): acts.__setitem__(key, out)))
        else:
            fns[f"layers.{layer}.{comp.hook}"] = lambda t, key=(layer, name): acts.__setitem__(key, t)
    expected = {t: [0.0, 0.0] for t in targets}
    with grad_state(module, list(module.parameters())), hooks(lm, fns):
        for ids in windows.ids:
            loss = window_objective(module(input_ids=ids[None], use_cache=False).logits, ids[None]).sum()
            grads = torch.autograd.grad(loss, [acts[t] for t in targets])
            for t, g in zip(targets, grads):
                prod = (g * acts[t]).double()  # (1, L, C)
                if t in channels:
                    prod = prod[..., channels[t][0] : channels[t][1]]  # (1, L, F)
                expected[t][0] += prod.abs().sum().item() / len(windows)
                expected[t][1] += prod.sum().item() / len(windows)
    for h in handles:
        h.remove()
    for t in targets:
        assert expected[t][0] > 0, t
        assert got[t][0] == pytest.approx(expected[t][0], rel=1e-4), t
        assert got[t][1] == pytest.approx(expected[t][1], rel=1e-4, abs=1e-5 * expected[t][0]), t


def test_every_method_covers_every_component_each_layer_holds(lm, make_windows):
    reg = lm.registry
    df = attribute(lm, make_windows(2, 10, seed=1), methods=list(METHODS), n_steps=2, show_progress=False)
    assert df.value.map(math.isfinite).all()
    for method in METHODS:
        covered = set(covered_components(reg, method))
        for layer in range(reg.n_layers):
            held = {c.name for c in reg.components_at(layer)}
            got = set(df[(df.kind == method) & (df.layer == layer)].component)
            assert got == held & covered, (method, layer, reg.layer_kind(layer))
    captum = set(captum_components(reg))
    assert {"q", "k", "v", "o", "up", "down"} <= captum and not captum & {"router", "experts", "shared_experts"}
    assert ("gate" in captum) == ("gate" in reg.component_names)
    attention = reg.layers_with("q")[0]
    rows = df[(df.layer == attention) & (df.kind == "grad_x_act") & (df.metric == "abs_sum")]
    assert (rows.set_index("component").loc[["q", "k", "v", "o"], "value"] > 0).all()
    moe = [i for i in range(reg.n_layers) if "moe" in reg.units[i]]
    if moe:  # the MoE's weights get gradient scores
        taylor = df[(df.layer == moe[0]) & (df.kind == "taylor") & (df.metric == "sum")].set_index("component")
        assert (taylor.loc[["router", "experts"], "value"] > 0).all()


def test_weight_scores_are_shaped_like_each_units_weights(lm, make_windows):
    reg = lm.registry
    layer = reg.layers_with("q")[0]
    scores = weight_scores(lm, make_windows(2, 10), "wanda", layers=[layer], show_progress=False)
    assert {k.component for k in scores} == {c.name for c in reg.components_at(layer) if reg.weights(c.name)}
    for key, score in scores.items():
        (t,) = [t for t in reg.weights(key.component) if t.describe() == key.tensor]
        assert score.shape == t.get(reg.owner(lm.model, layer, key.component)).shape, key
    lacking = {c: [i for i in range(reg.n_layers) if not reg.has(i, c)] for c in ("q", "x")}
    for comp, layers in lacking.items():  # Falcon-H1: every layer holds both
        if layers:
            with pytest.raises(SpecError, match=f"^components: no chosen layer holds '{comp}'; layers with it: "):
                attribute(lm, make_windows(2, 10), methods=["act_norm"], components=[comp], layers=layers,
                          show_progress=False)  # fmt: skip


def test_shared_tensors_get_one_gradient_score_in_every_layer_using_them(make_windows):
    """Zamba2's hybrid layers share their transformer's tensors: one parameter, one gradient, equal scores."""
    lm = load_model("tiny:zamba2")
    reg = lm.registry
    a, b = reg.sharing(reg.layers_with("q")[0], "q")
    df = attribute(lm, make_windows(2, 10), methods=["taylor", "act_norm"], components=["q", "down"],
                   show_progress=False).set_index(["kind", "metric", "layer", "component"]).value  # fmt: skip
    for comp in ("q", "down"):
        assert df[("taylor", "sum", a, comp)] == df[("taylor", "sum", b, comp)] > 0
        assert df[("act_norm", "l2_mean", a, comp)] != df[("act_norm", "l2_mean", b, comp)]  # per-layer inputs


@pytest.mark.parametrize("name", ["tiny:bamba", "tiny:zamba2"])
def test_agreement_of_attribution_and_probes_on_a_hybrid(name, make_windows):
    from sensitivity.data import calibration_windows, load_corpus

    lm, corpus = load_model(name), load_corpus("sample")
    heldout = calibration_windows(corpus, lm.tokenizer, 2, 16, seed=0, split="test")
    probes = probe(lm, corpus, kinds=["zero"], heldout=heldout, calibration=heldout, show_progress=False)
    attr = attribute(lm, heldout, methods=["act_norm", "grad_x_act"], show_progress=False)
    table = agreement(probes, attr)
    zero = table[(table.ablation == "zero") & (table.attribution == "grad_x_act")]
    damage = probes[(probes.metric == "delta_nll") & probes["index"].isna()]
    scored = attr[attr.kind == "grad_x_act"]
    pairs = set(zip(damage.layer, damage.component)) & set(zip(scored.layer, scored.component))
    assert {c for _, c in pairs} >= {"q", "k", "v", "o", "up", "down", "x", "out_proj"}
    assert (zero.n == len(pairs)).all() and zero.spearman.notna().all()
    assert zero.spearman.between(-1, 1).all()

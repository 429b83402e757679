"""captum methods against captum called directly, and grad_x_act against autograd through hooks."""

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerConductance, LayerGradientXActivation, LayerIntegratedGradients

from sensitivity.attribution import attribute
from sensitivity.core import hooks, load_model


def _forward(model):
    """Independent forward: input embeddings (B, L, D) -> mean next-token CE per window (B,)."""

    def f(embeds, ids):
        logits = model(inputs_embeds=embeds, use_cache=False).logits  # (B, L, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1)
        return nll.mean(1)

    return f


def _ours(lm, windows, method, layer, component, **kw):
    df = attribute(lm, windows, methods=[method], layers=[layer], components=[component], show_progress=False, **kw)
    assert len(df) == 2
    return df.set_index("metric")["value"]


def _aggregate(attr):
    flat = attr.detach().double().flatten(1)  # (n, ·)
    return flat.abs().sum(1).mean().item(), flat.sum(1).mean().item()


CASES = [("tiny:mamba2", 1, "B"), ("tiny:mamba2", 0, "norm"), ("tiny:mamba", 1, "dt"), ("tiny:falcon-mamba", 0,
         "dt_norm")]  # fmt: skip


@pytest.mark.parametrize("name,layer,component", CASES)
def test_grad_x_act_matches_captum_directly(name, layer, component, make_windows):
    lm = load_model(name)
    windows = make_windows(3, 16, seed=7)
    got = _ours(lm, windows, "grad_x_act", layer, component, batch_size=2)
    point = lm.registry.hook_point(lm.model, layer, lm.registry.component(component).hook)
    embeds = lm.model.get_input_embeddings()(windows.ids).detach()
    attr = LayerGradientXActivation(_forward(lm.model), point).attribute(embeds, additional_forward_args=(windows.ids,))
    abs_sum, total = _aggregate(attr)
    assert abs_sum > 0
    assert got["abs_sum"] == pytest.approx(abs_sum, rel=1e-4)
    assert got["sum"] == pytest.approx(total, rel=1e-4, abs=1e-6 * abs_sum)


@pytest.mark.parametrize("name,layer,component", [("tiny:mamba2", 1, "x"), ("tiny:mamba", 0, "out_proj")])
def test_grad_x_act_matches_autograd_through_hooks(name, layer, component, make_windows):
    lm = load_model(name)
    windows = make_windows(2, 14, seed=8)
    got = _ours(lm, windows, "grad_x_act", layer, component)
    hook = f"layers.{layer}.{lm.registry.component(component).hook}"
    abs_sums, sums = [], []
    for ids in windows.ids:
        kept = []

        def keep(act):
            act = act.detach().requires_grad_(True)  # a leaf we can differentiate with respect to
            kept.append(act)
            return act

        with hooks(lm, {hook: keep}):
            loss = lm.model(input_ids=ids[None], labels=ids[None], use_cache=False).loss
        (grad,) = torch.autograd.grad(loss, kept)
        prod = (grad * kept[0]).double()
        abs_sums.append(prod.abs().sum().item())
        sums.append(prod.sum().item())
    assert got["abs_sum"] == pytest.approx(sum(abs_sums) / 2, rel=1e-4)
    assert got["sum"] == pytest.approx(sum(sums) / 2, rel=1e-4, abs=1e-6 * got["abs_sum"])


@pytest.mark.parametrize("method,cls", [("integrated_gradients", LayerIntegratedGradients),
                                        ("conductance", LayerConductance)])  # fmt: skip
def test_ig_and_conductance_match_captum_directly(method, cls, make_windows):
    lm = load_model("tiny:mamba2")
    windows = make_windows(2, 12, seed=9)
    got = _ours(lm, windows, method, 1, "dt", n_steps=3)
    point = lm.registry.hook_point(lm.model, 1, "dt")
    embeds = lm.model.get_input_embeddings()(windows.ids).detach()
    attr = cls(_forward(lm.model), point).attribute(embeds, baselines=torch.zeros_like(embeds),
                                                    additional_forward_args=(windows.ids,), n_steps=3)  # fmt: skip
    abs_sum, total = _aggregate(attr)
    assert abs_sum > 0
    assert got["abs_sum"] == pytest.approx(abs_sum, rel=1e-4)
    assert got["sum"] == pytest.approx(total, rel=1e-4, abs=1e-6 * abs_sum)


def test_logprob_objective_scales_grad_x_act(make_windows):
    lm = load_model("tiny:mamba2")
    windows = make_windows(2, 11, seed=10)
    loss = _ours(lm, windows, "grad_x_act", 0, "z")
    logprob = _ours(lm, windows, "grad_x_act", 0, "z", objective="logprob")
    assert logprob["abs_sum"] == pytest.approx(10 * loss["abs_sum"], rel=1e-4)  # L - 1 = 10 positions
    assert logprob["sum"] == pytest.approx(-10 * loss["sum"], rel=1e-4, abs=1e-6 * loss["abs_sum"])


def test_batching_does_not_change_grad_x_act(make_windows):
    lm = load_model("tiny:mamba")
    windows = make_windows(3, 12, seed=11)
    one = attribute(lm, windows, methods=["grad_x_act"], batch_size=1, show_progress=False)
    three = attribute(lm, windows, methods=["grad_x_act"], batch_size=3, show_progress=False)
    torch.testing.assert_close(torch.tensor(one["value"].values), torch.tensor(three["value"].values), rtol=1e-4,
                               atol=1e-7)  # fmt: skip

"""Each ablation changes exactly what the ablation table says, and nothing is left behind after it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sensitivity.core import capture, hook_name, load_model
from sensitivity.core.stats import channel_stats
from sensitivity.data import Windows
from sensitivity.probes import Probe, ablation_table
from sensitivity.probes.ablations import Context, ablate


def _noisy(name: str):
    """A tiny model whose zero-initialised parameters (conv bias, ...) are made non-zero, so ablations show."""
    lm = load_model(name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return lm


@pytest.fixture(scope="module", params=["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba"])
def lm(request):
    return _noisy(request.param)


@pytest.fixture(scope="module")
def m2():
    return _noisy("tiny:mamba2")


@pytest.fixture
def ids():
    return torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(5))  # (B, L)


def _ctx(lm, ids, layer, points):
    names = [hook_name(layer, p) for p in points]
    win = Windows(ids, ids.shape[1], "train", "test", "calibration", 0, 0)
    stats = channel_stats(lm, win, names, show_progress=False)
    return Context({n: s.mean for n, s in stats.items()}, {n: s.l2 for n, s in stats.items()})


def _run(lm, ids, probe, points, ctx=None):
    """Activations at ``points`` of the probed layer while ``probe`` is applied (captured after the ablation)."""
    names = [hook_name(probe.layer, p) for p in points]
    with ablate(lm.model, lm.registry, probe, ctx or Context({}, {})), capture(lm, names) as acts:
        lm.model(ids, use_cache=False)
    return {p: acts[n][0] for p, n in zip(points, names)}


def _dense(lm, ids, layer, points):
    names = [hook_name(layer, p) for p in points]
    with capture(lm, names) as acts:
        lm.model(ids, use_cache=False)
    return {p: acts[n][0] for p, n in zip(points, names)}


def _skip(lm, u):
    """The D skip term D * u, per channel ((B, L, ED))."""
    D = lm.registry.mixer(lm.model, 0).D.detach()
    if lm.arch == "mamba2":
        return (u.view(*u.shape[:2], lm.registry.dims["H"], -1) * D[:, None]).reshape(u.shape)
    return u * D


@pytest.mark.parametrize("comp", ["B", "C", "dt"])
def test_zeroing_B_C_or_dt_leaves_only_the_skip_term(lm, ids, comp):
    acts = _run(lm, ids, Probe(0, comp, "zero"), ["u", "y"])
    torch.testing.assert_close(acts["y"], _skip(lm, acts["u"]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_dense(lm, ids, 0, ["y"])["y"], acts["y"])


def test_D_zero_and_bypass_remove_exactly_the_skip_term(lm, ids):
    dense = _dense(lm, ids, 0, ["u", "y"])
    for kind in ("zero", "bypass"):
        acts = _run(lm, ids, Probe(0, "D", kind), ["y"])
        torch.testing.assert_close(acts["y"], dense["y"] - _skip(lm, dense["u"]), rtol=1e-5, atol=1e-5)


def test_z_bypass_means_no_gating(lm, ids):
    acts = _run(lm, ids, Probe(0, "z", "bypass"), ["y", "gated"])
    torch.testing.assert_close(acts["gated"], acts["y"])
    dense = _dense(lm, ids, 0, ["y", "gated"])
    assert not torch.allclose(dense["gated"], dense["y"])


def test_conv_bypass_passes_the_current_token(lm, ids):
    acts = _run(lm, ids, Probe(0, "conv1d", "bypass"), ["conv_in" if lm.arch == "mamba2" else "x", "conv"])
    x = acts["conv_in" if lm.arch == "mamba2" else "x"]
    torch.testing.assert_close(acts["conv"], F.silu(x), rtol=1e-5, atol=1e-6)


def test_conv_zero_zeroes_weights_and_bias(lm, ids):
    acts = _run(lm, ids, Probe(0, "conv1d", "zero"), ["conv"])
    assert acts["conv"].abs().max() == 0


def test_A_log_bypass_uses_the_layer_mean_decay_rate(lm, ids):
    A_log = lm.registry.mixer(lm.model, 0).A_log.detach()
    acts = _run(lm, ids, Probe(0, "A_log", "bypass"), ["A"])
    torch.testing.assert_close(acts["A"], torch.full_like(acts["A"], -A_log.exp().mean().item()))
    acts = _run(lm, ids, Probe(0, "A_log", "zero"), ["A"])
    assert (acts["A"] == -1).all()


def test_dt_bypass_and_mean_are_calibration_means(lm, ids):
    ctx = _ctx(lm, ids, 0, ["dt", "dt_raw"])
    acts = _run(lm, ids, Probe(0, "dt", "bypass"), ["dt"], ctx)
    torch.testing.assert_close(acts["dt"], ctx.means["layers.0.dt"].expand_as(acts["dt"]))
    dense = _dense(lm, ids, 0, ["dt"])["dt"]
    torch.testing.assert_close(ctx.means["layers.0.dt"], dense.mean((0, 1)))  # the mean of what the layer produced
    acts = _run(lm, ids, Probe(0, "dt", "mean"), ["dt_raw", "dt"], ctx)
    torch.testing.assert_close(acts["dt_raw"], ctx.means["layers.0.dt_raw"].expand_as(acts["dt_raw"]))
    assert torch.allclose(acts["dt"][0, 0], acts["dt"][-1, -1])  # input-independent


@pytest.mark.parametrize("comp", ["x", "z", "B", "C", "out_proj"])
def test_mean_replaces_the_activation_by_its_calibration_mean(lm, ids, comp):
    point = lm.registry.component(comp).hook
    ctx = _ctx(lm, ids, 0, [point])
    acts = _run(lm, ids, Probe(0, comp, "mean"), [point], ctx)
    mean = _dense(lm, ids, 0, [point])[point].mean((0, 1))
    torch.testing.assert_close(acts[point], mean.expand_as(acts[point]), rtol=1e-5, atol=1e-6)


def test_resample_takes_the_activation_of_another_window(lm, ids):
    dense = _dense(lm, ids, 1, ["z"])["z"]  # (B, L, ED)
    src = dense[[1, 2, 0]]
    ctx = Context({}, {}, source={"layers.1.z": src})
    acts = _run(lm, ids, Probe(1, "z", "resample"), ["z", "gated"], ctx)
    torch.testing.assert_close(acts["z"], src)


def test_remove_units(m2, ids):
    H, P = m2.registry.dims["H"], m2.registry.dims["P"]
    dense = _dense(m2, ids, 1, ["out_proj_in"])["out_proj_in"].view(3, 24, H, P)
    acts = _run(m2, ids, Probe(1, "head", "remove", 5), ["out_proj_in"])["out_proj_in"].view(3, 24, H, P)
    assert acts[:, :, 5].abs().max() == 0
    keep = [h for h in range(H) if h != 5]
    torch.testing.assert_close(acts[:, :, keep], dense[:, :, keep])
    acts = _run(m2, ids, Probe(1, "state", "remove", 3), ["B", "C"])
    assert acts["B"][..., 3].abs().max() == 0 and acts["C"][..., 3].abs().max() == 0
    assert acts["B"][..., 2].abs().min() > 0
    assert _run(m2, ids, Probe(0, "mixer", "remove"), ["out"])["out"].abs().max() == 0


def test_norm_bypass_feeds_the_gated_activation_to_out_proj(m2, ids):
    acts = _run(m2, ids, Probe(0, "norm", "bypass"), ["gated", "out_proj_in"])
    torch.testing.assert_close(acts["out_proj_in"], acts["gated"])


def test_falcon_dt_norm_bypass_skips_the_rms_norm(ids):
    lm = _noisy("tiny:falcon-mamba")
    R = lm.registry.dims["R"]
    W = lm.registry.mixer(lm.model, 0).x_proj.weight.detach()[:R]  # (R, ED)
    acts = _run(lm, ids, Probe(0, "dt_norm", "bypass"), ["u", "dt_low"])
    torch.testing.assert_close(acts["dt_low"], acts["u"] @ W.T, rtol=1e-5, atol=1e-5)
    dense = _dense(lm, ids, 0, ["u", "dt_low"])
    assert not torch.allclose(dense["dt_low"], dense["u"] @ W.T, atol=1e-3)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsify_prunes_the_lowest_scores_per_row_and_restores(m2, ids, method):
    mixer = m2.registry.mixer(m2.model, 1)
    before = {k: v.clone() for k, v in m2.model.state_dict().items()}
    ctx = _ctx(m2, ids, 1, ["in"])
    lo, hi = m2.registry.component("B").tensors[0].rows
    W = mixer.in_proj.weight.detach()[lo:hi].clone()  # (GN, D)
    l2 = _dense(m2, ids, 1, ["in"])["in"].pow(2).sum((0, 1)).sqrt()  # (D,) independent of channel_stats
    score = W.abs() * (l2 if method == "wanda" else 1)
    k = int(W.shape[1] * 0.5)
    expected = W.clone()
    for r in range(W.shape[0]):
        expected[r, score[r].argsort()[:k]] = 0
    with ablate(m2.model, m2.registry, Probe(1, "B", method, sparsity=0.5), ctx):
        pruned = mixer.in_proj.weight.detach()[lo:hi].clone()
        others = mixer.in_proj.weight.detach()[:lo].clone()
    torch.testing.assert_close(pruned, expected)
    assert ((pruned == 0).sum(1) == k).all()
    torch.testing.assert_close(others, before[m2.registry.layers_path + ".1.mixer.in_proj.weight"][:lo])
    for key, value in m2.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_conv_sparsify_is_per_tensor(m2, ids):
    ctx = _ctx(m2, ids, 0, ["conv_in"])
    w = m2.registry.mixer(m2.model, 0).conv1d.weight
    with ablate(m2.model, m2.registry, Probe(0, "conv1d", "wanda", sparsity=0.25), ctx):
        zeros = (w == 0).sum().item()
    assert zeros == int(w.numel() * 0.25)


def test_every_probe_restores_the_model_and_removes_hooks(lm, ids):
    from sensitivity.probes import ProbeOptions, plan

    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ctx = _ctx(lm, ids, 0, [p for p in lm.registry.hook_names if p != "A"])
    probes = plan(lm.registry, ProbeOptions(components=None, layers=(0,), kinds=("zero", "bypass", "mean", "wanda")))
    for p in probes:
        with ablate(lm.model, lm.registry, p, ctx):
            lm.model(ids, use_cache=False)
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks for m in lm.model.modules())


def test_ablation_table_lists_architecture_specific_components(lm):
    table = ablation_table(lm.registry)
    pairs = set(zip(table.component, table.kind))
    assert ("dt", "bypass") in pairs and ("B", "wanda") in pairs and ("mixer", "remove") in pairs
    assert (("head", "remove") in pairs) == (lm.arch == "mamba2")
    assert (("dt_norm", "bypass") in pairs) == (lm.arch == "falcon_mamba")
    assert ("A_log", "mean") not in pairs


def test_a_kind_registered_from_user_code_is_planned_and_measured():
    from sensitivity.core.hooks import hook_name, hooks
    from sensitivity.data import calibration_windows, load_corpus
    from sensitivity.eval import perplexity
    from sensitivity.probes import KINDS, probe

    @KINDS.register("negate", description="activation -> its negative",
                    applies=lambda registry, comp: comp in ("x", "z"))  # fmt: skip
    def negate(model, registry, probe_, ctx):
        return hooks(model, {hook_name(probe_.layer, registry.component(probe_.component).hook): torch.neg})

    try:
        lm = load_model("tiny:mamba2")
        corpus = load_corpus("sample")
        heldout = calibration_windows(corpus, lm.tokenizer, 2, 32, seed=0, split="test")
        calib = calibration_windows(corpus, lm.tokenizer, 2, 32, seed=0)
        df = probe(lm, kinds=["negate"], heldout=heldout, calibration=calib, layers=[1], show_progress=False)
        assert sorted(set(df.component)) == ["x", "z"] and set(df.kind) == {"negate"}
        dense = perplexity(lm, heldout, show_progress=False).nll
        with hooks(lm, {hook_name(1, "x"): torch.neg}):
            negated = perplexity(lm, heldout, show_progress=False).nll
        got = df[(df.component == "x") & (df.metric == "delta_nll")].value.item()
        assert got == pytest.approx(negated - dense, abs=1e-5) and abs(got) > 1e-4
    finally:
        KINDS.unregister("negate")

"""The instrumented forward against transformers' own forward, hook firing, and state_dict invariance."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from sensitivity.core import capture, hook_name, hooks, instrument, is_instrumented, tiny_config, uninstrument

pytestmark = pytest.mark.compat  # the compatibility subset (make test-latest)

CONFIGS = [
    ("mamba", {}),
    ("mamba", {"use_bias": True, "use_conv_bias": False}),
    ("falcon_mamba", {}),
    ("mamba2", {"n_groups": 1}),
    ("mamba2", {"n_groups": 2}),
    ("mamba2", {"n_groups": 4, "chunk_size": 8, "time_step_limit": (0.001, 0.5)}),
]


def _pair(arch, overrides, scan="chunked"):  # "chunked" forces the chunked/SSD scan at these short lengths
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()
    with torch.no_grad():  # move A_log, D, dt biases away from their initial values
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias", "dt_proj.bias", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    ours = instrument(copy.deepcopy(hf), scan=scan)
    return hf, ours


@pytest.mark.parametrize("arch,overrides", CONFIGS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scan", ["auto", "chunked"])
def test_matches_hf_forward(arch, overrides, masked, scan, ids):
    hf, ours = _pair(arch, overrides, scan)
    mask = None
    if masked:  # left padding of different lengths
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        mask[1, :17] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, use_cache=False).logits
        got = ours(ids, attention_mask=mask, use_cache=False).logits
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch,overrides", CONFIGS[::2])
def test_gradients_match_hf_and_sequential_scan(arch, overrides, ids):
    hf, ours = _pair(arch, overrides)
    _, seq = _pair(arch, overrides, scan="sequential")
    grads = []
    for model in (hf, ours, seq):
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == grads[2].keys()
    for name in grads[0]:
        scale = max(1.0, grads[0][name].abs().max().item())
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5 * scale, msg=name)
        torch.testing.assert_close(grads[1][name], grads[2][name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_every_hook_point_fires_with_documented_shape(tiny_lm, ids):
    reg = tiny_lm.registry
    names = [hook_name(layer, h) for layer in range(reg.n_layers) for h in reg.hook_names]
    with capture(tiny_lm, names) as acts:
        tiny_lm.model(ids, use_cache=False)
    d = {**reg.dims, "B": ids.shape[0], "L": ids.shape[1]}
    for spec in reg.hooks:
        dims = spec.shape.strip("()").rstrip(",").split(", ")
        expected = tuple(eval(dim.replace("2GN", "2*G*N"), {}, d) for dim in dims)  # "ED+2GN" -> ED + 2*G*N
        for layer in range(reg.n_layers):
            got = acts[hook_name(layer, spec.name)]
            assert len(got) == 1, spec.name
            assert tuple(got[0].shape) == expected, (spec.name, got[0].shape, expected)


def test_hooks_on_conv1d_and_dt_proj_modules_fire(tiny_lm, ids):
    mixer = tiny_lm.registry.mixer(tiny_lm.model, 0)
    seen = []
    handles = [
        getattr(mixer, name).register_forward_hook(lambda m, a, o, name=name: seen.append(name))
        for name in ("conv1d", "dt_proj", "norm")
        if hasattr(mixer, name)
    ]
    try:
        tiny_lm.model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert "conv1d" in seen
    assert ("dt_proj" in seen) == (tiny_lm.arch != "mamba2")
    assert ("norm" in seen) == (tiny_lm.arch == "mamba2")


def test_hook_replacement_changes_output_and_zero_gate_kills_mixer(tiny_lm, ids):
    with torch.no_grad():
        base = tiny_lm.model(ids, use_cache=False).logits
        with hooks(tiny_lm, {"layers.0.out": torch.zeros_like, "layers.1.out": torch.zeros_like}):
            no_mixers = tiny_lm.model(ids, use_cache=False).logits
        # Independent computation of "every mixer removed": embeddings -> final norm -> lm head.
        m = tiny_lm.model
        expected = m.lm_head(m.backbone.norm_f(m.backbone.embeddings(ids)))
    assert (base - no_mixers).abs().max() > 1e-3
    torch.testing.assert_close(no_mixers, expected, rtol=1e-5, atol=1e-5)


def test_unfired_hook_raises_and_hooks_are_removed(tiny_lm, ids):
    mixer = tiny_lm.registry.mixer(tiny_lm.model, 0)
    with pytest.raises(RuntimeError, match="did not fire: layers.0.dt"):
        with hooks(tiny_lm, {"layers.0.dt": lambda t: None}):
            pass
    assert not mixer.hook_points["dt"]._forward_hooks
    with pytest.raises(ZeroDivisionError):
        with hooks(tiny_lm, {"layers.0.dt": lambda t: None}):
            raise ZeroDivisionError
    assert not mixer.hook_points["dt"]._forward_hooks


@pytest.mark.parametrize(
    "bad,match",
    [
        ("layers.9.dt", "layer: 9 is out of range"),
        ("layers.0.nope", "unknown hook point 'nope'"),
        ("dt", "bad hook name 'dt'"),
    ],
)
def test_bad_hook_names(tiny_lm, bad, match):
    with pytest.raises(ValueError, match=match):
        with hooks(tiny_lm, {bad: lambda t: None}):
            pass


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "falcon_mamba"])
def test_instrument_keeps_state_dict_and_round_trips(arch, ids, tmp_path):
    hf, ours = _pair(arch, {})
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert is_instrumented(ours) and not is_instrumented(hf)
    ours.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, hf(ids, use_cache=False).logits)
    uninstrument(ours)
    assert not is_instrumented(ours) and not any("hook_points" in n for n, _ in ours.named_modules())


def test_generation_with_cache_uses_hf_path(tiny_lm, ids):
    out = tiny_lm.model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape == (1, 8)


def test_unknown_scan_rejected():
    hf, _ = _pair("mamba", {})
    with pytest.raises(ValueError, match="unknown scan 'fast'; allowed: auto, chunked, sequential"):
        instrument(hf, scan="fast")


def _ungrouped_forward(self, hidden_states, gate=None):
    """transformers 5.0-5.22's MambaRMSNormGated.forward: one RMS over all channels, whatever the groups."""
    dtype = hidden_states.dtype
    h = hidden_states.float()
    if gate is not None:
        h = h * torch.nn.functional.silu(gate.float())
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(dtype)


def _grouped_reference(gated, weight, groups, eps):
    g = gated.float().view(*gated.shape[:-1], groups, -1)  # (B, L, G, ED/G)
    return weight * (g / (g.pow(2).mean(-1, keepdim=True) + eps).sqrt()).view(gated.shape)


def test_gated_norm_is_normalised_per_group(ids):
    _, ours = _pair("mamba2", {"n_groups": 2})
    norm = ours.backbone.layers[0].mixer.norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, norm.weight.numel()))
    with capture(ours, [hook_name(0, "gated"), hook_name(0, "out_proj_in")]) as acts, torch.no_grad():
        ours(ids, use_cache=False)
    gated, normed = acts[hook_name(0, "gated")][0], acts[hook_name(0, "out_proj_in")][0]
    expected = _grouped_reference(gated, norm.weight, 2, norm.variance_epsilon)
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-6)
    ungrouped = norm.weight * gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert (ungrouped - expected).abs().max() > 1e-3  # the test tells the two norms apart


def test_ungrouped_transformers_norm_is_detected_and_overridden(ids, monkeypatch, caplog):
    from sensitivity.core import load_model
    from sensitivity.core.instrumented import hf_norm_is_grouped

    reference = load_model("tiny:mamba2").model
    norm = reference.backbone.layers[0].mixer.norm
    assert hf_norm_is_grouped(norm, 2)  # transformers >= 5.23 here
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
    hf_class = type(uninstrument(load_model("tiny:mamba2").model).backbone.layers[0].mixer.norm)  # found, not named
    monkeypatch.setattr(hf_class, "forward", _ungrouped_forward)
    assert not hf_norm_is_grouped(norm, 2)
    with caplog.at_level("WARNING", logger="sensitivity.core.loading"):
        lm = load_model("tiny:mamba2")
    assert "normalises Mamba-2's gated RMS norm over all channels" in caplog.text
    assert "n_groups=2" in caplog.text
    with torch.no_grad():
        got = lm.model(ids, use_cache=False).logits
        plain = uninstrument(lm.model)(ids, use_cache=False).logits
    assert torch.equal(got, expected)  # the instrumented forward owns the grouped norm
    assert (plain - expected).abs().max() > 1e-3  # plain transformers would have given other numbers


def test_a_cache_in_training_mode_warns_once_that_no_hook_fires(ids, caplog, monkeypatch):
    """transformers 5.25's Mamba-2 forward builds a cache in train() unless told use_cache=False (5.24 forced it off
    in training, so every hook fired)."""
    import transformers
    from packaging.version import Version

    from sensitivity.core import instrumented, load_model

    monkeypatch.setattr(instrumented, "_warned_cache_in_training", False)
    lm = load_model("tiny:mamba2")
    lm.model.config.use_cache = True
    lm.model.train()
    with caplog.at_level("WARNING", logger="sensitivity.core.instrumented"):
        if Version(transformers.__version__) >= Version("5.25"):
            with pytest.raises(RuntimeError, match="did not fire: layers.0.x"):
                with hooks(lm, {"layers.0.x": lambda t: None}):
                    lm.model(ids[:, :8])
            lm.model(ids[:, :8])
        else:
            with hooks(lm, {"layers.0.x": lambda t: None}):
                lm.model(ids[:, :8])
        with hooks(lm, {"layers.0.x": lambda t: None}):
            lm.model(ids[:, :8], use_cache=False)  # fires
    expected = 1 if Version(transformers.__version__) >= Version("5.25") else 0
    assert caplog.text.count("called with a generation cache in training mode") == expected

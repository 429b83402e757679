"""Falcon-H1 and Zamba2: instrumented forward and gradients against HF, hook points, the layer runner, the registry.

Falcon-H1 runs a Mamba-2 mixer and an attention side by side in every block, with µP multipliers; Zamba2 mixes
Mamba-2 layers with hybrid layers whose transformer block is shared (the same tensors in several layers).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sensitivity.core import (
    build_registry,
    capture,
    hook_name,
    instrument,
    is_instrumented,
    load_model,
    tiny_config,
    uninstrument,
)
from sensitivity.core.runner import LayerRunner
from sensitivity.core.spec import SpecError
from sensitivity.data import Windows

CONFIGS = [
    ("falcon_h1", {}),  # gated norm after the gate, every µP multiplier away from 1
    ("falcon_h1", {"mamba_rms_norm": False}),  # no gated norm
    ("falcon_h1", {"mamba_norm_before_gate": True, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_chunk_size": 8,
                   "mamba_proj_bias": True, "projectors_bias": True}),  # norm(y)·silu(z), ED != expand·D
    ("zamba2", {}),  # M H M H, one shared block with LoRA adapters and RoPE
    ("zamba2", {"layers_block_type": ["hybrid", "hybrid", "linear_attention", "hybrid"], "num_mem_blocks": 2,
                "use_shared_attention_adapter": False, "use_mem_rope": False, "num_key_value_heads": 2,
                "add_bias_linear": True}),  # two memory blocks, GQA, no RoPE
]  # fmt: skip
SSM = ("z", "x", "B", "C", "dt", "conv1d", "A_log", "D", "norm", "out_proj")


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.compat]  # tests/conftest.py; make test-latest


def _ids(n=3, L=37):
    return torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(1))  # (B, L)


def _left_padding(ids):
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :17] = 0
    return mask


def _pair(arch, overrides, scan="chunked", **kwargs):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), **kwargs).eval()
    with torch.no_grad():  # move per-head parameters, biases and norm weights away from their initial values
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias", "conv1d.bias", "norm.weight", "layernorm.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return hf, instrument(copy.deepcopy(hf), scan=scan)


def _windows(ids):
    return Windows(ids=ids, seqlen=ids.shape[1], split="test", source="random", kind="eval", seed=None,
                   stride=ids.shape[1])  # fmt: skip


@pytest.mark.parametrize("arch,overrides", CONFIGS)
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_match_hf(arch, overrides, masked):
    hf, ours = _pair(arch, overrides, scan="sequential" if masked else "chunked")
    ids = _ids()
    mask = _left_padding(ids) if masked else None
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    logits, grads = [], []
    for model in (hf, ours):
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        logits.append(out.logits.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert (logits[1] - logits[0]).abs().max().item() <= 1e-5
    assert grads[0].keys() == grads[1].keys()
    assert len(grads[0]) == len([p for p in hf.parameters() if p.requires_grad])  # every parameter has a gradient
    for name in grads[0]:
        scale = max(1.0, grads[0][name].abs().max().item())
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def _expected_shape(spec, dims):
    shape = spec.shape.strip("()").rstrip(",").replace("2GN", "2*G*N").replace("·", "*")
    return tuple(eval(dim, {}, dims) for dim in shape.split(", "))


@pytest.mark.parametrize("name", ["tiny:falcon-h1", "tiny:zamba2"])
def test_hook_points_fire_once_in_every_unit_with_documented_shape(name):
    lm = load_model(name)
    reg, ids = lm.registry, _ids(2, 19)
    assert is_instrumented(lm.model)
    assert sum("ssm" in u for u in reg.units) == len([m for m in lm.model.modules() if hasattr(m, "_sensitivity_scan")])
    names = {(layer, h.name): hook_name(layer, h.name) for layer in range(reg.n_layers) for h in reg.hooks
             if reg.has(layer, h.name)}  # fmt: skip
    with capture(lm, names.values()) as acts:
        lm.model(ids, use_cache=False)
    dims = {**reg.dims, "B": 2, "L": 19}
    specs = {h.name: h for h in reg.hooks}
    for (_, point), full in names.items():
        assert len(acts[full]) == 1, full  # fired once: a shared module's hook points are per layer
        assert tuple(acts[full][0].shape) == _expected_shape(specs[point], dims), full
    if name == "tiny:zamba2":  # layer 0 is a Mamba-2 layer
        with pytest.raises(ValueError, match="attention units"):
            reg.hook_point(lm.model, 0, "q")
    keys = set(lm.model.state_dict())
    uninstrument(lm.model)  # back to the HF classes, no hook points or module hooks left
    assert not is_instrumented(lm.model) and set(lm.model.state_dict()) == keys
    assert not any(hasattr(m, "hook_points") or m._forward_pre_hooks or m._forward_hooks for m in lm.model.modules())


def test_falcon_h1_hooks_carry_the_mup_scaled_activations():
    lm = load_model("tiny:falcon-h1")
    reg, c = lm.registry, lm.model.config
    points = ["block_in", "in", "x", "z", "gated", "out_proj_in", "attn_in"]
    with capture(lm, [hook_name(2, p) for p in points]) as acts:
        lm.model(_ids(2, 19), use_cache=False)
    a = {p: acts[hook_name(2, p)][0] for p in points}
    block, mixer = reg.blocks(lm.model)[2], reg.mixer(lm.model, 2)
    normed = block.input_layernorm(a["block_in"])  # (B, L, D)
    torch.testing.assert_close(a["in"], normed * c.ssm_in_multiplier)
    torch.testing.assert_close(a["attn_in"], normed * c.attention_in_multiplier)
    for comp, mult in (("z", c.ssm_multipliers[0]), ("x", c.ssm_multipliers[1])):
        (w,) = reg.tensors(lm.model, 2, comp)
        torch.testing.assert_close(a[comp], F.linear(a["in"], w) * mult)
    torch.testing.assert_close(a["out_proj_in"], mixer.norm(a["gated"]))  # default: the norm after the gate
    assert (reg.embed_scale, reg.logit_scale) == (c.embedding_multiplier, c.lm_head_multiplier) == (2.0, 0.5)


@pytest.mark.parametrize("name,attn", [("tiny:falcon-h1", "sdpa"), ("tiny:zamba2", "sdpa"), ("tiny:zamba2", "eager")])
def test_layer_runner_loss_from_every_layer_equals_hf_nll(name, attn):
    lm = load_model(name, instrument=False)
    lm.model.set_attn_implementation(attn)
    instrument(lm.model)
    ids = _ids(5, 29)
    with torch.no_grad():
        logits = lm.model(ids, use_cache=False).logits  # (n, L, V)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    run = LayerRunner(lm, _windows(ids), batch_size=2)
    stream = run.stream()
    for layer, hidden in enumerate(stream):
        assert run.loss(hidden, layer)[0] == pytest.approx(nll, abs=1e-5), layer
    torch.testing.assert_close(run.logits(stream[-1]), logits, atol=1e-5, rtol=1e-5)
    reg = lm.registry
    for layer in range(reg.n_layers):  # capture on windows in another order: their own embeddings go with them
        rows = torch.tensor([4, 0, 3])
        acts = run.capture(layer, ["block_out"], stream[layer][rows], rows=rows)["block_out"]
        torch.testing.assert_close(torch.cat(acts), stream[layer + 1][rows])
    for layer in reg.embeds_layers:
        with pytest.raises(ValueError, match="input embeddings"):
            run.run(stream[layer][:2], layer)
    with torch.no_grad():
        torch.testing.assert_close(run.run(stream[1][2:4], 1, rows=slice(2, 4)), stream[-1][2:4])


def test_falcon_h1_registry_components_per_layer():
    lm = load_model("tiny:falcon-h1", instrument=False)
    reg, c = lm.registry, lm.model.config
    assert reg.arch == "falcon_h1" and reg.n_layers == 4 and reg.is_hybrid
    for layer in range(4):
        assert reg.layer_kind(layer) == "ssm+attention+mlp"
        assert reg.units[layer] == {"ssm": "mamba", "attention": "self_attn", "mlp": "feed_forward"}
        assert [comp.name for comp in reg.components_at(layer)] == [*SSM, "q", "k", "v", "o", "gate", "up", "down"]
        assert reg.sharing(layer, "q") == (layer,) and not reg.is_shared("q")
    assert reg.mixer_attr == "mamba"
    mixer = reg.mixer(lm.model, 1)
    rows = reg.packed_rows("in_proj.weight")
    assert [rows[n] for n in ("z", "x", "B", "C", "dt")] == [(0, 128), (128, 256), (256, 288), (288, 320), (320, 328)]
    assert rows["dt"][1] == mixer.in_proj.weight.shape[0] == mixer.mup_vector.shape[-1]
    for comp, mult in zip(("z", "x", "B", "C", "dt"), c.ssm_multipliers):  # the µP blocks line up with the rows
        assert (mixer.mup_vector[0, 0, slice(*rows[comp])] == mult).all()
    table = reg.table(lm.model)
    assert set(table.layer) == {0, 1, 2, 3} and (table["shape"] != "").all()
    assert "norm" not in build_registry(tiny_config("falcon_h1", mamba_rms_norm=False)).component_names
    biased = build_registry(tiny_config("falcon_h1", projectors_bias=True))
    assert [t.param for t in biased.component("out_proj").tensors] == ["out_proj.weight", "out_proj.bias"]
    assert [t.param for t in biased.component("x").tensors] == ["in_proj.weight"]


@pytest.mark.parametrize("overrides", [{}, CONFIGS[4][1]])
def test_zamba2_registry_units_and_shared_weights(overrides):
    config = tiny_config("zamba2", **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    reg = build_registry(config)
    hybrid = tuple(config.hybrid_layer_ids)
    assert reg.embeds_layers == hybrid and reg.block_args["embeds"] == "original_hidden_states"
    assert reg.dims["DA"] == 2 * reg.dims["D"]
    for layer in range(reg.n_layers):
        names = [comp.name for comp in reg.components_at(layer)]
        if layer in hybrid:
            assert reg.layer_kind(layer) == "ssm+attention+mlp"
            assert names == [*SSM, "q", "k", "v", "o", "gate", "up", "down"]
            assert reg.mixer(model, layer) is model.model.layers[layer].mamba_decoder.mamba
            assert reg.unit(model, layer, "attention") is model.model.layers[layer].shared_transformer.self_attn
        else:
            assert reg.layer_kind(layer) == "ssm" and names == list(SSM)
            assert reg.mixer(model, layer) is model.model.layers[layer].mamba
    # sharing() says exactly which layers hold the same tensors, checked against the model's storage
    for comp in reg.prunable_components:
        for a in reg.layers_with(comp):
            for b in reg.layers_with(comp):
                ptrs = [[x.data_ptr() for x in reg.tensors(model, i, comp)] for i in (a, b)]
                same = ptrs[0] == ptrs[1]
                assert same == (b in reg.sharing(a, comp)), (comp, a, b)
    blocks = {layer: hybrid.index(layer) % config.num_mem_blocks for layer in hybrid}
    assert reg.sharing(hybrid[0], "q") == tuple(h for h in hybrid if blocks[h] == blocks[hybrid[0]])
    assert reg.is_shared("q") and reg.is_shared("down") and not reg.is_shared("x")
    with pytest.raises(SpecError, match="no 'q'"):
        reg.sharing(2, "q")
    with pytest.raises(ValueError, match="mamba_decoder.mamba"):
        getattr(reg, "mixer_attr")  # noqa: B009
    # weight_sizes counts a shared tensor in every layer, or once with unique=True
    full, unique = reg.weight_sizes(model), reg.weight_sizes(model, unique=True)
    assert set(unique) <= set(full) and all(unique[k] == full[k] for k in unique)
    distinct = {x.data_ptr(): x.numel() for (layer, comp) in full for x in
                [t.get(reg.owner(model, layer, comp)) for t in reg.weights(comp)]}  # fmt: skip
    assert sum(unique.values()) == sum(distinct.values()) < sum(full.values())
    # gate_up_proj rows are [gate | up]: zeroing the gate rows (and the adapter's) zeroes the down projection's input
    layer, F_ = hybrid[0], reg.dims["F"]
    mlp = reg.unit(model, layer, "mlp")
    instrument(model)
    with torch.no_grad():
        for t in reg.tensors(model, layer, "gate"):
            t.zero_()
        if mlp.gate_up_proj.bias is not None:
            mlp.gate_up_proj.bias[:F_].zero_()
        for adapter in mlp.gate_up_proj_adapter_list:
            if not isinstance(adapter, torch.nn.Identity):
                adapter[1].weight[:F_].zero_()
    with capture(model, [hook_name(layer, "down_in")]) as acts:
        model(_ids(1, 11), use_cache=False)
    assert acts[hook_name(layer, "down_in")][0].abs().max().item() == 0.0

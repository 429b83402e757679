"""Structured pruning and greedy block removal on the hybrid families (Bamba, Granite 4, Nemotron-H, Jamba,
Falcon-H1, Zamba2): shrunk checkpoints reload in plain transformers with the in-memory model's logits, masking
equals shrinking, the greedy order matches an independent brute force on the HF forward, and bad requests name
what is allowed.

Shape legend: B batch, L sequence length, V vocabulary.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sensitivity.core import LayerRunner, build_registry, instrument, tiny_config, uninstrument
from sensitivity.core.loading import as_loaded
from sensitivity.data import Windows
from sensitivity.pruning import prune, prune_blocks, prune_structured
from sensitivity.pruning.blocks import layout_changes, periodic

HYBRIDS = ["bamba", "granitemoehybrid", "nemotron_h", "jamba", "falcon_h1", "zamba2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _build(arch: str, **overrides):
    """A tiny HF model whose parameters (zero biases, unit norms...) are all made non-trivial."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _model(arch: str, **overrides):
    return as_loaded(instrument(_build(arch, **overrides)))


@pytest.fixture(scope="module")
def windows():
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))  # (n, L)
    return Windows(ids=ids, seqlen=32, split="train", source="test", kind="calibration", seed=0, stride=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(7))  # (B, L)


@torch.no_grad()
def _logits(model, ids):
    return model(ids, use_cache=False).logits  # (B, L, V)


def _reload(lm, path):
    """Save ``lm``, reload it with plain transformers; returns (reloaded logits fn, the reloaded model)."""
    lm.model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _tiny_eps(model) -> None:
    """Every RMS norm's epsilon to 1e-12: masked heads (channels, states) then equal removed ones exactly."""
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-12


# --- SSM-structured pruners ----------------------------------------------------------------------------------

# (arch, unit, sparsity, score, config fields of the shrunk model)
SHRINK = [
    ("bamba", "state", 0.25, "taylor", {"mamba_d_state": 12}),
    ("bamba", "head", 0.5, "flap", {"mamba_n_heads": 4, "mamba_expand": 1, "mamba_proj_bias": True}),
    ("bamba", "headdim", 0.5, "magnitude", {"mamba_d_head": 8, "mamba_expand": 1}),
    ("granitemoehybrid", "state", 0.5, "magnitude", {"mamba_d_state": 8}),
    ("granitemoehybrid", "head", 0.5, "random", {"mamba_n_heads": 4, "mamba_expand": 1}),
    ("granitemoehybrid", "headdim", 0.5, "flap", {"mamba_d_head": 8, "mamba_proj_bias": True}),
    ("nemotron_h", "state", 0.25, "taylor", {"ssm_state_size": 12}),
    ("nemotron_h", "head", 0.25, "magnitude", {"mamba_num_heads": 6, "expand": 2}),  # 96 wide; expand not read
    ("nemotron_h", "headdim", 0.5, "taylor", {"mamba_head_dim": 8, "expand": 1}),
    ("jamba", "state", 0.25, "taylor", {"mamba_d_state": 6}),
    ("jamba", "state", 0.5, "magnitude", {"mamba_d_state": 4}),
    ("falcon_h1", "state", 0.25, "random", {"mamba_d_state": 12}),
    ("falcon_h1", "head", 0.25, "flap", {"mamba_n_heads": 6, "mamba_d_ssm": 96, "projectors_bias": True}),
    ("falcon_h1", "headdim", 0.25, "taylor", {"mamba_d_head": 12, "mamba_d_ssm": 96}),
    ("zamba2", "state", 0.25, "magnitude", {"mamba_d_state": 12}),
    ("zamba2", "head", 0.5, "taylor", {"n_mamba_heads": 4, "mamba_expand": 1, "mamba_headdim": 16}),
    ("zamba2", "headdim", 0.5, "flap", {"mamba_headdim": 8, "mamba_expand": 1, "add_bias_linear": True}),
]


@pytest.mark.parametrize("arch,unit,sparsity,score,config", SHRINK, ids=[f"{a}-{u}-{s}" for a, u, _, s, _ in SHRINK])
def test_shrink_reloads_in_plain_transformers_and_equals_mask(arch, unit, sparsity, score, config, windows, ids,
                                                              tmp_path):  # fmt: skip
    lm = _model(arch)
    reg = lm.registry
    other = {k: v.clone() for k, v in lm.model.state_dict().items()
             if not any(f".{i}." in k for i in range(reg.n_layers) if "ssm" in reg.units[i])}  # fmt: skip
    shrunk = prune_structured(lm, unit, sparsity, windows=windows, score=score, mode="shrink", show_progress=False)
    assert {k: getattr(lm.model.config, k) for k in config} == config
    assert shrunk.params_after < shrunk.params_before
    noted = "expand (not read by the model) stays 2: 96 channels are not a multiple of hidden_size 64"
    assert (noted in shrunk.mode_reason) == ((arch, unit) == ("nemotron_h", "head"))
    assert set(shrunk.removed) == {i for i in range(reg.n_layers) if "ssm" in reg.units[i]}
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in other.items() if "mamba.out_proj.bias" not in k)
    assert lm.registry.dims == build_registry(lm.model.config).dims
    instrumented = _logits(lm.model, ids)

    reloaded = _reload(lm, tmp_path)  # the plain HF forward, the HF config round trip
    uninstrument(lm.model)
    assert torch.allclose(_logits(reloaded, ids), _logits(lm.model, ids), atol=1e-5)
    assert torch.equal(_logits(instrument(reloaded), ids), instrumented)
    instrument(lm.model)

    masked_lm = _model(arch)
    masked = prune_structured(masked_lm, unit, sparsity, windows=windows, score=score, mode="mask",
                              show_progress=False)  # fmt: skip
    assert masked.removed == shrunk.removed and masked.params_after >= masked.params_before
    _tiny_eps(lm.model), _tiny_eps(masked_lm.model)
    # Block by block on the same residual stream masked equals shrunk to float32 rounding; through 4-5 blocks of
    # these noisy random weights the rounding grows to 1e-4 - 2e-4 in the logits (1.6e-4 on Zamba2 on one CPU,
    # under 1e-4 on another: the summation order of the CPU's kernels).
    shrunk_run, masked_run = LayerRunner(lm, windows), LayerRunner(masked_lm, windows)
    stream, embeds = shrunk_run.stream(), shrunk_run.embed(slice(0, len(windows)))  # (n, L, D) each
    with torch.no_grad():
        for layer in shrunk.removed:
            expected = shrunk_run.call(layer, stream[layer], embeds)  # (n, L, D)
            torch.testing.assert_close(masked_run.call(layer, stream[layer], embeds), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(masked_lm.model, ids), _logits(lm.model, ids), rtol=1e-3, atol=5e-4)
    json.dumps(shrunk.to_dict())


def test_integer_expand_families_mask_or_refuse_widths_hidden_size_does_not_divide(windows):
    lm = _model("bamba")
    result = prune_structured(lm, "head", 0.25, score="magnitude", show_progress=False)  # 6 heads: 96 channels
    assert result.mode == "mask" and "mamba_expand" in result.mode_reason and lm.model.config.mamba_n_heads == 8
    with pytest.raises(ValueError, match="n_mamba_heads\\*mamba_headdim = 96 is not a multiple of hidden_size 64, "
                       "so mamba_expand is not an integer; sparsities that shrink this model: 0.5;"):  # fmt: skip
        prune_structured(_model("zamba2"), "head", 0.25, score="magnitude", mode="shrink", show_progress=False)


def test_layers_option_and_per_layer_sparsity_prune_only_those_ssm_layers(ids):
    lm = _model("bamba")  # S A S S
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = prune_structured(lm, "state", 0.5, score="magnitude", layers=[3, 0], show_progress=False)
    assert result.mode == "mask" and "[8, 0, 8] differ" in result.mode_reason
    assert [len(result.removed[i]) for i in (0, 2, 3)] == [8, 0, 8]
    changed = {k.split(".")[2] for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"0", "3"}

    per_layer = prune_structured(_model("bamba"), "state", [0.25, 0.0, 0.5, 0.25], score="magnitude",
                                 show_progress=False)  # fmt: skip
    per_ssm = prune_structured(_model("bamba"), "state", [0.25, 0.5, 0.25], score="magnitude", show_progress=False)
    assert per_layer.removed == per_ssm.removed and [len(v) for v in per_ssm.removed.values()] == [4, 8, 4]


def test_structured_errors_name_the_layers_and_units_allowed(windows):
    bamba, nemotron, jamba = _model("bamba"), _model("nemotron_h"), _model("jamba")
    cases = [
        (bamba, ("state", 0.5), {"layers": [1]},
         "options.layers: layer 1 is an attention\\+mlp layer with no ssm unit; layers with one: 0, 2, 3"),
        (nemotron, ("head", 0.5), {"layers": [0, 2]},
         "options.layers: layer 2 is an mlp layer with no ssm unit; layers with one: 0, 4"),
        (nemotron, ("state", 0.5), {"layers": [7]}, "options.layers: 7 is out of range; allowed: 0..4"),
        (bamba, ("state", [0.5, 0.5, 0.5, 0.5]), {},
         "sparsity.1: 0.5 for layer 1, which holds no ssm unit; give 0 there or one value per pruned layer "
         "\\(0, 2, 3\\)"),
        (bamba, ("state", [0.5, 0.5]), {}, "2 values for a model of 4 layers; give one or one per layer or one per "
         "pruned SSM layer \\(3\\)"),
        (jamba, ("head", 0.5), {}, "pruning method 'head' does not apply to jamba models; it needs mamba2 or bamba or "
         "granitemoehybrid or nemotron_h or falcon_h1 or zamba2 \\(Mamba-2 mixers with heads\\); structured units "
         "for jamba: state$"),
        (jamba, ("headdim", 0.5), {}, "structured units for jamba: state$"),
    ]  # fmt: skip
    for lm, args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            prune_structured(lm, *args, score="magnitude", show_progress=False, **kwargs)
    with pytest.raises(ValueError, match="layer 1 is an attention\\+mlp layer with no ssm unit"):
        prune(bamba, "head", sparsity=0.5, windows=windows, layers="0,1", show_progress=False)


# --- greedy block removal ------------------------------------------------------------------------------------


def _skip(module, args, kwargs, output):
    """Forward hook making a block the identity (its output := its input), in its own output format."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.no_grad()
def _hf_loss(model, windows, edit=None) -> float:
    """Mean next-token NLL of the plain HF forward over every window position, optionally under ``edit``."""
    handles = edit(model) if edit is not None else []
    try:
        logits = model(windows.ids, use_cache=False).logits  # (n, L, V)
    finally:
        for h in handles:
            h.remove()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows.ids[:, 1:].flatten()).item()


def _without_block(layer):
    return lambda model: [model.model.layers[layer].register_forward_hook(_skip, with_kwargs=True)]


# Blocks the config can drop from the tiny models: Jamba (S A S A, attention and MoE at odd layers) cannot keep
# its layout periodic without layer 2; Zamba2's hybrid layers 1 and 3 hold its shared transformer block.
REMOVABLE = {"bamba": [0, 1, 2, 3], "granitemoehybrid": [0, 1, 2, 3], "nemotron_h": [0, 1, 2, 3, 4],
             "jamba": [0, 1, 3], "falcon_h1": [0, 1, 2, 3], "zamba2": [0, 2]}  # fmt: skip


@pytest.mark.parametrize("arch", HYBRIDS)
def test_greedy_block_removal_matches_brute_force_and_reloads(arch, windows, ids, tmp_path):
    lm = _model(arch)
    n_layers = lm.registry.n_layers
    result = prune(lm, "blocks", n_blocks=2, windows=windows, show_progress=False)
    record = result.manifest["structured"]

    plain = _build(arch)  # the same weights, plain HF forward: each block alone
    dense = _hf_loss(plain, windows)
    brute = {layer: _hf_loss(plain, windows, _without_block(layer)) - dense for layer in REMOVABLE[arch]}
    first = record["steps"][0]
    assert set(first["damages"]) == {str(layer) for layer in REMOVABLE[arch]}
    for layer, damage in brute.items():
        assert first["damages"][str(layer)] == pytest.approx(damage, abs=1e-4)
    assert record["removed"][0] == [min(brute, key=brute.get)]
    assert first["damage"] == pytest.approx(min(brute.values()), abs=1e-4)
    assert record["dense_loss"] == pytest.approx(dense, abs=1e-4)

    gone = [layer for (layer,) in record["removed"]]
    both = lambda model: [model.model.layers[i].register_forward_hook(_skip, with_kwargs=True) for i in gone]
    assert record["loss"] == pytest.approx(_hf_loss(plain, windows, both), abs=1e-4)
    assert lm.registry.n_layers == record["n_layers_after"] == n_layers - 2
    assert [lm.registry.units[j] for j in range(n_layers - 2)] == [
        build_registry(plain.config).units[i] for i in range(n_layers) if i not in gone]  # fmt: skip

    saved = result.save(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert reloaded.config.num_hidden_layers == n_layers - 2
    assert _hf_loss(reloaded, windows) == pytest.approx(record["loss"], abs=1e-4)  # hooks = real removal
    instrumented = _logits(lm.model, ids)
    assert torch.equal(_logits(instrument(reloaded), ids), instrumented)
    uninstrument(reloaded), uninstrument(lm.model)
    assert torch.allclose(_logits(reloaded, ids), _logits(lm.model, ids), atol=1e-5)
    json.loads((saved / "pruning_manifest.json").read_text())["structured"]["steps"][1]["damages"]


# (arch, unit): unit removal zeroes the output projection; Zamba2's shared attention goes from layers 1 and 3 at once
UNITS = [("bamba", "mlp"), ("granitemoehybrid", "attention"), ("nemotron_h", "ssm"), ("jamba", "mlp"),
         ("falcon_h1", "attention"), ("zamba2", "attention")]  # fmt: skip
OUT = {"ssm": ("mamba", "out_proj"), "attention": ("self_attn", "o_proj"), "mlp": ("feed_forward", "down_proj")}


def _zeroed(layers, unit, arch):
    """An edit zeroing the unit's output projection in ``layers`` of a plain HF model (restored afterwards)."""
    parent, proj = OUT[unit]
    parent = {"granitemoehybrid": {"mlp": "shared_mlp"}, "nemotron_h": {"ssm": "mixer"},
              "zamba2": {"attention": "shared_transformer.self_attn"}}.get(arch, {}).get(unit, parent)  # fmt: skip

    def edit(model):
        linears = [model.model.layers[i].get_submodule(f"{parent}.{proj}") for i in layers]
        saved = [lin.weight.detach().clone() for lin in linears]
        for lin in linears:
            lin.weight.data.zero_()

        class Restore:
            def remove(self_inner):
                for lin, w in zip(linears, saved):
                    lin.weight.data.copy_(w)

        return [Restore()]

    return edit


@pytest.mark.parametrize("arch,unit", UNITS)
def test_greedy_unit_removal_zeroes_the_output_projection(arch, unit, windows, ids, tmp_path):
    lm = _model(arch)
    config = lm.model.config.to_dict()
    result = prune_blocks(lm, 1, unit=unit, windows=windows, show_progress=False)
    plain = _build(arch)
    dense = _hf_loss(plain, windows)
    for label, damage in result.steps[0]["damages"].items():
        layers = [int(i) for i in label.split(",")]
        assert damage == pytest.approx(_hf_loss(plain, windows, _zeroed(layers, unit, arch)) - dense, abs=1e-4)
    if arch == "zamba2":
        assert result.removed == [[1, 3]] and len(result.zeroed) == 1  # one shared o_proj
    assert lm.model.config.to_dict() == config and result.n_layers_after == lm.registry.n_layers
    assert f"zero output projections ({OUT[unit][1]})" in result.saved_as
    assert result.zeroed and all(lm.model.get_parameter(name).abs().sum() == 0 for name in result.zeroed)
    reloaded = _reload(lm, tmp_path)
    assert _hf_loss(reloaded, windows) == pytest.approx(result.loss, abs=1e-4)
    uninstrument(lm.model)
    assert torch.allclose(_logits(reloaded, ids), _logits(lm.model, ids), atol=1e-5)


def test_blocks_by_fraction_and_cached_generation_after_removal(windows, ids):
    lm = _model("zamba2")
    result = prune(lm, "blocks", sparsity=0.5, windows=windows, show_progress=False)  # 1 of the 2 removable
    assert len(result.manifest["structured"]["removed"]) == 1 and lm.model.config.hybrid_layer_ids in ([0, 2], [1, 2])
    out = lm.model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)  # HF forward with its cache
    assert out[0, 6:].tolist() == _logits(lm.model, out[:, :-1])[0, 5:].argmax(-1).tolist()


def test_periodic_layouts():
    assert periodic([False, True, False, True]) == (2, 1)
    assert periodic([True, False, True]) == (2, 0)
    assert periodic([False, False, True]) == (3, 2)
    assert periodic([False, False]) == (3, 2)  # no such layer: an offset past the end
    assert periodic([False, True, True]) is None
    reg, config = build_registry(tiny_config("jamba")), tiny_config("jamba")
    assert layout_changes(reg, config, [0, 1, 2]) == {"num_hidden_layers": 3, "attn_layer_period": 2,
                                                      "attn_layer_offset": 1, "expert_layer_period": 2,
                                                      "expert_layer_offset": 1}  # fmt: skip
    with pytest.raises(ValueError, match="attention units at layers \\[1, 2\\], which jamba's attn_layer_period"):
        layout_changes(reg, config, [0, 1, 3])  # S A A


def test_block_removal_errors(windows):
    bamba, zamba, jamba = _model("bamba"), _model("zamba2"), _model("jamba")
    cases = [
        (bamba, {"n_blocks": 1, "unit": "attention", "layers": [0]},
         "options.layers: layer 0 is an ssm\\+mlp layer with no attention unit; layers with one: 1$"),
        (zamba, {"n_blocks": 1, "layers": [1]},
         "options.layers: layer 1's attention, mlp weights are shared with layers 1, 3 .* so zamba2 cannot save the "
         "model without it; removable blocks: 0, 2"),
        (jamba, {"n_blocks": 1, "layers": [2]}, "options.n_blocks: step 1 of 1: no removable candidate left \\(2: the "
         "kept blocks would hold attention units at layers \\[1, 2\\]"),
        (bamba, {"n_blocks": 4}, "options.n_blocks: 4 is more than the 3 removable blocks \\(one must stay\\)"),
        (bamba, {"n_blocks": 2, "unit": "attention"}, "2 is more than the 1 removable attention candidates: 1$"),
        (_model("mamba2"), {"n_blocks": 1, "unit": "attention"},
         "options.unit: mamba2 models hold no attention unit; their layers hold: ssm"),
        (bamba, {"n_blocks": 1, "sparsity": 0.5}, "options.n_blocks: give either a sparsity or n_blocks, not both"),
        (bamba, {}, "sparsity: blocks needs n_blocks or a sparsity"),
        (bamba, {"n_blocks": 1, "unit": "moe"}, "options.unit: 'moe' is invalid"),
        (bamba, {"n_blocks": 0}, "options.n_blocks: 0 is out of range"),
    ]  # fmt: skip
    for lm, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            prune(lm, "blocks", windows=windows, show_progress=False, **kwargs)
    with pytest.raises(ValueError, match="windows: blocks needs calibration windows"):
        prune(bamba, "blocks", n_blocks=1, show_progress=False)
    assert bamba.model.config.num_hidden_layers == 4 and zamba.registry.n_layers == 4  # nothing changed


@pytest.mark.parametrize("arch", ["mamba", "falcon_mamba", "mamba2"])
def test_greedy_block_removal_on_pure_ssm_models(arch, windows, ids, tmp_path):
    """On a pure SSM model a block is its mixer: the greedy order matches the plain HF forward with each block
    skipped, and the checkpoint loses the blocks."""
    lm = _model(arch, num_hidden_layers=4)
    result = prune(lm, "blocks", n_blocks=1, windows=windows, show_progress=False)
    record = result.manifest["structured"]
    plain = _build(arch, num_hidden_layers=4)
    dense = _hf_loss(plain, windows)
    skip = lambda layer: lambda model: [model.backbone.layers[layer].register_forward_hook(_skip, with_kwargs=True)]
    brute = {layer: _hf_loss(plain, windows, skip(layer)) - dense for layer in range(4)}
    for layer, damage in brute.items():
        assert record["steps"][0]["damages"][str(layer)] == pytest.approx(damage, abs=1e-4)
    assert record["removed"] == [[min(brute, key=brute.get)]]
    reloaded = AutoModelForCausalLM.from_pretrained(result.save(tmp_path / "pruned")).eval()
    assert reloaded.config.num_hidden_layers == lm.registry.n_layers == 3
    assert _hf_loss(reloaded, windows) == pytest.approx(record["loss"], abs=1e-4)

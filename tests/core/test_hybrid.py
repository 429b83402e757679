"""Hybrid families (Bamba, Granite 4, Nemotron-H, Jamba): the instrumented forward against transformers' own, the
hook points of every unit against independent computations, the per-layer registry, the layer runner, and
uninstrument.

Expectations are derived from the HF configs and modules, not from the registry: ``_kinds`` reads each layer's units
off the config, ``_dims`` its sizes, and the unit values are recomputed from the HF submodules.

Shape legend: B batch, L sequence length, D model width, V vocabulary.
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sensitivity.core import (
    LayerRunner,
    SpecError,
    build_registry,
    capture,
    hook_name,
    hooks,
    instrument,
    is_instrumented,
    load_model,
    tiny_config,
    uninstrument,
)
from sensitivity.core.loading import as_loaded
from sensitivity.data import Windows

pytestmark = pytest.mark.compat  # the compatibility subset (make test-latest)

PAD = 7  # left padding of the first sequence in the masked forwards

# Grouped B/C (n_groups 1 and 2), attention first and last, MoE on and off, in_proj/conv/attention biases, chunk
# sizes that do not divide the 37 tokens of the ``ids`` fixture.
CONFIGS = [
    pytest.param("bamba", {"mamba_n_groups": 1, "attn_layer_indices": [0]}, id="bamba-g1-attn0"),
    pytest.param("bamba", {"attn_layer_indices": [3], "mamba_proj_bias": True, "mamba_conv_bias": False,
                           "attention_bias": True, "mamba_chunk_size": 16}, id="bamba-g2-attn3-bias"),
    pytest.param("granitemoehybrid", {"layer_types": ["attention", "mamba", "mamba"], "num_local_experts": 0,
                                      "mamba_n_groups": 1, "position_embedding_type": "rope"},
                 id="granite-g1-attn0-dense-rope"),
    pytest.param("granitemoehybrid", {"layer_types": ["mamba", "mamba", "attention"], "mamba_proj_bias": True,
                                      "mamba_conv_bias": False, "attention_bias": True, "mamba_chunk_size": 16},
                 id="granite-g2-attn2-moe-bias"),
    pytest.param("nemotron_h", {"hybrid_override_pattern": "*M-M", "n_groups": 1}, id="nemotron-g1-attn0-dense"),
    pytest.param("nemotron_h", {"hybrid_override_pattern": "M-EM*", "use_bias": True, "use_conv_bias": False,
                                "chunk_size": 16}, id="nemotron-g2-attn4-moe-bias"),
    pytest.param("jamba", {"attn_layer_offset": 0, "attn_layer_period": 3, "num_experts": 1},
                 id="jamba-attn0+3-dense"),
    pytest.param("jamba", {"attn_layer_offset": 3, "attn_layer_period": 4, "mamba_proj_bias": True,
                           "mamba_conv_bias": False}, id="jamba-attn3-moe-bias"),
]  # fmt: skip
TINY = {"bamba": "tiny:bamba", "granitemoehybrid": "tiny:granitemoehybrid", "nemotron_h": "tiny:nemotron-h",
        "jamba": "tiny:jamba"}  # fmt: skip

# Hook points of each unit kind; the SSM ones differ between Mamba-2 and Mamba-1 (Jamba).
M2_POINTS = ("in", "x", "z", "conv_in", "conv", "u", "dt_raw", "dt", "B", "C", "A", "y", "gated", "out_proj_in", "out")
M1_POINTS = ("in", "x", "z", "conv", "u", "dt_low", "dt_raw", "dt", "B", "C", "A", "y", "gated", "out_proj_in", "out")
POINTS = {"attention": ("attn_in", "q", "k", "v", "o_in", "attn_out"), "mlp": ("mlp_in", "down_in", "mlp_out"),
          "moe": ("moe_in", "moe_out"), "block": ("block_in", "block_out")}  # fmt: skip
OUTPUTS = {"ssm": "out", "attention": "attn_out", "mlp": "mlp_out", "moe": "moe_out"}

# Components of each unit kind (Nemotron-H's MLP has no gate; Jamba's SSM is Mamba-1 with weighted Δ/B/C norms).
M2_COMPONENTS = ("z", "x", "B", "C", "dt", "conv1d", "A_log", "D", "norm", "out_proj")
M1_COMPONENTS = ("x", "z", "conv1d", "dt", "B", "C", "A_log", "D", "out_proj", "dt_norm", "B_norm", "C_norm")
# Weight matrices the default component set prunes, relative to the unit (MoE weights are not pruned).
UNPRUNED = {"A_log", "D", "norm", "dt_norm", "B_norm", "C_norm"}  # no weight matrix: never in weight_sizes
WEIGHTS = {"ssm2": ("in_proj.weight", "conv1d.weight", "out_proj.weight"),
           "ssm1": ("in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight"),
           "attention": ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"),
           "mlp": ("gate_proj.weight", "up_proj.weight", "down_proj.weight", "input_linear.weight",
                   "output_linear.weight")}  # fmt: skip

# Per family: the norm before the mixer, the norm before the feed-forward, the final norm.
NORMS = {"bamba": ("input_layernorm", "pre_ff_layernorm", "model.final_layernorm"),
         "granitemoehybrid": ("input_layernorm", "post_attention_layernorm", "model.norm"),
         "nemotron_h": ("norm", "norm", "model.norm_f"),
         "jamba": ("input_layernorm", "pre_ff_layernorm", "model.final_layernorm")}  # fmt: skip


def _model(arch: str, overrides: dict) -> torch.nn.Module:
    """A tiny HF model of ``arch`` with its SSM parameters, biases and norm weights moved off their initial values."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", ".D", "dt_bias", "_proj.bias", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def _kinds(config) -> list[set[str]]:
    """The unit kinds of every layer, read off the HF config."""
    arch = config.model_type
    if arch == "bamba":
        return [{"attention" if i in config.attn_layer_indices else "ssm", "mlp"}
                for i in range(config.num_hidden_layers)]  # fmt: skip
    if arch == "granitemoehybrid":
        moe = {"moe"} if config.num_local_experts > 0 else set()
        return [{"ssm" if t == "linear_attention" else "attention", "mlp"} | moe for t in config.layer_types]
    if arch == "nemotron_h":
        kind = {"linear_attention": "ssm", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
        return [{kind[t]} for t in config.layers_block_type]
    assert arch == "jamba"
    return [{"attention" if i % config.attn_layer_period == config.attn_layer_offset else "ssm",
             "moe" if config.num_experts > 1 and i % config.expert_layer_period == config.expert_layer_offset
             else "mlp"} for i in range(config.num_hidden_layers)]  # fmt: skip


def _dims(config) -> dict[str, int]:
    """Sizes by legend letter, read off the HF config."""
    c, D = config, config.hidden_size
    d = {"D": D, "AH": c.num_attention_heads, "KV": c.num_key_value_heads, "V": c.vocab_size}
    d["AP"] = getattr(c, "head_dim", None) or D // c.num_attention_heads
    if c.model_type == "jamba":
        d.update(ED=c.mamba_expand * D, N=c.mamba_d_state, R=c.mamba_dt_rank, F=c.intermediate_size, AP=D // d["AH"])
    elif c.model_type == "nemotron_h":
        d.update(H=c.mamba_num_heads, P=c.mamba_head_dim, N=c.ssm_state_size, G=c.n_groups, F=c.intermediate_size)
    else:
        granite = c.model_type == "granitemoehybrid"
        d.update(H=c.mamba_n_heads, P=c.mamba_d_head, N=c.mamba_d_state, G=c.mamba_n_groups,
                 F=c.shared_intermediate_size if granite else c.intermediate_size)  # fmt: skip
    if "H" in d:
        d["ED"] = d["H"] * d["P"]
    return d


def _points(config, kinds: set[str]) -> set[str]:
    ssm = M1_POINTS if config.model_type == "jamba" else M2_POINTS
    return set(POINTS["block"]).union(*(ssm if k == "ssm" else POINTS[k] for k in kinds))


def _shape(point: str, d: dict[str, int], mamba1: bool, B: int, L: int) -> tuple[int, ...]:
    """The shape hook point ``point`` must have."""
    ED, N = d["ED"], d["N"]
    if point == "A":
        return (ED, N) if mamba1 else (d["H"],)
    if mamba1:
        per = {"dt_low": d["R"], "dt_raw": ED, "dt": ED, "B": N, "C": N, "conv": ED}
    else:
        GN = d["G"] * N
        per = {"conv_in": ED + 2 * GN, "conv": ED + 2 * GN, "dt_raw": d["H"], "dt": d["H"], "B": (d["G"], N),
               "C": (d["G"], N)}  # fmt: skip
    per.update({p: ED for p in ("x", "z", "u", "y", "gated", "out_proj_in")})
    per.update(q=d["AH"] * d["AP"], o_in=d["AH"] * d["AP"], k=d["KV"] * d["AP"], v=d["KV"] * d["AP"], down_in=d["F"])
    last = per.get(point, d["D"])  # every other point (in, out, *_in, *_out, block_*) is (B, L, D)
    return (B, L, *last) if isinstance(last, tuple) else (B, L, last)


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, msg: str = "", absolute: bool = False) -> None:
    """Max abs difference within ``tol`` (``absolute``) or ``tol`` times the larger of 1 and the expected tensor's max
    abs value."""
    scale = 1.0 if absolute else max(1.0, expected.abs().max().item())
    assert got.shape == expected.shape, (msg, got.shape, expected.shape)
    diff = (got - expected).abs().max().item()
    assert diff <= tol * scale, f"{msg}: max abs diff {diff:.3g} > {tol:g} * {scale:.3g}"


def _listing(layers) -> str:
    """A regex matching exactly this comma-separated list of layers (not a prefix of a longer one)."""
    return rf"(?<![\d,] )(?<!\d){re.escape(', '.join(map(str, layers)))}(?![,\d])"


class _Recorder:
    """Forward hooks recording every SSM mixer's input, attention mask and output (removed on exit)."""

    def __init__(self, model, layers):
        self.model, self.layers, self.records, self.handles = model, layers, {}, []

    def __enter__(self):
        reg = build_registry(self.model.config)
        for layer in self.layers:

            def hook(module, args, kwargs, output, layer=layer):
                hidden = args[0] if args else kwargs["hidden_states"]
                self.records[layer] = (hidden.detach(), kwargs.get("attention_mask"), output.detach())

            self.handles.append(reg.mixer(self.model, layer).register_forward_hook(hook, with_kwargs=True))
        return self.records

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :PAD] = 0
    return mask


# 1. The instrumented forward against HF's: logits, each SSM mixer's output on the same input, gradients.


@pytest.mark.parametrize("scan", ["auto", "sequential"])
@pytest.mark.parametrize("arch,overrides", CONFIGS)
def test_instrumented_forward_matches_hf(arch, overrides, scan, ids):
    model = _model(arch, overrides)
    reg = build_registry(model.config)
    ssm_layers = [i for i, k in enumerate(_kinds(model.config)) if "ssm" in k]
    assert ssm_layers and len(ssm_layers) < reg.n_layers
    mask = _mask(ids)
    keep = mask.bool()  # (B, L): compare only the positions that are not padding
    expected, mixers = {}, {}
    with torch.no_grad():
        for masked in (False, True):
            with _Recorder(model, ssm_layers) as records:
                expected[masked] = model(ids, attention_mask=mask if masked else None, use_cache=False).logits
            mixers[masked] = records
    instrument(model, scan=scan)
    with torch.no_grad():
        for masked in (False, True):
            sel = keep if masked else torch.ones_like(keep)
            got = model(ids, attention_mask=mask if masked else None, use_cache=False).logits  # (B, L, V)
            _close(got[sel], expected[masked][sel], msg=f"logits (masked={masked})", absolute=True)
            for layer, (hidden, layer_mask, out) in mixers[masked].items():
                mixer = reg.mixer(model, layer)
                assert "hook_points" in mixer._modules
                out_ours = mixer(hidden, attention_mask=layer_mask)  # (B, L, D)
                assert out.abs().max() > 0.1  # the mixer output is not negligible: the comparison means something
                _close(out_ours[sel], out[sel], msg=f"mixer {layer} (masked={masked})")
    assert (expected[True][0, PAD:] - expected[False][0, PAD:]).abs().max() > 1e-4  # the padding is not ignored


@pytest.mark.parametrize("arch,overrides", CONFIGS)
def test_gradients_match_hf(arch, overrides, ids):
    hf = _model(arch, overrides)
    ours = instrument(copy.deepcopy(hf))
    grads = []
    for model in (hf, ours):
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("A_log" in n for n in grads[0]) and any("q_proj" in n for n in grads[0])
    for name, expected in grads[0].items():
        scale = max(expected.abs().max().item(), 1e-12)
        diff = (grads[1][name] - expected).abs().max().item()
        assert diff <= 1e-5 * scale, f"{name}: max abs diff {diff:.3g} > 1e-5 * {scale:.3g}"


# 3. Hook points: every one the registry lists fires once, with the right shape and the value its unit computes.


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` channels (partial rotary keeps the rest). (B, h, L, AP)."""
    rot, half = cos.shape[-1], cos.shape[-1] // 2
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    rotated = torch.cat([-t_rot[..., half:], t_rot[..., :half]], dim=-1)
    return torch.cat([t_rot * cos[:, None] + rotated * sin[:, None], t_pass], dim=-1)


def _attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary) -> torch.Tensor:
    """Causal grouped-query attention from the q, k, v projections. (B, L, ·) -> (B, L, AH·AP)."""
    bsz, L, _ = q.shape
    q, k, v = (t.view(bsz, L, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, AP)
    if rotary is not None:
        cos, sin = rotary(v, torch.arange(L)[None])  # (1, L, rotary dims)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, AH, L, AP)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, AH, L, L)
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, L, -1)  # (B, L, AH·AP)


def _down_in(mlp, x: torch.Tensor) -> torch.Tensor:
    """The input of an HF MLP's down projection: act(gate)·up, Granite's packed halves, or Nemotron-H's act(up)."""
    if hasattr(mlp, "input_linear"):
        gate, up = F.linear(x, mlp.input_linear.weight).chunk(2, dim=-1)
        return mlp.activation(gate) * up
    if hasattr(mlp, "gate_proj"):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return mlp.act_fn(mlp.up_proj(x))


def _down(mlp):
    return getattr(mlp, "output_linear", None) or mlp.down_proj


@pytest.mark.parametrize("arch,overrides", CONFIGS)
def test_every_hook_point_fires_with_the_value_of_its_unit(arch, overrides, ids):
    model = instrument(_model(arch, overrides))
    reg, cfg = build_registry(model.config), model.config
    kinds, d = _kinds(cfg), _dims(cfg)
    for layer, k in enumerate(kinds):
        assert {p for p in reg.hook_names if reg.has(layer, p)} == _points(cfg, k), layer
    names = [hook_name(i, p) for i in range(reg.n_layers) for p in reg.hook_names if reg.has(i, p)]
    with capture(model, names) as acts, torch.no_grad():
        logits = model(ids, use_cache=False).logits  # (B, L, V)
    assert all(len(v) == 1 for v in acts.values()), {n: len(v) for n, v in acts.items() if len(v) != 1}
    act = {name: v[0] for name, v in acts.items()}
    for name, value in act.items():
        point = name.split(".")[-1]
        assert tuple(value.shape) == _shape(point, d, arch == "jamba", *ids.shape), (name, value.shape)
    norm1, norm2, final = NORMS[arch]
    rm = getattr(cfg, "residual_multiplier", 1.0)
    rotary = getattr(model.model, "rotary_emb", None)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids) * getattr(cfg, "embedding_multiplier", 1.0)  # (B, L, D)
        _close(act["layers.0.block_in"], embeds, msg="block_in 0")
        for layer, k in enumerate(kinds):
            at = lambda p: act[hook_name(layer, p)]
            block = reg.blocks(model)[layer]
            if layer:
                _close(at("block_in"), act[hook_name(layer - 1, "block_out")], msg=f"block_in {layer}")
            # The mixer (SSM or attention) reads the first norm of the residual stream.
            mixer_in = getattr(block, norm1)(at("block_in"))  # (B, L, D)
            if "ssm" in k:
                mixer = reg.mixer(model, layer)
                _close(at("in"), mixer_in, msg=f"in {layer}")
                _close(at("out"), mixer.out_proj(at("out_proj_in")), msg=f"out {layer}")
            if "attention" in k:
                attn = reg.unit(model, layer, "attention")
                _close(at("attn_in"), mixer_in, msg=f"attn_in {layer}")
                for p in ("q", "k", "v"):
                    _close(at(p), getattr(attn, f"{p}_proj")(at("attn_in")), msg=f"{p} {layer}")
                _close(at("o_in"), _attention(attn, at("q"), at("k"), at("v"), rotary), msg=f"o_in {layer}")
                _close(at("attn_out"), attn.o_proj(at("o_in")), msg=f"attn_out {layer}")
            # The feed-forward (MLP, MoE) reads the second norm of the stream after the mixer (Nemotron-H: one unit).
            first = next((OUTPUTS[u] for u in ("ssm", "attention") if u in k), None)
            mid = at("block_in") + rm * at(first) if first else at("block_in")
            ff_in = getattr(block, norm2)(mid)  # (B, L, D)
            if "mlp" in k:
                mlp = reg.unit(model, layer, "mlp")
                _close(at("mlp_in"), ff_in, msg=f"mlp_in {layer}")
                _close(at("down_in"), _down_in(mlp, at("mlp_in")), msg=f"down_in {layer}")
                _close(at("mlp_out"), _down(mlp)(at("down_in")), msg=f"mlp_out {layer}")
                _close(at("mlp_out"), mlp(at("mlp_in")), msg=f"mlp_out {layer} (module)")
            if "moe" in k:
                _close(at("moe_in"), ff_in, msg=f"moe_in {layer}")
                _close(at("moe_out"), reg.unit(model, layer, "moe")(at("moe_in")), msg=f"moe_out {layer}")
            units = sum(at(OUTPUTS[u]) for u in k)  # (B, L, D)
            _close(at("block_out") - at("block_in"), rm * units, msg=f"block_out - block_in {layer}")
        last = act[hook_name(reg.n_layers - 1, "block_out")]
        head = model.get_output_embeddings()(model.get_submodule(final)(last))  # (B, L, V)
        _close(logits, head / getattr(cfg, "logits_scaling", 1.0), msg="logits from the last block_out")


@pytest.mark.parametrize("arch,overrides", CONFIGS)
def test_hook_point_in_a_layer_without_its_unit_names_the_layers_with_one(arch, overrides):
    model = instrument(_model(arch, overrides))
    reg, kinds = build_registry(model.config), _kinds(model.config)
    checked = set()
    for point in reg.hook_names:
        having = [i for i in range(reg.n_layers) if point in _points(model.config, kinds[i])]
        for layer in set(range(reg.n_layers)) - set(having):
            with pytest.raises(ValueError) as err:
                with hooks(model, {hook_name(layer, point): lambda t: None}):
                    pass
            assert repr(point) in str(err.value) and re.search(_listing(having), str(err.value)), str(err.value)
            checked.add(point)
    assert {"dt", "q", "attn_out"} <= checked  # both SSM and attention points are asked for in the wrong layers
    assert not any(m._forward_hooks for m in model.modules() if type(m).__name__ == "HookPoint")


@pytest.mark.parametrize("arch,overrides", CONFIGS)
def test_hooks_replace_unit_outputs_and_inputs(arch, overrides, ids):
    model = instrument(_model(arch, overrides))
    reg, cfg, kinds = build_registry(model.config), model.config, _kinds(model.config)
    zero = {hook_name(i, OUTPUTS[u]): torch.zeros_like for i, k in enumerate(kinds) for u in k}
    with hooks(model, zero), torch.no_grad():
        logits = model(ids, use_cache=False).logits  # (B, L, V)
        # Every unit removed: embeddings -> final norm -> LM head.
        embeds = model.get_input_embeddings()(ids) * getattr(cfg, "embedding_multiplier", 1.0)  # (B, L, D)
        expected = model.get_output_embeddings()(model.get_submodule(NORMS[arch][2])(embeds))
    _close(logits, expected / getattr(cfg, "logits_scaling", 1.0), msg="logits without any unit")
    # Inputs too: zeroing o_proj's and the down projection's inputs leaves their biases (or zeros).
    attn = next(i for i, k in enumerate(kinds) if "attention" in k)
    mlp_layers = [i for i, k in enumerate(kinds) if "mlp" in k]
    replace = {hook_name(attn, "o_in"): torch.zeros_like}
    replace.update({hook_name(i, "down_in"): torch.zeros_like for i in mlp_layers})
    outs = [hook_name(attn, "attn_out")] + [hook_name(i, "mlp_out") for i in mlp_layers]
    with capture(model, outs) as acts, hooks(model, replace), torch.no_grad():
        model(ids, use_cache=False)
    for name, module in [(outs[0], reg.unit(model, attn, "attention").o_proj)] + [
        (hook_name(i, "mlp_out"), _down(reg.unit(model, i, "mlp"))) for i in mlp_layers
    ]:
        got = acts[name][0]  # (B, L, D)
        bias = module.bias if module.bias is not None else torch.zeros(())
        torch.testing.assert_close(got, bias.expand_as(got), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", list(TINY))
def test_deepcopy_of_an_instrumented_model_fires_its_own_hook_points(arch, ids):
    model = instrument(_model(arch, {}))
    twin = copy.deepcopy(model)  # as JobSpec.fresh and the explainer do before pruning
    reg = build_registry(model.config)
    names = [hook_name(i, p) for i in range(reg.n_layers) for p in ("block_out", *map(OUTPUTS.get, reg.units[i]))]
    fired = {"model": [], "twin": []}
    record = lambda who, name: lambda t: fired[who].append(name)
    with hooks(model, {n: record("model", n) for n in names}, check_fired=False):
        with hooks(twin, {n: record("twin", n) for n in names}, check_fired=False), torch.no_grad():
            twin(ids, use_cache=False)
    assert fired["model"] == [] and sorted(fired["twin"]) == sorted(names), fired


# 4. The registry per layer.


def _expected_components(arch: str, kind: str) -> set[str]:
    """The components a unit of ``kind`` holds in ``arch``."""
    if kind == "ssm":
        return set(M1_COMPONENTS if arch == "jamba" else M2_COMPONENTS)
    if kind == "attention":
        return {"q", "k", "v", "o"}
    if kind == "mlp":
        return {"up", "down"} if arch == "nemotron_h" else {"gate", "up", "down"}
    # Nemotron-H's MoE also holds shared experts, an MLP every token goes through.
    return {"router", "experts"} | ({"shared_experts"} if arch == "nemotron_h" else set())


def _check_tensors_cover_units(model, reg, layer: int) -> None:
    """Every tensor of every component of ``layer`` is a parameter of its unit, and the row slices of each unit
    parameter cover it whole, without overlap."""
    comps = reg.components_at(layer)
    for c in comps:
        assert reg.has(layer, c.name) and layer in reg.layers_with(c.name)
        owner = reg.unit(model, layer, c.unit)
        params = {id(p) for p in owner.parameters()}
        for t, view in zip(c.tensors, reg.tensors(model, layer, c.name)):
            param = t.parameter(owner)
            assert id(param) in params, (layer, c.name, t.describe(), "not a parameter of the unit")
            assert view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr(), (layer, c.name)
    for kind in reg.units[layer]:
        for pname, p in reg.unit(model, layer, kind).named_parameters():
            rows = sorted(t.rows or (0, p.shape[0]) for c in comps if c.unit == kind for t in c.tensors
                          if t.param == pname)  # fmt: skip
            assert rows, (layer, kind, pname, "in no component")
            assert rows[0][0] == 0 and rows[-1][1] == p.shape[0], (layer, pname, rows)
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:])), (layer, pname, rows)


@pytest.mark.parametrize("arch,overrides", CONFIGS)
def test_components_at_each_layer_follow_its_units(arch, overrides):
    model = _model(arch, overrides)
    reg, kinds = build_registry(model.config), _kinds(model.config)
    assert reg.is_hybrid
    for layer, k in enumerate(kinds):
        comps = reg.components_at(layer)
        assert {c.unit for c in comps} == k, layer
        for kind in k:
            assert {c.name for c in comps if c.unit == kind} == _expected_components(arch, kind), (layer, kind)
        _check_tensors_cover_units(model, reg, layer)
    table = reg.table(model)
    assert set(table.layer) == set(range(reg.n_layers))


@pytest.mark.parametrize(
    "arch,overrides",
    [
        pytest.param("bamba", {"mlp_bias": True}, id="bamba-mlp-bias"),
        pytest.param("nemotron_h", {"mlp_bias": True}, id="nemotron-mlp-bias"),
        pytest.param("nemotron_h", {"attention_bias": True}, id="nemotron-attention-bias"),
        pytest.param("nemotron_h", {"moe_latent_size": 16}, id="nemotron-moe-latent", marks=pytest.mark.xfail(
            strict=True, reason="the MoE's fc1/fc2_latent_proj weights belong to no component")),
    ],
)  # fmt: skip
def test_components_cover_units_under_bias_options(arch, overrides):
    model = _model(arch, overrides)
    reg = build_registry(model.config)
    for layer in range(reg.n_layers):
        _check_tensors_cover_units(model, reg, layer)
    reg.table(model)


def test_nemotron_h_units_one_per_block():
    model = _model("nemotron_h", {})  # "M*-EM"
    reg = build_registry(model.config)
    names = [{c.name for c in reg.components_at(i)} for i in range(reg.n_layers)]
    assert names[1] == {"q", "k", "v", "o"}
    assert names[2] == {"up", "down"}  # ReLU² MLP: no gate
    assert names[3] == {"router", "experts", "shared_experts"}
    assert names[0] == names[4] == set(M2_COMPONENTS)
    assert reg.layers_with("q") == (1,) and reg.layers_with("up") == (2,) and reg.layers_with("z") == (0, 4)
    assert [reg.layer_kind(i) for i in range(5)] == ["ssm", "attention", "mlp", "moe", "ssm"]


@pytest.mark.parametrize("arch", list(TINY))
def test_mlp_components_are_the_rows_the_mlp_multiplies(arch):
    model = _model(arch, {})
    reg, kinds = build_registry(model.config), _kinds(model.config)
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(2))  # (B, L, D)
    layers = [i for i, k in enumerate(kinds) if "mlp" in k]
    assert layers
    for layer in layers:
        mlp = reg.unit(model, layer, "mlp")
        up, down = (reg.tensors(model, layer, n)[0] for n in ("up", "down"))
        act = getattr(mlp, "activation", None) or mlp.act_fn
        if arch == "nemotron_h":
            assert "gate" not in reg.component_names
            hidden = act(x @ up.T)
        else:
            gate = reg.tensors(model, layer, "gate")[0]
            hidden = act(x @ gate.T) * (x @ up.T)  # (B, L, F)
        if arch == "granitemoehybrid":  # [gate | up] packed in input_linear
            F_ = model.config.shared_intermediate_size
            assert [t.rows for n in ("gate", "up") for t in reg.component(n).tensors] == [(0, F_), (F_, 2 * F_)]
            assert gate.data_ptr() == mlp.input_linear.weight.data_ptr()
            assert up.data_ptr() == mlp.input_linear.weight[F_:].data_ptr()
            assert gate.shape == up.shape == (F_, model.config.hidden_size)
        with torch.no_grad():
            _close(hidden @ down.T, mlp(x), msg=f"MLP {layer}")


@pytest.mark.parametrize("arch,overrides", CONFIGS)
def test_mixer_of_a_layer_without_ssm_raises_naming_the_ssm_layers(arch, overrides):
    model = _model(arch, overrides)
    reg, kinds = build_registry(model.config), _kinds(model.config)
    ssm = [i for i, k in enumerate(kinds) if "ssm" in k]
    for layer in (i for i, k in enumerate(kinds) if "ssm" not in k):
        with pytest.raises(SpecError, match=_listing(ssm)):
            reg.mixer(model, layer)
        with pytest.raises(SpecError, match=_listing(ssm)):
            reg.tensors(model, layer, "z")
    for layer in (i for i, k in enumerate(kinds) if "attention" not in k):
        with pytest.raises(SpecError, match=_listing([i for i, k in enumerate(kinds) if "attention" in k])):
            reg.unit(model, layer, "attention")


@pytest.mark.parametrize("arch,overrides", CONFIGS)
def test_weight_sizes_list_only_existing_pairs_and_count_the_weights(arch, overrides):
    model = _model(arch, overrides)
    reg, kinds = build_registry(model.config), _kinds(model.config)
    sizes = reg.weight_sizes(model)
    assert all(reg.has(layer, name) for layer, name in sizes)
    for layer, k in enumerate(kinds):
        expected = 0  # entries of the SSM, attention and MLP weight matrices of this layer
        for kind in k - {"moe"}:
            unit = reg.unit(model, layer, kind)
            names = WEIGHTS[("ssm1" if arch == "jamba" else "ssm2") if kind == "ssm" else kind]
            expected += sum(unit.get_parameter(n).numel() for n in names if hasattr(unit, n.split(".")[0]))
        got = sum(v for (i, name), v in sizes.items() if i == layer and reg.component(name).unit != "moe")
        assert got == expected, (layer, got, expected)
        listed = {n for i, n in sizes if i == layer and reg.component(n).unit != "moe"}
        assert listed == {c for kind in k - {"moe"} for c in _expected_components(arch, kind)} - UNPRUNED, layer
    expected = {}  # only q (attention layers) and up (MLP layers) when asked for those
    for i, k in enumerate(kinds):
        if "attention" in k:
            expected[(i, "q")] = reg.unit(model, i, "attention").q_proj.weight.numel()
        if "mlp" in k:
            mlp = reg.unit(model, i, "mlp")
            expected[(i, "up")] = (
                mlp.up_proj.weight.numel()
                if hasattr(mlp, "up_proj")
                else mlp.input_linear.weight[: mlp.input_linear.weight.shape[0] // 2].numel()
            )
    assert reg.weight_sizes(model, ["q", "up"]) == expected


@pytest.mark.parametrize("arch,overrides", [pytest.param(a, {}, id=f"{a}-tiny") for a in TINY] + CONFIGS)
def test_layer_runner_loss_from_every_layer_equals_hf_loss(arch, overrides):
    if not overrides:
        lm = load_model(TINY[arch])
    else:
        lm = as_loaded(instrument(_model(arch, overrides)))
    ids = torch.randint(0, 256, (3, 29), generator=torch.Generator().manual_seed(3))  # (n, L)
    windows = Windows(ids=ids, seqlen=29, split="test", source="random", kind="eval", seed=None, stride=29)
    run = LayerRunner(lm, windows, batch_size=2)
    stream = run.stream()
    assert len(stream) == lm.registry.n_layers + 1
    with torch.no_grad():
        expected = lm.model(ids, labels=ids, use_cache=False).loss.item()
    for k, hidden in enumerate(stream):
        nll, _ = run.loss(hidden, k)
        assert abs(nll - expected) <= 1e-5 * max(1.0, expected), (k, nll, expected)
    _, kl = run.loss(stream[0], 0, reference=run.logprobs(stream[-1]))
    assert abs(kl) <= 1e-6


# 5. uninstrument.


@pytest.mark.parametrize("arch,overrides", CONFIGS)
def test_uninstrument_restores_hf_classes_and_removes_every_hook(arch, overrides, ids):
    model = _model(arch, overrides)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    types = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    instrument(model)
    assert is_instrumented(model) and list(model.state_dict()) == keys
    reg = build_registry(model.config)
    with torch.no_grad(), capture(model, [hook_name(i, "block_out") for i in range(reg.n_layers)]):
        _close(model(ids, use_cache=False).logits, expected, msg="instrumented")
    uninstrument(model)
    assert not is_instrumented(model) and list(model.state_dict()) == keys
    assert {n: type(m) for n, m in model.named_modules()} == types
    leftover = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not leftover, leftover
    assert not [n for n, m in model.named_modules() if any(a.startswith("_sensitivity") for a in vars(m))]
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, expected)
    instrument(model, scan="sequential")  # and it instruments again
    with torch.no_grad():
        _close(model(ids, use_cache=False).logits, expected, msg="instrumented again")
    assert list(model.state_dict()) == keys

"""Instrumented, hookable mixer forwards for Mamba-1, FalconMamba and Mamba-2 (pure PyTorch).

transformers' CPU path reads ``conv1d.weight`` and ``dt_proj.weight`` directly, so hooks on those modules never
fire, and its Mamba-1 scan has a backward that is quadratic in the sequence length. :func:`instrument` swaps each
mixer's class for a subclass whose forward

* calls every submodule (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``norm``, ``out_proj``) as a module,
* passes every canonical activation through a named :class:`HookPoint` (see ``Registry.hooks``), and
* runs an exact scan (:mod:`sensitivity.core.scan`) whose backward is linear in the sequence length.

The HF mixer classes are never imported by name (transformers renames and regenerates its modeling files between
minor releases): each mixer is taken from where the registry says its layer holds it, and its subclass is derived
from whatever class it has. It matches the HF forward to 1e-5 in float32. Hook points hold no parameters, so
``state_dict`` keys do not change. With a generation cache the HF forward runs unchanged (hook points do not fire
then).

Hybrid families (Bamba, Granite 4, Nemotron-H, Jamba): their SSM mixers get the same instrumented forward (Jamba's
is Mamba-1 with weighted Δ/B/C norms); their attention, MLP and MoE units and every block keep the HF forward and
gain hook points through module hooks that route the unit's input and output (and the inputs of ``o_proj`` and the
MLP's down projection, the outputs of ``q_proj``, ``k_proj``, ``v_proj``) through :class:`HookPoint` modules.

Falcon-H1's mixer runs the Mamba-2 forward with its µP multipliers (``ssm_in_multiplier`` on the input of
``in_proj``, the ``mup_vector`` on its output rows) and its optional gated norm (none without ``mamba_rms_norm``;
``norm(y)·silu(z)`` with ``mamba_norm_before_gate``). Zamba2's mixers (``mamba`` and the hybrid layers'
``mamba_decoder.mamba``) are plain Mamba-2; each hybrid layer's view of the shared transformer (its own
``self_attn`` and ``feed_forward`` modules, holding the shared tensors) gets its own hook points.

Shape legend: B batch, L sequence length, D model width, ED inner channels, N state size, R Δ rank, H heads,
P head dim, G B/C groups.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .registry import _M1_HOOKS, _M2_HOOKS, ARCHITECTURES, Registry, build_registry
from .scan import selective_scan_chunked, selective_scan_ref, ssd_scan

__all__ = ["GroupedRMSNormGated", "HookPoint", "SCANS", "hf_forward", "hf_norm_is_grouped", "instrument",
           "is_instrumented", "kernels_available", "uninstrument"]

logger = logging.getLogger(__name__)

SCANS = ("auto", "chunked", "sequential")
# Mamba-1 under "auto": the step-by-step scan is faster on CPU up to this length, the chunked one beyond it
# (measured on 2 cores: 0.25 vs 0.41 s at 8x256, 0.43 vs 0.23 s at 1x2048, ED=512, N=16, forward+backward).
AUTO_CHUNKED_MIN_LEN = 1024


class HookPoint(nn.Identity):
    """Identity module marking one named activation; forward hooks on it may read or replace the activation.

    Attributes:
        name: The hook point's name (a :class:`~sensitivity.core.registry.HookSpec` name, e.g. ``"dt"``).
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def extra_repr(self) -> str:
        """The hook point's name, shown in the module's repr."""
        return self.name


class GroupedRMSNormGated(nn.Module):
    """Mamba-2's gated RMS norm, normalised per B/C group of ``group_size`` channels as the reference does.

    transformers 5.0-5.22 normalise over all ED channels instead (their gated norm has no ``group_size``), which
    changes every number of a model with ``n_groups > 1``. :func:`instrument` gives each Mamba-2 mixer's ``norm`` a
    subclass of its own class with this forward (same ``weight`` parameter, same ``state_dict``), so the
    instrumented forward computes the grouped norm whatever transformers is installed.

    Attributes:
        group_size: Channels per group, ``ED / G`` (set by :func:`instrument` where transformers has none).
        variance_epsilon: The epsilon added to the mean square, from the HF norm.
    """

    group_size: int
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``weight * rmsnorm(hidden_states * silu(gate))``, the RMS taken per group; ``(B, L, ED)`` in and out."""
        dtype = hidden_states.dtype
        h = hidden_states.float()  # (B, L, ED)
        if gate is not None:
            h = h * F.silu(gate.float())
        groups = h.view(*h.shape[:-1], -1, self.group_size)  # (B, L, G, ED/G)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * groups.view(h.shape).to(dtype)  # (B, L, ED)


def hf_norm_is_grouped(norm: nn.Module, groups: int) -> bool:
    """Whether transformers' own forward of a Mamba-2 gated norm normalises per group (5.23 and later).

    Args:
        norm: A Mamba-2 mixer's ``norm`` (instrumented or not: the HF class's forward is the one tested).
        groups: The model's B/C groups (``Registry.dims["G"]``).

    Returns:
        True when each group of ``ED / groups`` channels is normalised on its own (always true for one group).
    """
    probe = copy.deepcopy(norm)
    probe.__class__ = _BASES.get(type(norm), type(norm))
    width = probe.weight.numel()
    x = torch.ones(1, width)  # (1, ED): the first group at scale 1, the others at scale 10
    x[:, width // groups :] = 10.0
    with torch.no_grad():
        probe.weight.fill_(1.0)
        return torch.allclose(probe(x).float(), torch.ones_like(x), atol=1e-3)


def _mask(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions, as HF does before in_proj and after the convolution."""
    if attention_mask is None:
        return hidden
    return (hidden * attention_mask[:, :, None]).to(hidden.dtype)  # (B, L, ·)


def _unpack(packed: torch.Tensor, rows: dict[str, tuple[int, int]], names: tuple[str, ...]) -> list[torch.Tensor]:
    """Split a packed projection's output channels by the registry's row ranges. (B, L, ·) -> [(B, L, ·)]."""
    return [packed[..., rows[n][0] : rows[n][1]] for n in names]


def _causal_conv(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv1d through the module (so its hooks fire), then SiLU. (B, L, C) -> (B, L, C)."""
    L = x.shape[1]
    out = mixer.conv1d(x.transpose(1, 2).to(mixer.conv1d.weight.dtype))[..., :L]  # (B, C, L)
    return mixer.act(out).transpose(1, 2).to(x.dtype)  # (B, L, C)


def _mamba1_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
    hp, dtype, rows = self.hook_points, hidden_states.dtype, self._sensitivity_rows
    # 1. Input projection into the x and gate branches (row ranges from the registry).
    hidden_states = hp["in"](_mask(hidden_states, attention_mask))  # (B, L, D)
    x, z = _unpack(self.in_proj(hidden_states), rows["in_proj.weight"], ("x", "z"))  # (B, L, ED) each
    x, z = hp["x"](x), hp["z"](z)
    # 2. Causal convolution.
    conv = hp["conv"](_mask(_causal_conv(self, x), attention_mask))  # (B, L, ED)
    u = hp["u"](conv)  # (B, L, ED)
    # 3. Input-dependent Δ, B, C.
    dt_low, B, C = _unpack(self.x_proj(u), rows["x_proj.weight"], ("dt", "B", "C"))  # (B, L, R), (B, L, N) x2
    if self._sensitivity_bc_norms:  # FalconMamba's and Jamba's RMS norms on Δ's input, B and C
        dt_low, B, C = self.dt_layernorm(dt_low), self.b_layernorm(B), self.c_layernorm(C)
    dt_low = hp["dt_low"](dt_low)  # (B, L, R)
    dt_raw = hp["dt_raw"](self.dt_proj(dt_low))  # (B, L, ED)
    dt = hp["dt"](F.softplus(dt_raw.float()))  # (B, L, ED)
    B, C = hp["B"](B), hp["C"](C)  # (B, L, N)
    A = hp["A"](-torch.exp(self.A_log.float()))  # (ED, N)
    # 4. Selective scan plus the D skip term, then the gate.
    mode = self._sensitivity_scan
    chunked = mode == "chunked" or (mode == "auto" and u.shape[1] >= AUTO_CHUNKED_MIN_LEN)
    scan = selective_scan_chunked if chunked else selective_scan_ref
    y = hp["y"](scan(u, dt, A, B, C) + u.float() * self.D.float())  # (B, L, ED)
    gated = hp["gated"](y * F.silu(z.float()))  # (B, L, ED)
    # 5. Output projection.
    return hp["out"](self.out_proj(hp["out_proj_in"](gated).to(dtype)))  # (B, L, D)


def _mamba2_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
    hp, dtype, rows = self.hook_points, hidden_states.dtype, self._sensitivity_rows
    bsz, L, _ = hidden_states.shape
    ED, H, P, G, N = self.intermediate_size, self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
    mup = self._sensitivity_multipliers  # Falcon-H1's mixer: µP multipliers around in_proj, a configurable gated norm
    # 1. Input projection into [z | x | B | C | dt] (row ranges from the registry).
    hidden_states = _mask(hidden_states, attention_mask)  # (B, L, D)
    if mup:
        hidden_states = hidden_states * self.ssm_in_multiplier
    hidden_states = hp["in"](hidden_states)  # (B, L, D)
    projected = self.in_proj(hidden_states)  # (B, L, 2ED+2GN+H)
    if mup:
        projected = projected * self.mup_vector  # one multiplier per row block of [z | x | B | C | dt]
    z, x, B_in, C_in, dt_in = _unpack(projected, rows["in_proj.weight"], ("z", "x", "B", "C", "dt"))
    x, z = hp["x"](x), hp["z"](z)  # (B, L, ED)
    # 2. Causal convolution over [x | B | C].
    conv = _causal_conv(self, hp["conv_in"](torch.cat([x, B_in, C_in], dim=-1)))  # (B, L, ED+2GN)
    conv = hp["conv"](_mask(conv, attention_mask))
    u, B, C = conv.split([ED, G * N, G * N], dim=-1)
    u = hp["u"](u)  # (B, L, ED)
    B, C = hp["B"](B.reshape(bsz, L, G, N)), hp["C"](C.reshape(bsz, L, G, N))  # (B, L, G, N)
    # 3. Δ with its bias, softplus and the time-step limit; per-head decay.
    dt_raw = hp["dt_raw"](dt_in + self.dt_bias.to(dt_in.dtype))  # (B, L, H)
    dt = hp["dt"](torch.clamp(F.softplus(dt_raw.float()), *self.time_step_limit))  # (B, L, H)
    A = hp["A"](-torch.exp(self.A_log.float()))  # (H,)
    # 4. Scan plus the D skip term.
    u_heads = u.reshape(bsz, L, H, P).float()  # (B, L, H, P)
    if self._sensitivity_scan == "sequential":
        y = _mamba2_sequential(u_heads, dt, A, B, C)
    else:
        y = ssd_scan(u_heads, dt, A, B, C, chunk_size=self.chunk_size)  # (B, L, H, P)
    y = hp["y"]((y + self.D.float()[:, None] * u_heads).reshape(bsz, L, ED))  # (B, L, ED)
    # 5. Gate, grouped RMS norm, output projection.
    if mup:
        normed = _falcon_h1_gate(self, y, z)  # (B, L, ED)
    else:
        gated = hp["gated"](y * F.silu(z.float()))  # (B, L, ED)
        normed = hp["out_proj_in"](self.norm(gated))  # (B, L, ED)
    return hp["out"](self.out_proj(normed.to(dtype)))  # (B, L, D)


def _falcon_h1_gate(self: nn.Module, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Falcon-H1's gate and optional grouped RMS norm, as its HF forward orders them. (B, L, ED) x2 -> (B, L, ED).

    Without ``mamba_rms_norm``: ``y·silu(z)``; with it: ``norm(y·silu(z))``, or ``norm(y)·silu(z)`` when the norm
    comes before the gate (``norm_before_gate``). The norm module is called without its gate, so the product
    with the gate always passes through the ``gated`` hook point.
    """
    hp = self.hook_points
    if not self.mamba_rms_norm:
        return hp["out_proj_in"](hp["gated"](y * F.silu(z)))  # (B, L, ED)
    if self.norm.norm_before_gate:
        return hp["out_proj_in"](hp["gated"](self.norm(y) * F.silu(z.float())))  # (B, L, ED)
    return hp["out_proj_in"](self.norm(hp["gated"](y * F.silu(z.float()))))  # (B, L, ED)


def _mamba2_sequential(x, dt, A, B, C) -> torch.Tensor:
    """Mamba-2 through the per-channel reference scan (for cross-checks). Shapes as in ``ssd_scan``."""
    bsz, L, H, P = x.shape
    rep = H // B.shape[2]
    per_channel = lambda t: t.repeat_interleave(rep, dim=2).repeat_interleave(P, dim=2)  # (B, L, ED, N)  # noqa: E731
    A_ch = A.repeat_interleave(P)[:, None].expand(H * P, B.shape[-1])  # (ED, N)
    y = selective_scan_ref(
        x.reshape(bsz, L, H * P), dt.repeat_interleave(P, dim=2), A_ch, per_channel(B), per_channel(C)
    )
    return y.reshape(bsz, L, H, P)


_warned_cache_in_training = False


def _warn_cache_in_training() -> None:
    global _warned_cache_in_training
    _warned_cache_in_training = True
    logger.warning("an instrumented mixer was called with a generation cache in training mode (transformers 5.25 "
                   "builds one unless the forward is given use_cache=False): the HF forward runs and no hook point "
                   "fires; pass use_cache=False")


class _InstrumentedMixin:
    """Routes cache-free forwards through the instrumented path."""

    _sensitivity_forward = None

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if cache is not None or kwargs.get("cache_params") is not None:
            if self.training and not _warned_cache_in_training:
                _warn_cache_in_training()
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        return type(self)._sensitivity_forward(self, hidden_states, attention_mask)


_FORWARDS = {"mamba1": (_mamba1_forward, _M1_HOOKS), "mamba2": (_mamba2_forward, _M2_HOOKS)}
_DERIVED: dict[tuple[type, type], type] = {}  # (mixin, HF class) -> the subclass instrument() gives modules
_BASES: dict[type, type] = {}  # that subclass -> the HF class


def _derived(mixin: type, base: type, attrs: dict | None = None) -> type:
    """The subclass of HF class ``base`` with ``mixin`` in front, made once per class and named in this module (so a
    model holding it pickles and deep-copies). HF classes are found on the model, never imported by name: their
    modules are renamed and regenerated between transformers releases."""
    if (mixin, base) not in _DERIVED:
        name = f"{'Instrumented' if mixin is _InstrumentedMixin else 'Grouped'}{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, **(attrs or {})})
        globals()[name] = cls
        _DERIVED[mixin, base], _BASES[cls] = cls, base
    return _DERIVED[mixin, base]


def _ssm_mixers(model: nn.Module, registry: Registry) -> list[nn.Module]:
    """Every SSM mixer of ``model``, found where the registry says each layer holds it."""
    return [registry.unit(model, layer, "ssm") for layer in range(registry.n_layers) if "ssm" in registry.units[layer]]


def _instrumented_mixers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _InstrumentedMixin)]


# Where the hook points of the other units sit: point -> (submodule or "" for the unit itself, "in" or "out").
_UNIT_WIRING = {
    "attention": {"attn_in": ("", "in"), "q": ("q_proj", "out"), "k": ("k_proj", "out"), "v": ("v_proj", "out"),
                  "o_in": ("o_proj", "in"), "attn_out": ("o_proj", "out")},
    "mlp": {"mlp_in": ("", "in"), "down_in": (("down_proj", "output_linear"), "in"), "mlp_out": ("", "out")},
    "moe": {"moe_in": ("", "in"), "moe_out": ("", "out")},
    "block": {"block_in": ("", "in"), "block_out": ("", "out")},
}  # fmt: skip


def _route_input(module: nn.Module, args, kwargs):
    """Forward pre-hook passing a module's first input (positional or ``hidden_states=``) through its input point.

    The point is looked up on the module (not held by a closure), so a deep copy of the model routes through the
    copy's own hook points."""
    point = module.__dict__["_sensitivity_in"]
    if args:
        return (point(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": point(kwargs["hidden_states"])}


def _route_output(module: nn.Module, args, output):
    """Forward hook passing a module's output (or the first element of a tuple output) through its output point."""
    point = module.__dict__["_sensitivity_out"]
    if isinstance(output, tuple):
        return (point(output[0]), *output[1:])
    return point(output)


def _attach_unit_points(owner: nn.Module, kind: str) -> None:
    """Give ``owner`` (an attention, MLP or MoE unit, or a block) its hook points and the module hooks routing
    activations through them."""
    if "hook_points" in owner._modules:
        return
    wiring = _UNIT_WIRING[kind]
    owner.hook_points = nn.ModuleDict({name: HookPoint(name) for name in wiring})
    for name, (where, side) in wiring.items():
        names = where if isinstance(where, tuple) else (where,)
        target = next((owner.get_submodule(n) for n in names if n == "" or hasattr(owner, n)), None)
        if target is None:
            raise ValueError(f"{type(owner).__name__} has none of {', '.join(names)} for hook point {name!r}")
        # a plain attribute, not a registered submodule: the point stays listed once, under owner.hook_points
        target.__dict__[f"_sensitivity_{side}"] = owner.hook_points[name]
        if side == "in":
            target.register_forward_pre_hook(_route_input, with_kwargs=True)
        else:
            target.register_forward_hook(_route_output)


def _detach_unit_points(module: nn.Module) -> None:
    """Remove the routing hooks and hook points :func:`_attach_unit_points` gave ``module`` (or its targets)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_route_input, _route_output)]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    module.__dict__.pop("_sensitivity_in", None)
    module.__dict__.pop("_sensitivity_out", None)
    if isinstance(module._modules.get("hook_points"), nn.ModuleDict) and not isinstance(
            module, _InstrumentedMixin):  # fmt: skip
        del module.hook_points


def _unit_owners(model: nn.Module, registry: Registry) -> list[tuple[nn.Module, str]]:
    """(module, kind) of every non-SSM unit and, on hybrids, every block."""
    owners = []
    for layer in range(registry.n_layers):
        for kind in registry.units[layer]:
            if kind != "ssm":
                owners.append((registry.unit(model, layer, kind), kind))
        if registry.is_hybrid:
            owners.append((registry.blocks(model)[layer], "block"))
    return owners


def instrument(model: nn.Module, scan: str = "auto") -> nn.Module:
    """Give every Mamba mixer of ``model`` the instrumented forward and its hook points (in place).

    Args:
        model: A HF causal LM of one of the registry's ``ARCHITECTURES`` (any wrapper holding their mixers).
        scan: ``"auto"`` (Mamba-1: the step-by-step scan below ``AUTO_CHUNKED_MIN_LEN`` tokens, the chunked
            scan from there on; Mamba-2: the SSD chunked scan), ``"chunked"`` (always chunked / SSD) or
            ``"sequential"`` (always step by step; on Mamba-2 a slow cross-check). All are exact.

    Returns:
        The same model. Each mixer gains a ``hook_points`` ``ModuleDict`` of :class:`HookPoint`; each Mamba-2
        mixer's gated norm becomes a :class:`GroupedRMSNormGated` (per-group, whatever transformers is installed).

    Raises:
        ValueError: If ``scan`` is unknown or the model has no Mamba mixer.
    """
    if scan not in SCANS:
        raise ValueError(f"unknown scan {scan!r}; allowed: {', '.join(SCANS)}")
    config = getattr(model, "config", None)
    registry = build_registry(config) if config is not None else None
    mixers = _ssm_mixers(model, registry) if registry is not None else []
    if not mixers:
        raise ValueError(f"{type(model).__name__} has no Mamba mixer to instrument")
    rows = {p: registry.packed_rows(p) for p in ("in_proj.weight", "x_proj.weight")}
    forward, specs = _FORWARDS[registry.ssm_style]
    for owner, kind in _unit_owners(model, registry):
        _attach_unit_points(owner, kind)
    for mixer in mixers:
        base = _BASES.get(type(mixer), type(mixer))
        mixer.__class__ = _derived(_InstrumentedMixin, base, {"_sensitivity_forward": forward})
        if "hook_points" not in mixer._modules:
            mixer.hook_points = nn.ModuleDict({h.name: HookPoint(h.name) for h in specs})
        mixer._sensitivity_scan = scan
        mixer._sensitivity_rows = rows
        mixer._sensitivity_multipliers = registry.ssm_multipliers
        mixer._sensitivity_bc_norms = "dt_norm" in registry.component_names
        norm = getattr(mixer, "norm", None)
        if registry.regroup_norm and not isinstance(norm, GroupedRMSNormGated):  # the grouped gated norm
            norm._sensitivity_own_group_size = not hasattr(norm, "group_size")  # transformers < 5.23 has none
            norm.__class__ = _derived(GroupedRMSNormGated, type(norm))
            norm.group_size = registry.dims["ED"] // registry.dims["G"]
    return model


def uninstrument(model: nn.Module) -> nn.Module:
    """Undo :func:`instrument` in place: restore the HF mixer classes and drop the hook points."""
    for module in list(model.modules()):
        _detach_unit_points(module)
    for mixer in _instrumented_mixers(model):
        mixer.__class__ = _BASES[type(mixer)]
        del mixer.hook_points
        for attr in ("scan", "rows", "multipliers", "bc_norms"):
            delattr(mixer, f"_sensitivity_{attr}")
        norm = getattr(mixer, "norm", None)
        if isinstance(norm, GroupedRMSNormGated):
            norm.__class__ = _BASES[type(norm)]
            if norm.__dict__.pop("_sensitivity_own_group_size"):
                del norm.group_size
    return model


def kernels_available(device: torch.device) -> bool:
    """Whether the mamba-ssm and causal-conv1d CUDA kernels can run the HF mixers on ``device`` (found installed; they
    are imported by transformers only when they run)."""
    import importlib.util

    return device.type == "cuda" and all(importlib.util.find_spec(m) is not None
                                         for m in ("mamba_ssm", "causal_conv1d"))  # fmt: skip


@contextmanager
def hf_forward(model: nn.Module) -> Iterator[None]:
    """Run the HF mixer forwards inside a ``with`` block (on CUDA with mamba-ssm and causal-conv1d installed: their
    fused kernels); no hook point fires. The instrumented forwards come back on exit."""
    swapped = [(m, type(m)) for m in _instrumented_mixers(model)]
    for mixer, cls in swapped:
        mixer.__class__ = _BASES[cls]
    try:
        yield
    finally:
        for mixer, cls in swapped:
            mixer.__class__ = cls


def is_instrumented(model: nn.Module) -> bool:
    """True when every SSM mixer of ``model`` runs the instrumented forward."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in ARCHITECTURES:
        return False
    mixers = _ssm_mixers(model, build_registry(config))
    return bool(mixers) and all(isinstance(m, _InstrumentedMixin) for m in mixers)

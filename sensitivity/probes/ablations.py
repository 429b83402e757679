"""Ablations of one component of one mixer layer: what each kind does, and a context manager that applies it.

Every ablation is local to one layer: a replacement at one of its hook points, a temporary edit of its
weights (restored on exit), or a temporary swap of one of its submodules. The table (``ablation_table()``):

=============  ==========================  ==================================  ================================
component      zero                        mean / resample                     bypass
=============  ==========================  ==================================  ================================
x, z, B, C     activation -> 0             activation -> calibration mean per  z: no gating, ``gated = y``
                                           channel / the same activation of
                                           another window
dt             Δ -> 0 (state frozen,       mean: ``dt_raw`` (before softplus)  Δ -> its calibration mean per
               ``y = D·u``)                -> calibration mean; resample: Δ    channel (input-independent Δ)
conv1d         weights and bias -> 0       conv output (after SiLU)            identity kernel, bias 0: each
                                                                               channel passes its current token
A_log          weights -> 0 (A = -1)       -                                   every entry -> the layer's mean
                                                                               decay rate, ``log mean exp(A_log)``
D              weights -> 0                -                                   D -> 0 (the skip term removed;
                                                                               same numbers as ``zero``)
norm (M2)      weight -> 0                 out_proj input                      no normalisation (identity)
out_proj       weights -> 0                mixer output                        -
dt_norm,       -                           -                                   norm skipped (identity)
B_norm, C_norm
=============  ==========================  ==================================  ================================

``magnitude`` and ``wanda`` prune the component's 2-D weight rows (and conv1d's taps) to the probe's sparsity by
``|W|`` or by WANDA's ``|W_ij| * ||X_j||_2`` (input norms over the calibration windows), comparing within each
output row as WANDA does; conv1d is depthwise (one input channel per row), so it is compared per tensor instead.
Biases and 1-D parameters are never sparsified. Whole units (kind ``remove``): ``mixer`` (the block keeps only its
residual), ``head`` ``h`` of a Mamba-2 layer (its ``P`` channels of the out_proj input set to 0, which is what
masking its out_proj columns does; the gated norm still sees the head) and ``state`` ``n`` (index ``n`` of B and
C set to 0 in every group, so that state never fills or is read).

Hybrids add the attention, MLP and MoE components and units:

=============  ==========================  ==================================  ================================
component      zero                        mean / resample                     remove (units)
=============  ==========================  ==================================  ================================
q, k           weights -> 0 (uniform       q / k activation                    ``attention``: its output -> 0
               attention over the past)
v, o           weights -> 0 (the           v activation / attention output     ``attn_head`` ``h``: its channels
               attention outputs 0)                                            of the o_proj input -> 0
gate, up,      weights -> 0 (the MLP       down: MLP output                    ``mlp``: its output -> 0
down           outputs 0)
router,        weights -> 0 (uniform       -                                   ``moe``: its output -> 0;
experts        routing / experts output 0)                                     ``expert`` ``e``: its weights -> 0
(block)        -                           -                                   ``block``: the block is skipped
                                                                               (output = input), Mamba-Shedder
=============  ==========================  ==================================  ================================

``magnitude`` and ``wanda`` also apply to ``q, k, v, o, gate, up, down``. A probe only runs in the layers holding
its component or unit (``mixer``, ``head`` and ``state`` in SSM layers, ``attention`` and ``attn_head`` in attention
layers...); ``block`` runs in every layer of a hybrid.

Shape legend: B batch, L sequence length, D model width, ED inner channels, N state size, H heads, P head dim,
G B/C groups, K conv kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..core.hooks import hook_name, hooks
from ..core.masks import unstructured_mask
from ..core.registry import Registry
from ..core.removal import removal_hooks
from ..core.scores import wanda_score
from ..core.spec import SpecError
from .options import KINDS

__all__ = ["KINDS", "UNITS", "UNIT_OF", "Probe", "ablation_table", "applicable", "present"]

UNITS = ("mixer", "head", "state", "attention", "attn_head", "mlp", "moe", "expert", "block")
"""Whole-unit probes (kind ``remove``); ``head`` exists on Mamba-2 mixers only, the others on the layers holding
their unit (:data:`UNIT_OF`)."""
UNIT_OF = {"mixer": "ssm", "head": "ssm", "state": "ssm", "attention": "attention", "attn_head": "attention",
           "mlp": "mlp", "moe": "moe", "expert": "moe", "block": None}  # fmt: skip
"""Whole-unit probe -> the unit kind a layer must hold for it (None: every layer)."""


def present(registry: Registry, layer: int, component: str) -> bool:
    """Whether ``layer`` holds ``component`` (a registry component or a whole unit of :data:`UNITS`)."""
    if component in UNIT_OF:
        unit = UNIT_OF[component]
        if component == "head" and "H" not in registry.dims:
            return False
        if component == "block":
            return registry.is_hybrid
        return unit in registry.units[layer]
    return component in registry.component_names and registry.has(layer, component)


def exists(registry: Registry, component: str) -> bool:
    """Whether some layer of ``registry``'s model holds ``component``."""
    return any(present(registry, layer, component) for layer in range(registry.n_layers))

# (component, kind) -> what it does. Components absent from an architecture's registry are skipped.
_DOC = {
    ("x", "zero"): "x branch activation -> 0",
    ("z", "zero"): "gate activation -> 0 (silu(0) = 0: the mixer outputs 0)",
    ("B", "zero"): "B -> 0 (no input reaches the state; y = D*u)",
    ("C", "zero"): "C -> 0 (the state is never read; y = D*u)",
    ("dt", "zero"): "Δ -> 0 (the state never updates; y = D*u)",
    ("conv1d", "zero"): "conv1d weights and bias -> 0",
    ("A_log", "zero"): "A_log -> 0 (every decay rate A = -1)",
    ("D", "zero"): "D -> 0",
    ("norm", "zero"): "norm weight -> 0 (the mixer outputs 0)",
    ("out_proj", "zero"): "out_proj weights -> 0 (the mixer outputs 0)",
    ("z", "bypass"): "no gating: gated = y",
    ("dt", "bypass"): "Δ -> its calibration mean per channel (input-independent Δ)",
    ("conv1d", "bypass"): "identity kernel, bias 0 (each channel passes its current token)",
    ("A_log", "bypass"): "A_log -> log of the layer's mean decay rate exp(A_log)",
    ("D", "bypass"): "D -> 0 (skip term removed)",
    ("norm", "bypass"): "gated RMS norm -> identity",
    ("dt_norm", "bypass"): "weightless RMS norm on the Δ input -> identity",
    ("B_norm", "bypass"): "weightless RMS norm on B -> identity",
    ("C_norm", "bypass"): "weightless RMS norm on C -> identity",
    ("mixer", "remove"): "mixer output -> 0 (block = residual)",
    ("head", "remove"): "head h's channels of the out_proj input -> 0",
    ("state", "remove"): "state index n of B and C -> 0",
    ("q", "zero"): "q_proj weights -> 0 (uniform attention over the past)",
    ("k", "zero"): "k_proj weights -> 0 (uniform attention over the past)",
    ("v", "zero"): "v_proj weights -> 0 (the attention outputs 0)",
    ("o", "zero"): "o_proj weights -> 0 (the attention outputs 0)",
    ("gate", "zero"): "gate weights -> 0 (the MLP outputs 0)",
    ("up", "zero"): "up weights -> 0 (the MLP outputs 0)",
    ("down", "zero"): "down weights -> 0 (the MLP outputs 0)",
    ("router", "zero"): "router weights -> 0 (uniform router logits)",
    ("experts", "zero"): "every expert's weights -> 0 (the routed experts output 0)",
    ("shared_experts", "zero"): "the shared experts' weights -> 0",
    ("attention", "remove"): "attention output -> 0",
    ("attn_head", "remove"): "attention head h's channels of the o_proj input -> 0",
    ("mlp", "remove"): "MLP output -> 0",
    ("moe", "remove"): "MoE output -> 0",
    ("expert", "remove"): "expert e's weights -> 0 (the tokens routed to it get nothing from it)",
    ("block", "remove"): "the whole block skipped: its output = its input",
}
# mean / resample act on the component's own hook point (the registry's ``Component.hook``); dt's mean acts on
# dt_raw, before the softplus
_ACTIVATIONS = ("x", "z", "B", "C", "dt", "conv1d", "norm", "out_proj", "q", "k", "v", "o", "down")
for _c in _ACTIVATIONS:  # {hook}: filled in from the registry by ablation_table
    _DOC[(_c, "mean")] = ("dt_raw" if _c == "dt" else "{hook}") + " activation -> its calibration mean per channel"
    _DOC[(_c, "resample")] = "{hook} activation -> the same activation on another window"
_SPARSIFIABLE = ("x", "z", "B", "C", "dt", "conv1d", "out_proj", "q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Probe:
    """One ablation: ``kind`` (a name in :data:`KINDS`) applied to ``component`` of ``layer``; ``index`` names a
    head or state of a unit probe, ``sparsity`` the level of a sparsify kind (``magnitude``, ``wanda``).

    Attributes:
        layer: The layer (block index) ablated.
        component: A registry component name, or a whole unit of :data:`UNITS`.
        kind: The ablation kind, a name in :data:`KINDS`.
        index: The head, attention head, expert or state a unit probe (``head``, ``attn_head``, ``expert``,
            ``state``) removes; None otherwise.
        sparsity: The sparsity of a sparsify kind, in (0, 1); None otherwise.
    """

    layer: int
    component: str
    kind: str
    index: int | None = None
    sparsity: float | None = None

    @property
    def key(self) -> tuple:
        """Identity used to resume: (layer, component, index or -1, kind, sparsity or -1)."""
        return (self.layer, self.component, -1 if self.index is None else self.index, self.kind,
                -1.0 if self.sparsity is None else self.sparsity)  # fmt: skip


def applicable(registry: Registry, component: str, kind: str) -> bool:
    """Whether ``kind`` (a name in :data:`KINDS`) applies to ``component`` of ``registry``'s architecture."""
    return KINDS[kind].info["applies"](registry, component)


def ablation_table(registry: Registry) -> pd.DataFrame:
    """One row per (component, kind) that applies to ``registry``'s architecture, with what it does."""
    rows = []
    for comp in (*registry.component_names, *UNITS):
        if not exists(registry, comp):
            continue
        for kind in KINDS:
            if not applicable(registry, comp, kind):
                continue
            entry = KINDS[kind]
            if entry.info.get("sparsify"):
                score = "|W|" if kind == "magnitude" else "|W_ij| * ||X_j||_2"
                what = f"weights pruned to the probe's sparsity by {score}, " + (
                    "per tensor" if comp == "conv1d" else "per output row"
                )
                label = kind
            else:
                hook = registry.component(comp).hook if comp in registry.component_names else ""
                what = _DOC[(comp, kind)].format(hook=hook) if (comp, kind) in _DOC else entry.description
                label = kind
            rows.append({"component": comp, "kind": label, "ablation": what})
    return pd.DataFrame(rows)


@dataclass
class Context:
    """What ablations read besides the model: calibration statistics and, for ``resample``, source activations.

    Attributes:
        means: Hook name -> calibration mean per channel.
        input_l2: Hook name -> WANDA's input norm ``||X_j||`` per channel over the calibration windows
            (:func:`sensitivity.core.scores.input_norm`).
        source: Hook name -> the activation of the other windows, set per batch by the sweep.
    """

    means: dict[str, torch.Tensor]
    input_l2: dict[str, torch.Tensor]
    source: dict[str, torch.Tensor] | None = None


def _mean_point(registry: Registry, component: str) -> str:
    return "dt_raw" if component == "dt" else registry.component(component).hook


def needed_points(registry: Registry, probe: Probe) -> tuple[str, ...]:
    """Hook points whose calibration statistics ``probe`` reads (means for mean/bypass, input norms for WANDA)."""
    return KINDS[probe.kind].info.get("points", lambda reg, p: ())(registry, probe)


def resample_point(registry: Registry, probe: Probe) -> str | None:
    """The hook point a ``resample`` probe takes from another window."""
    return registry.component(probe.component).hook if KINDS[probe.kind].info.get("resample") else None


@contextmanager
def ablate(model: nn.Module, registry: Registry, probe: Probe, ctx: Context) -> Iterator[None]:
    """Apply ``probe`` to ``model`` (an instrumented HF model) for the duration of a ``with`` block.

    Weight edits are undone and hooks and module swaps removed on exit, even when the body raises.
    """
    if not applicable(registry, probe.component, probe.kind):
        raise SpecError(f"kind {probe.kind!r} does not apply to {probe.component!r}; see ablation_table()", "kinds")
    with KINDS[probe.kind].fn(model, registry, probe, ctx):
        yield


# ---- the kinds ----------------------------------------------------------------------------------------------


def _has(kind: str):
    """``applies`` of a built-in kind: the (component, kind) pairs of the table above."""
    return lambda registry, comp: comp in registry.component_names and (comp, kind) in _DOC


def _name(probe: Probe, point: str) -> str:
    return hook_name(probe.layer, point)


@KINDS.implement("zero", applies=_has("zero"))
@contextmanager
def _zero(model, registry, probe, ctx):
    comp = probe.component
    if comp in ("x", "z", "B", "C", "dt"):  # activations; the rest (attention, MLP, MoE too): weights -> 0
        with hooks(model, {_name(probe, registry.component(comp).hook): torch.zeros_like}):
            yield
    else:
        with _edit(registry, model, probe.layer, comp, lambda w: torch.zeros_like(w)):
            yield


@KINDS.implement("mean", applies=_has("mean"), points=lambda reg, p: (_mean_point(reg, p.component),))
@contextmanager
def _mean(model, registry, probe, ctx):
    point = _name(probe, _mean_point(registry, probe.component))
    mean = ctx.means[point]
    with hooks(model, {point: lambda t: mean.to(t.dtype).expand_as(t)}):
        yield


@KINDS.implement("resample", applies=_has("resample"))
@contextmanager
def _resample(model, registry, probe, ctx):
    point = _name(probe, resample_point(registry, probe))
    with hooks(model, {point: lambda t: ctx.source[point].to(t.dtype)}):
        yield


@KINDS.implement("bypass", applies=_has("bypass"), points=lambda reg, p: ("dt",) if p.component == "dt" else ())
def _bypass_kind(model, registry, probe, ctx):
    return _bypass(model, registry, probe, ctx)


def _sparsify_kind(method: str) -> None:
    def points(registry: Registry, probe: Probe) -> tuple[str, ...]:
        if method != "wanda":
            return ()
        return tuple(registry.input_hook(t.param) for t in registry.weights(probe.component))

    KINDS.implement(method, points=points,
                    applies=lambda registry, comp: comp in registry.component_names and comp in _SPARSIFIABLE,
                    )(lambda model, registry, probe, ctx: _sparsify(model, registry, probe, ctx, method))  # fmt: skip


_sparsify_kind("magnitude")
_sparsify_kind("wanda")


@KINDS.implement("remove", applies=lambda registry, comp: comp in UNITS and exists(registry, comp))
def _remove(model, registry, probe, ctx):
    if probe.component == "expert":  # expert e of the fused expert weights (E, ·, ·): its slice along dim 0 -> 0
        owner = registry.owner(model, probe.layer, "experts")
        views = [t.get(owner)[probe.index] for t in registry.component("experts").tensors]
        return _edit(registry, model, probe.layer, "experts", torch.zeros_like, tensors=views)
    return hooks(model, _remove_hooks(registry, probe))


_WHOLE = {"mixer": "ssm", "attention": "attention", "mlp": "mlp", "moe": "moe", "block": "block"}
"""Probe component -> what :func:`~sensitivity.core.removal.removal_hooks` removes."""


def _remove_hooks(registry: Registry, probe: Probe) -> dict[str, Callable]:
    layer, i = probe.layer, probe.index
    if probe.component in _WHOLE:  # a whole unit or block: the hooks the pruning stage's block removal uses
        return removal_hooks(registry, layer, _WHOLE[probe.component])
    if probe.component in ("head", "attn_head"):
        H, P = (registry.dims["H"], registry.dims["P"]) if probe.component == "head" else (
            registry.dims["AH"], registry.dims["AP"])  # fmt: skip

        def drop_head(t: torch.Tensor) -> torch.Tensor:  # (B, L, ED) or (B, L, AH·AP)
            t = t.clone().view(*t.shape[:2], H, P)  # (B, L, H, P)
            t[:, :, i] = 0
            return t.view(*t.shape[:2], H * P)

        return {hook_name(layer, "out_proj_in" if probe.component == "head" else "o_in"): drop_head}

    def drop_state(t: torch.Tensor) -> torch.Tensor:  # (B, L, N) or (B, L, G, N)
        t = t.clone()
        t[..., i] = 0
        return t

    return {hook_name(layer, "B"): drop_state, hook_name(layer, "C"): drop_state}


@contextmanager
def _edit(registry: Registry, model: nn.Module, layer: int, component: str, fn, tensors=None) -> Iterator[None]:
    """Replace each of the component's tensors ``t`` by ``fn(t)`` in place; restore the originals on exit.

    Tensors shared with other layers (``Registry.sharing``: Zamba2's shared transformer) hold the edit only while
    ``layer``'s unit runs (a pre-hook writes it, a hook undoes it), so the probe ablates that layer alone, whether
    the sweep starts at ``layer`` or at an earlier layer using the same tensors."""
    views = registry.tensors(model, layer, component) if tensors is None else tensors
    saved = [v.detach().clone() for v in views]
    with torch.no_grad():
        edited = [fn(v).to(v.dtype) for v in views]

    def put(values) -> None:
        with torch.no_grad():
            for v, value in zip(views, values):
                v.copy_(value)

    if len(registry.sharing(layer, component)) == 1:
        put(edited)
        try:
            yield
        finally:
            put(saved)
        return
    owner = registry.owner(model, layer, component)
    handles = [owner.register_forward_pre_hook(lambda module, args: put(edited)),
               owner.register_forward_hook(lambda module, args, output: put(saved))]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        put(saved)


@contextmanager
def _swap(mixer: nn.Module, attr: str, replacement: nn.Module) -> Iterator[None]:
    original = getattr(mixer, attr)
    setattr(mixer, attr, replacement)
    try:
        yield
    finally:
        setattr(mixer, attr, original)


class _Ungated(nn.Module):
    """Stands in for Mamba-2's gated norm: returns its input unchanged (and ignores a gate). It keeps the
    ``norm_before_gate`` flag of the norm it replaces, which Falcon-H1's mixer reads to order norm and gate."""

    def __init__(self, replaced: nn.Module | None = None) -> None:
        super().__init__()
        self.norm_before_gate = getattr(replaced, "norm_before_gate", False)

    def forward(self, hidden_states, gate=None):  # noqa: D102
        return hidden_states


@contextmanager
def _bypass(model: nn.Module, registry: Registry, probe: Probe, ctx: Context) -> Iterator[None]:
    layer, comp = probe.layer, probe.component
    mixer = registry.mixer(model, layer)
    if comp == "z":
        seen: dict[str, torch.Tensor] = {}

        def keep_y(t: torch.Tensor) -> None:
            seen["y"] = t

        with hooks(model, {hook_name(layer, "y"): keep_y, hook_name(layer, "gated"): lambda t: seen["y"]}):
            yield
    elif comp == "dt":
        mean = ctx.means[hook_name(layer, "dt")]
        with hooks(model, {hook_name(layer, "dt"): lambda t: mean.to(t.dtype).expand_as(t)}):
            yield
    elif comp == "conv1d":
        K = registry.dims["K"]

        def identity_kernel(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 1:  # bias
                return torch.zeros_like(t)
            w = torch.zeros_like(t)  # (C, 1, K)
            w[..., K - 1] = 1  # the causal conv's last tap multiplies the current token
            return w

        with _edit(registry, model, layer, comp, identity_kernel):
            yield
    elif comp == "A_log":
        with _edit(registry, model, layer, comp, lambda t: torch.full_like(t, t.exp().mean().log().item())):
            yield
    elif comp == "D":
        with _edit(registry, model, layer, comp, torch.zeros_like):
            yield
    elif comp in ("norm", "dt_norm", "B_norm", "C_norm"):
        attr = registry.component(comp).module
        with _swap(mixer, attr, _Ungated(getattr(mixer, attr))):
            yield
    else:
        raise ValueError(f"kind 'bypass' does not apply to {comp!r}; see ablation_table()")


@contextmanager
def _sparsify(model: nn.Module, registry: Registry, probe: Probe, ctx: Context, method: str) -> Iterator[None]:
    owner = registry.owner(model, probe.layer, probe.component)
    slices = registry.weights(probe.component)
    views = [t.get(owner) for t in slices]
    masks = []
    for t, w in zip(slices, views):
        scores = w.detach().abs().float()  # (rows, cols) or conv (C, 1, K)
        if method == "wanda":
            l2 = ctx.input_l2[hook_name(probe.layer, registry.input_hook(t.param))].reshape(-1)  # (cols,) or (C,)
            scores = wanda_score(w.detach(), l2 if t.cols is None else l2[t.cols[0] : t.cols[1]])
        masks.append(unstructured_mask(scores, probe.sparsity, per_row=w.dim() == 2))
    it = iter(masks)
    with _edit(registry, model, probe.layer, probe.component, lambda w: w * next(it), tensors=views):
        yield

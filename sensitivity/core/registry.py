"""The component registry: canonical mixer components and where they live in each architecture.

This module is the only place in the package that knows how ``in_proj``, ``x_proj`` and the per-head parameters
are packed. Everything else asks the registry for a component's tensors, row slices and hook point.

Shape legend: D model width, ED inner channels (expand·D), N state size, R Δ low rank, H heads, P head dim,
G B/C groups, K conv kernel.

Mamba-1 / FalconMamba mixer: ``in_proj`` (2·ED, D) rows ``[x | z]``; depthwise ``conv1d`` (ED, 1, K);
``x_proj`` (R+2N, ED) rows ``[dt_low_rank | B | C]``; ``dt_proj`` (ED, R) + bias; ``A_log`` (ED, N); ``D`` (ED,);
``out_proj`` (D, ED). FalconMamba adds weightless RMS norms on the Δ low-rank input, B and C.

Mamba-2 mixer: ``in_proj`` (2·ED + 2·G·N + H, D) rows ``[z | x | B | C | dt]``; ``conv1d`` over ``[x | B | C]``;
``dt_bias``, ``A_log``, ``D`` (H,); gated RMS ``norm`` (ED,) with G groups; ``out_proj`` (D, ED).

Hybrid families (Bamba, Granite 4 ``granitemoehybrid``, Nemotron-H, Jamba) hold several *units* per block: an SSM
mixer (Mamba-2, or Mamba-1 on Jamba) or an attention mixer, then an MLP or MoE feed-forward (Nemotron-H: one unit
per block). :data:`FAMILIES` says where each unit lives; the attention components are ``q``, ``k``, ``v``, ``o``
(``q_proj``... ``o_proj``), the MLP components ``gate``, ``up``, ``down`` (Granite packs ``[gate | up]`` in
``input_linear``), the MoE components ``router`` and ``experts``. A component exists in the layers whose block has
its unit (:meth:`Registry.layers_with`).

Falcon-H1 (``falcon_h1``) blocks hold all three: a Mamba-2 ``mamba`` and an attention ``self_attn`` side by side on
the same normed input, then an MLP ``feed_forward``. Its µP multipliers are not weights: ``ssm_in_multiplier`` scales
the input of ``in_proj`` (the ``in`` hook carries the scaled input) and the ``mup_vector`` buffer scales each row
block of ``[z | x | B | C | dt]`` (the ``x``, ``z``, ``conv_in``, ``dt_raw`` hooks carry the scaled rows); the
gated ``norm`` exists only with ``mamba_rms_norm`` (else it is not listed), and with ``mamba_norm_before_gate`` the
``gated`` hook carries ``norm(y)·silu(z)``. Embedding and LM-head multipliers are :attr:`Registry.embed_scale` and
:attr:`Registry.logit_scale`; the attention/SSM in/out and MLP multipliers stay inside the HF forwards.

Zamba2 (``zamba2``) layers are Mamba-2 decoder layers (ssm at ``mamba``) or hybrid layers: a *shared* transformer
``shared_transformer`` on ``concat(residual, input embeddings)`` (width ``DA`` = 2·D), then ``linear``, then a Mamba-2
decoder (ssm at ``mamba_decoder.mamba``). The hybrid layers list the shared transformer's units too: attention at
``shared_transformer.self_attn`` (``q``... ``o``; their per-layer LoRA adapters are not listed, the ``q``, ``k``,
``v`` hooks carry the ``*_proj`` outputs before the adapter is added) and MLP at ``shared_transformer.feed_forward``
(``gate_up_proj`` rows ``[gate | up]``, ``down_proj``). Their weights are the *same tensors* in every hybrid layer
of one memory block (hybrid layer j uses block ``j % num_mem_blocks``): :meth:`Registry.sharing` names the layers
that share a component's tensors, so pruning it in one layer prunes it in all of them, and
``weight_sizes(..., unique=True)`` counts each shared tensor once. The per-layer ``linear`` is not a component. In a
hybrid layer the transformer's hook points fire before the mixer's (``Registry.hooks`` lists the SSM ones first).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import reduce

import pandas as pd
import torch
from torch import nn

from .names import ARCHITECTURES, DEFAULT_EXCLUDE, UNIT_KINDS
from .spec import SpecError

__all__ = ["ARCHITECTURES", "CONFIG_FIELDS", "DEFAULT_EXCLUDE", "UNIT_KINDS", "Component", "HookSpec", "Registry",
           "TensorSlice", "build_registry"]



@dataclass(frozen=True)
class TensorSlice:
    """Rows ``[start, stop)`` and columns of one parameter of a mixer (everything when None).

    Attributes:
        param: Dotted path relative to the mixer, e.g. ``"in_proj.weight"``.
        rows: Half-open row range along dim 0, or None for all rows.
        layout: Names of the axes the selected rows reshape into, e.g. ``("H", "P")`` for per-head rows.
        cols: Half-open column range along dim 1, or None for all columns.
        col_layout: Names of the axes the columns reshape into (2-D weights), e.g. ``("H", "P")`` for the input
            channels of Mamba-2's ``out_proj``.
    """

    param: str
    rows: tuple[int, int] | None = None
    layout: tuple[str, ...] = ()
    cols: tuple[int, int] | None = None
    col_layout: tuple[str, ...] = ()

    def get(self, mixer: nn.Module) -> torch.Tensor:
        """A view of the selected rows and columns of the parameter (writes go to the model)."""
        return self.select(self.parameter(mixer))

    def parameter(self, mixer: nn.Module) -> torch.Tensor:
        """The whole parameter this slice is part of."""
        return reduce(getattr, self.param.split("."), mixer)

    def select(self, full: torch.Tensor) -> torch.Tensor:
        """The rows and columns of this slice from a tensor shaped like its whole parameter (e.g. its gradient)."""
        if self.rows is not None:
            full = full[self.rows[0] : self.rows[1]]
        return full if self.cols is None else full[:, self.cols[0] : self.cols[1]]

    def describe(self) -> str:
        """The slice as text: ``param``, or ``param[rows, cols]`` in slice notation, e.g. ``in_proj.weight[0:64]``."""
        rows = "" if self.rows is None else f"{self.rows[0]}:{self.rows[1]}"
        cols = "" if self.cols is None else f", {self.cols[0]}:{self.cols[1]}"
        return self.param if not (rows or cols) else f"{self.param}[{rows or ':'}{cols}]"


@dataclass(frozen=True)
class Component:
    """A canonical part of a mixer layer.

    Attributes:
        name: Canonical name (``x``, ``z``, ``B``, ``C``, ``dt``, ``conv1d``, ``A_log``, ``D``, ``norm``,
            ``out_proj``, and FalconMamba's ``dt_norm``, ``B_norm``, ``C_norm``).
        description: One line for tables.
        tensors: The parameter rows it owns (empty for weightless parts).
        hook: The hook point carrying the activation it produces.
        module: The mixer submodule that computes it, when it is one (``conv1d``, ``norm``, FalconMamba's
            ``dt_layernorm``...), so a probe can swap it out; None otherwise.
        unit: The kind of unit holding it (:data:`UNIT_KINDS`); its tensors are relative to that unit's module.
    """

    name: str
    description: str
    tensors: tuple[TensorSlice, ...]
    hook: str
    module: str | None = None
    unit: str = "ssm"


@dataclass(frozen=True)
class HookSpec:
    """A named activation of the instrumented mixer forward and its shape (legend letters plus B, L).

    Attributes:
        name: Hook point name, e.g. ``"dt"``; unique within a registry.
        shape: Shape of the activation in legend letters, e.g. ``"(B, L, ED)"``.
        description: One line for tables.
        unit: The kind of unit whose forward produces it (:data:`UNIT_KINDS`).
    """

    name: str
    shape: str
    description: str
    unit: str = "ssm"


_M1_HOOKS = (
    HookSpec("in", "(B, L, D)", "mixer input, the input of in_proj"),
    HookSpec("x", "(B, L, ED)", "x branch of in_proj, before the convolution"),
    HookSpec("z", "(B, L, ED)", "gate branch of in_proj"),
    HookSpec("conv", "(B, L, ED)", "conv1d output after SiLU"),
    HookSpec("u", "(B, L, ED)", "SSM input (equals conv on Mamba-1)"),
    HookSpec("dt_low", "(B, L, R)", "Δ low-rank projection (after the RMS norm on FalconMamba)"),
    HookSpec("dt_raw", "(B, L, ED)", "Δ before softplus (dt_proj output + bias)"),
    HookSpec("dt", "(B, L, ED)", "Δ after softplus"),
    HookSpec("B", "(B, L, N)", "input matrix B"),
    HookSpec("C", "(B, L, N)", "output matrix C"),
    HookSpec("A", "(ED, N)", "continuous decay A = -exp(A_log)"),
    HookSpec("y", "(B, L, ED)", "scan output including the D skip term"),
    HookSpec("gated", "(B, L, ED)", "y * silu(z)"),
    HookSpec("out_proj_in", "(B, L, ED)", "input of out_proj (equals gated on Mamba-1)"),
    HookSpec("out", "(B, L, D)", "mixer output"),
)

_M2_HOOKS = (
    HookSpec("in", "(B, L, D)", "mixer input, the input of in_proj"),
    HookSpec("x", "(B, L, ED)", "x branch of in_proj, before the convolution"),
    HookSpec("z", "(B, L, ED)", "gate branch of in_proj"),
    HookSpec("conv_in", "(B, L, ED+2GN)", "conv1d input [x | B | C] before the convolution"),
    HookSpec("conv", "(B, L, ED+2GN)", "conv1d output after SiLU over [x | B | C]"),
    HookSpec("u", "(B, L, ED)", "SSM input: the x channels of conv"),
    HookSpec("dt_raw", "(B, L, H)", "Δ before softplus (in_proj dt rows + dt_bias)"),
    HookSpec("dt", "(B, L, H)", "Δ after softplus and the time-step limit"),
    HookSpec("B", "(B, L, G, N)", "input matrix B (after the convolution)"),
    HookSpec("C", "(B, L, G, N)", "output matrix C (after the convolution)"),
    HookSpec("A", "(H,)", "continuous decay A = -exp(A_log)"),
    HookSpec("y", "(B, L, ED)", "scan output including the D skip term"),
    HookSpec("gated", "(B, L, ED)", "y * silu(z), before the gated RMS norm"),
    HookSpec("out_proj_in", "(B, L, ED)", "gated RMS norm output, the input of out_proj"),
    HookSpec("out", "(B, L, D)", "mixer output"),
)


_ATTN_HOOKS = (
    HookSpec("attn_in", "(B, L, D)", "attention input, the input of q_proj, k_proj and v_proj", "attention"),
    HookSpec("q", "(B, L, AH·AP)", "q_proj output (before the rotary embedding)", "attention"),
    HookSpec("k", "(B, L, KV·AP)", "k_proj output (before the rotary embedding)", "attention"),
    HookSpec("v", "(B, L, KV·AP)", "v_proj output", "attention"),
    HookSpec("o_in", "(B, L, AH·AP)", "attention heads' output, the input of o_proj", "attention"),
    HookSpec("attn_out", "(B, L, D)", "attention output (o_proj output)", "attention"),
)
_MLP_HOOKS = (
    HookSpec("mlp_in", "(B, L, D)", "MLP input, the input of its up (and gate) projection", "mlp"),
    HookSpec("down_in", "(B, L, F)", "act(gate)·up (or act(up)), the input of the down projection", "mlp"),
    HookSpec("mlp_out", "(B, L, D)", "MLP output", "mlp"),
)
_MOE_HOOKS = (
    HookSpec("moe_in", "(B, L, D)", "MoE input, the input of its router and experts", "moe"),
    HookSpec("moe_out", "(B, L, D)", "MoE output (routed experts, plus shared experts where the MoE has them)",
             "moe"),
)
_BLOCK_HOOKS = (
    HookSpec("block_in", "(B, L, D)", "residual stream entering the block", "block"),
    HookSpec("block_out", "(B, L, D)", "residual stream leaving the block", "block"),
)


@dataclass(frozen=True)
class Registry:
    """Canonical components and hook points of every layer of one model.

    Attributes:
        arch: The HF ``model_type`` (one of :data:`ARCHITECTURES`).
        n_layers: Number of blocks (decoder layers).
        dims: Sizes by legend letter: the SSM mixer's ``D``, ``ED``, ``N``, ``K``, and ``R`` or ``H``, ``P``,
            ``G``; on hybrids also the attention's ``AH`` heads, ``KV`` key/value heads, ``AP`` head dim, the MLP's
            ``F`` width and the MoE's ``E`` experts (Zamba2 adds ``DA``, the attention's input width 2·D).
        components: Every component of the model (each in the layers holding its unit), in a fixed order.
        hooks: Hook points, in forward order (each in the layers holding its unit; ``block`` ones in every layer).
        input_hooks: Weight parameter (relative to its unit) -> hook point carrying that weight's input
            activations (what WANDA's ``||X_j||`` is measured on), e.g. ``{"in_proj.weight": "in"}``.
        layers_path: Dotted path from the causal-LM model to the list of blocks.
        units: Per layer, unit kind -> attribute path from the block to the unit's module, e.g.
            ``({"ssm": "mixer"}, ...)`` for Mamba, ``{"attention": "self_attn", "mlp": "feed_forward"}`` for an
            attention layer of Bamba.
        final_norm_path: Dotted path from the causal-LM model to the norm applied after the last block.
        embed_scale: Factor the embeddings are multiplied by before the first block (Granite's and Falcon-H1's
            ``embedding_multiplier``). Granite also scales ``inputs_embeds`` passed to its forward; Falcon-H1 scales
            only the lookup of ``input_ids``, so a Falcon-H1 forward from ``inputs_embeds`` must be given them scaled.
        logit_scale: Factor the LM head's logits are multiplied by (Granite: ``1 / logits_scaling``; Falcon-H1:
            ``lm_head_multiplier``).
        rotary_path: Dotted path to the rotary embedding whose ``(cos, sin)`` the attention blocks take, if any.
        shared: Per layer, unit kind -> id of the weight group the unit belongs to, for units whose weights are
            the same tensors in several layers (Zamba2's shared transformer: its memory block); ``{}`` in layers
            without shared units. See :meth:`sharing`.
        block_args: Keyword names under which the blocks take what
            :class:`~sensitivity.core.runner.BlockCaller` passes, where they differ from the default: ``"mask"``
            (the attention's causal mask; default ``attention_mask``), ``"layer"`` (the block's index, for blocks
            that take it) and ``"embeds"`` (the model's input embeddings). Zamba2: ``{"mask": "causal_mask",
            "layer": "layer_idx", "embeds": "original_hidden_states"}``.
        embeds_layers: The layers whose block reads the input embeddings as well as the residual stream (under
            ``block_args["embeds"]``): Zamba2's hybrid layers.
        config_fields: The HF config fields that hold this family's SSM sizes and layer layout (what a pruner
            rewrites), from :data:`CONFIG_FIELDS`.
        ssm_multipliers: The SSM mixer scales its input by ``ssm_in_multiplier`` and the rows of ``in_proj``'s
            output by ``mup_vector``, and its gated norm is optional or before the gate (Falcon-H1's mixer).
        regroup_norm: The HF mixer's gated norm is transformers' Mamba-2 one, which some releases normalise over
            all ED channels: the instrumented forward swaps in the grouped norm (per group of ED / G channels).

    Examples:
        >>> reg = build_registry(model.config)
        >>> reg.component("B").tensors[0].get(reg.mixer(model, 0)).shape
        torch.Size([16, 256])
    """

    arch: str
    n_layers: int
    dims: dict[str, int]
    components: tuple[Component, ...]
    hooks: tuple[HookSpec, ...]
    input_hooks: dict[str, str] = field(default_factory=dict)
    layers_path: str = "backbone.layers"
    units: tuple[dict[str, str], ...] = ()
    final_norm_path: str = "backbone.norm_f"
    embed_scale: float = 1.0
    logit_scale: float = 1.0
    rotary_path: str | None = None
    shared: tuple[dict[str, int], ...] = ()
    block_args: dict[str, str] = field(default_factory=dict)
    embeds_layers: tuple[int, ...] = ()
    config_fields: dict[str, str] = field(default_factory=dict)
    ssm_multipliers: bool = False
    regroup_norm: bool = False
    _by_name: dict[str, Component] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({c.name: c for c in self.components})
        if not self.units:
            object.__setattr__(self, "units", tuple({"ssm": "mixer"} for _ in range(self.n_layers)))
        if not self.shared:
            object.__setattr__(self, "shared", tuple({} for _ in range(self.n_layers)))

    @property
    def ssm_style(self) -> str:
        """Which mixer the SSM units are: ``"mamba1"`` (per-channel decays, ``x_proj``/``dt_proj``: Mamba, FalconMamba,
        Jamba) or ``"mamba2"`` (per-head scalar decays, everything packed in ``in_proj``)."""
        return "mamba1" if "R" in self.dims else "mamba2"

    @property
    def component_names(self) -> tuple[str, ...]:
        """Names of :attr:`components`, in their order."""
        return tuple(c.name for c in self.components)

    @property
    def hook_names(self) -> tuple[str, ...]:
        """Names of :attr:`hooks`, in forward order."""
        return tuple(h.name for h in self.hooks)

    @property
    def is_hybrid(self) -> bool:
        """Whether some block holds a unit other than an SSM mixer."""
        return any(set(u) != {"ssm"} for u in self.units)

    def layer_kind(self, layer: int) -> str:
        """What block ``layer`` holds, e.g. ``"ssm"``, ``"attention+mlp"`` (units in :data:`UNIT_KINDS` order)."""
        return "+".join(k for k in UNIT_KINDS if k in self.units[self.check_layer(layer)])

    def has(self, layer: int, name: str) -> bool:
        """Whether layer ``layer`` holds component (or hook point) ``name``."""
        unit = self._by_name[name].unit if name in self._by_name else self._hook_unit(name)
        return unit == "block" or unit in self.units[layer]

    def layers_with(self, name: str) -> tuple[int, ...]:
        """The layers holding component ``name`` (all layers on a pure SSM model)."""
        self.component(name)
        return tuple(i for i in range(self.n_layers) if self.has(i, name))

    def sharing(self, layer: int, name: str) -> tuple[int, ...]:
        """The layers whose component ``name`` is the very same tensors as in ``layer``, ``layer`` included:
        ``(layer,)`` unless its unit's weights are shared (Zamba2's shared transformer). Pruning or editing the
        component in one of them changes it in all of them, so a per-layer schedule must give them one sparsity.

        Raises:
            SpecError: If ``layer`` does not hold component ``name``.

        Examples:
            >>> build_registry(tiny_config("zamba2")).sharing(1, "q")
            (1, 3)
        """
        unit = self.component(name).unit
        if not self.has(self.check_layer(layer), name):
            raise SpecError(f"layer {layer} is a {self.layer_kind(layer)} layer with no {name!r}; layers with it: "
                            f"{', '.join(map(str, self.layers_with(name))) or 'none'}", "layers")  # fmt: skip
        group = self.shared[layer].get(unit)
        if group is None:
            return (layer,)
        return tuple(i for i in range(self.n_layers) if self.shared[i].get(unit) == group)

    def is_shared(self, name: str) -> bool:
        """Whether component ``name``'s tensors are shared by several layers (see :meth:`sharing`)."""
        return any(len(self.sharing(i, name)) > 1 for i in self.layers_with(name))

    def components_at(self, layer: int) -> tuple[Component, ...]:
        """The components of layer ``layer``, in registry order."""
        return tuple(c for c in self.components if c.unit in self.units[self.check_layer(layer)])

    def _hook_unit(self, point: str) -> str:
        for h in self.hooks:
            if h.name == point:
                return h.unit
        raise ValueError(f"unknown hook point {point!r} for {self.arch}; allowed: {', '.join(self.hook_names)}")

    def component(self, name: str) -> Component:
        """The component called ``name``; a :class:`SpecError` naming the allowed names otherwise."""
        if name not in self._by_name:
            raise SpecError(f"unknown component {name!r} for {self.arch}; allowed: {', '.join(self.component_names)}",
                            "component")  # fmt: skip
        return self._by_name[name]

    def packed_rows(self, param: str, unit: str = "ssm") -> dict[str, tuple[int, int]]:
        """Component name -> row range for a packed parameter of ``unit``, e.g. ``packed_rows("in_proj.weight")``."""
        return {c.name: t.rows for c in self.components for t in c.tensors
                if c.unit == unit and t.param == param and t.rows}  # fmt: skip

    def input_hook(self, param: str) -> str:
        """The hook point whose activation is the input of weight ``param`` (its channels = the weight's columns)."""
        if param not in self.input_hooks:
            raise ValueError(f"no input hook for {param!r}; weights with one: {', '.join(self.input_hooks)}")
        return self.input_hooks[param]

    def weights(self, name: str) -> tuple[TensorSlice, ...]:
        """The weight-matrix slices of component ``name``: those with an input hook point (linear rows and the
        depthwise conv's taps), what WANDA, magnitude and the schedules prune; biases, ``A_log``, ``D``,
        ``dt_bias`` and norms are never among them.

        Examples:
            >>> [t.describe() for t in build_registry(tiny_config("mamba")).weights("dt")]
            ['x_proj.weight[0:8]', 'dt_proj.weight']
        """
        return tuple(t for t in self.component(name).tensors if t.param in self.input_hooks)

    @property
    def prunable_components(self) -> tuple[str, ...]:
        """Components with at least one weight-matrix slice, in registry order (Mamba-2: ``z, x, B, C, dt, conv1d,
        out_proj``; Mamba-1 / FalconMamba: ``x, z, conv1d, dt, B, C, out_proj``; hybrids add ``q, k, v, o`` and
        ``gate, up, down``)."""
        return tuple(c.name for c in self.components if self.weights(c.name))

    def resolve(self, components=None, exclude=DEFAULT_EXCLUDE) -> tuple[str, ...]:
        """The components a pruner or schedule covers: ``components`` (default every prunable one) minus
        ``exclude``, in registry order.

        Raises:
            ValueError: For an unknown or non-prunable name, a component both asked for and excluded, or nothing
                left.

        Examples:
            >>> build_registry(tiny_config("mamba")).resolve(exclude=("conv1d", "dt"))
            ('x', 'z', 'B', 'C', 'out_proj')
        """
        prunable = self.prunable_components
        asked, excluded = _names("components", components), _names("exclude", exclude)
        for where, names in (("components", asked), ("exclude", excluded)):
            for name in names:
                if name not in self.component_names:
                    raise SpecError(f"unknown component {name!r} for {self.arch}; allowed: {', '.join(prunable)}",
                                    where)  # fmt: skip
                if where == "components" and name not in prunable:
                    raise SpecError(f"{name!r} has no weight matrix to prune; allowed: {', '.join(prunable)}", where)
        if both := [c for c in asked if c in excluded]:
            raise SpecError(f"{both[0]!r} is both asked for and excluded (exclude={list(excluded)}); exclude none of "
                            "them to prune it", "components")  # fmt: skip
        chosen = tuple(c for c in prunable if (not asked or c in asked) and c not in excluded)
        if not chosen:
            raise SpecError(f"no component left to prune (components={list(asked) or 'all'}, exclude="
                            f"{list(excluded)}); prunable: {', '.join(prunable)}", "exclude")  # fmt: skip
        return chosen

    def weight_sizes(self, model: nn.Module, components=None, unique: bool = False) -> dict[tuple[int, str], int]:
        """Number of weight-matrix entries of every (layer, component) the layer holds, read from ``model``'s
        tensors (``components``: default every prunable one, ``conv1d`` included), layer-major in registry
        order. Shared tensors (:meth:`sharing`) count in every layer holding them, or with ``unique`` only in the
        first of those layers (the others are left out), so the values sum to the model's weight count."""
        names = self.resolve(components, exclude=())
        return {(layer, name): sum(t.get(self.owner(model, layer, name)).numel() for t in self.weights(name))
                for layer in range(self.n_layers) for name in names if self.has(layer, name)
                and (not unique or self.sharing(layer, name)[0] == layer)}  # fmt: skip

    def check_layer(self, layer: int, field: str = "layer") -> int:
        """``layer`` if it is a layer of this model; else a :class:`SpecError` naming ``field``."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise SpecError(f"{layer!r} is out of range; allowed: 0..{self.n_layers - 1}", field)
        return layer

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The list of residual blocks (each ``hidden -> hidden + unit(norm(hidden))`` per unit)."""
        return reduce(getattr, self.layers_path.split("."), model)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm between the last block and the LM head."""
        return reduce(getattr, self.final_norm_path.split("."), model)

    def rotary(self, model: nn.Module) -> nn.Module | None:
        """The rotary embedding module the attention blocks take ``(cos, sin)`` from, or None."""
        return reduce(getattr, self.rotary_path.split("."), model) if self.rotary_path else None

    def unit(self, model: nn.Module, layer: int, kind: str) -> nn.Module:
        """The module of unit ``kind`` (:data:`UNIT_KINDS`) in ``layer``.

        Raises:
            SpecError: If the layer has no such unit, naming the layers that do.
        """
        units = self.units[self.check_layer(layer)]
        if kind not in units:
            where = [i for i in range(self.n_layers) if kind in self.units[i]]
            raise SpecError(f"layer {layer} is a {self.layer_kind(layer)} layer with no {kind} unit; layers with "
                            f"one: {', '.join(map(str, where)) or 'none'}", "layers")  # fmt: skip
        return reduce(getattr, units[kind].split("."), self.blocks(model)[layer])

    @property
    def mixer_attr(self) -> str:
        """Attribute of a block holding its SSM mixer (``"mixer"`` on Mamba, Mamba-2, FalconMamba), where every SSM
        layer holds it at the same direct attribute (what code replacing a mixer module by ``setattr`` needs).

        Raises:
            ValueError: If the SSM layers hold their mixers at different or nested paths (Zamba2).
        """
        paths = {u["ssm"] for u in self.units if "ssm" in u}
        if len(paths) != 1 or "." in next(iter(paths)):
            raise ValueError(f"{self.arch} blocks hold their SSM mixers at {', '.join(sorted(paths))}; use "
                             "Registry.unit(model, layer, 'ssm') and its path in Registry.units instead")  # fmt: skip
        return paths.pop()

    def mixer(self, model: nn.Module, layer: int) -> nn.Module:
        """The SSM mixer module of ``layer`` (a :class:`SpecError` if the layer has none)."""
        return self.unit(model, layer, "ssm")

    def owner(self, model: nn.Module, layer: int, name: str) -> nn.Module:
        """The module component ``name``'s tensors are relative to in ``layer`` (its unit's module)."""
        return self.unit(model, layer, self.component(name).unit)

    def tensors(self, model: nn.Module, layer: int, name: str) -> list[torch.Tensor]:
        """Views of the parameter rows owned by component ``name`` in ``layer`` (writes go to the model)."""
        owner = self.owner(model, layer, name)
        return [t.get(owner) for t in self.component(name).tensors]

    def hook_point(self, model: nn.Module, layer: int, name: str) -> nn.Module:
        """The hook-point module carrying activation ``name`` in ``layer`` (model must be instrumented)."""
        unit = self._hook_unit(name)
        self.check_layer(layer)
        if unit != "block" and unit not in self.units[layer]:
            where = [i for i in range(self.n_layers) if unit in self.units[i]]
            raise ValueError(f"hook point {name!r} is in {unit} units; layer {layer} is a {self.layer_kind(layer)} "
                             f"layer; layers with one: {', '.join(map(str, where)) or 'none'}")  # fmt: skip
        owner = self.blocks(model)[layer] if unit == "block" else self.unit(model, layer, unit)
        points = getattr(owner, "hook_points", None)
        if points is None:
            raise ValueError("model is not instrumented; call sensitivity.instrument(model) first")
        return points[name]

    def table(self, model: nn.Module | None = None) -> pd.DataFrame:
        """One row per (layer, component, tensor): names, row/column ranges, shapes, layouts and hook points."""
        rows = []
        for layer in range(self.n_layers):
            for comp in self.components_at(layer):
                owner = self.owner(model, layer, comp.name) if model is not None else None
                for t in comp.tensors or (None,):
                    shape = tuple(t.get(owner).shape) if (t is not None and owner is not None) else None
                    rows.append(
                        {
                            "layer": layer,
                            "unit": comp.unit,
                            "component": comp.name,
                            "tensor": t.param if t else "",
                            "rows": f"{t.rows[0]}:{t.rows[1]}" if (t and t.rows) else "",
                            "cols": f"{t.cols[0]}:{t.cols[1]}" if (t and t.cols) else "",
                            "shape": "x".join(map(str, shape)) if shape else "",
                            "layout": _layout(t),
                            "hook": comp.hook,
                            "description": comp.description,
                        }
                    )
        return pd.DataFrame(rows)


def _names(what: str, value) -> tuple[str, ...]:
    """None, one name or a sequence of names -> a deduplicated tuple."""
    if value is None:
        return ()
    values = (value,) if isinstance(value, str) else tuple(value)
    if bad := [v for v in values if not isinstance(v, str)]:
        raise ValueError(f"{what} must be component names, got {bad[0]!r}")
    return tuple(dict.fromkeys(values))


def _layout(t: TensorSlice | None) -> str:
    """``"H,P x D"``: row axes, then column axes for 2-D weights."""
    if t is None:
        return ""
    rows = ",".join(t.layout)
    return f"{rows} x {','.join(t.col_layout)}" if t.col_layout else rows


def _mamba1_parts(D: int, ED: int, N: int, R: int, K: int, in_bias: bool, conv_bias: bool, norms: str | None):
    """Mamba-1 components, hooks and input hooks. ``norms``: None, ``"weightless"`` (FalconMamba) or ``"weighted"``
    (Jamba's RMS norms on the Δ low-rank input, B and C)."""

    def in_rows(lo: int, hi: int) -> tuple[TensorSlice, ...]:
        weight = TensorSlice("in_proj.weight", (lo, hi), ("ED",), col_layout=("D",))
        return (weight, TensorSlice("in_proj.bias", (lo, hi), ("ED",))) if in_bias else (weight,)

    comps = [
        Component("x", "x branch rows of in_proj", in_rows(0, ED), "x"),
        Component("z", "gate rows of in_proj", in_rows(ED, 2 * ED), "z"),
        Component(
            "conv1d",
            "depthwise causal convolution",
            (TensorSlice("conv1d.weight", None, ("ED",)),)
            + ((TensorSlice("conv1d.bias", None, ("ED",)),) if conv_bias else ()),
            "conv",
            "conv1d",
        ),
        Component(
            "dt",
            "Δ path: x_proj dt rows, dt_proj and its bias",
            (
                TensorSlice("x_proj.weight", (0, R), ("R",), col_layout=("ED",)),
                TensorSlice("dt_proj.weight", None, ("ED",), col_layout=("R",)),
                TensorSlice("dt_proj.bias", None, ("ED",)),
            ),
            "dt",
        ),
        Component(
            "B", "B rows of x_proj", (TensorSlice("x_proj.weight", (R, R + N), ("N",), col_layout=("ED",)),), "B"
        ),
        Component(
            "C",
            "C rows of x_proj",
            (TensorSlice("x_proj.weight", (R + N, R + 2 * N), ("N",), col_layout=("ED",)),),
            "C",
        ),
        Component("A_log", "log of the negated decay rates", (TensorSlice("A_log", None, ("ED", "N")),), "A"),
        Component("D", "skip connection D", (TensorSlice("D", None, ("ED",)),), "y"),
        Component(
            "out_proj",
            "output projection",
            (TensorSlice("out_proj.weight", None, ("D",), col_layout=("ED",)),)
            + ((TensorSlice("out_proj.bias", None, ("D",)),) if in_bias else ()),
            "out",
        ),
    ]
    if norms:
        weighted = norms == "weighted"
        for name, what, attr, size, hook in (("dt_norm", "the Δ low-rank input", "dt_layernorm", "R", "dt_low"),
                                             ("B_norm", "B", "b_layernorm", "N", "B"),
                                             ("C_norm", "C", "c_layernorm", "N", "C")):  # fmt: skip
            tensors = (TensorSlice(f"{attr}.weight", None, (size,)),) if weighted else ()
            comps.append(Component(name, f"{'' if weighted else 'weightless '}RMS norm on {what}", tensors, hook, attr))
    inputs = {"in_proj.weight": "in", "conv1d.weight": "x", "x_proj.weight": "u", "dt_proj.weight": "dt_low",
              "out_proj.weight": "out_proj_in"}  # fmt: skip
    dims = {"D": D, "ED": ED, "N": N, "R": R, "K": K}
    return dims, comps, _M1_HOOKS, inputs


def _mamba2_parts(
    D: int, H: int, P: int, N: int, G: int, K: int, in_bias: bool, conv_bias: bool, out_bias: bool | None = None
):
    """Mamba-2 components, hooks and input hooks (``out_bias``: whether ``out_proj`` has a bias, default
    ``in_bias``)."""
    ED = H * P
    bounds = {"z": (0, ED), "x": (ED, 2 * ED), "B": (2 * ED, 2 * ED + G * N), "C": (2 * ED + G * N, 2 * ED + 2 * G * N)}
    bounds["dt"] = (2 * ED + 2 * G * N, 2 * ED + 2 * G * N + H)
    layouts = {"z": ("H", "P"), "x": ("H", "P"), "B": ("G", "N"), "C": ("G", "N"), "dt": ("H",)}

    def in_rows(name: str) -> tuple[TensorSlice, ...]:
        weight = TensorSlice("in_proj.weight", bounds[name], layouts[name], col_layout=("D",))
        return (weight, TensorSlice("in_proj.bias", bounds[name], layouts[name])) if in_bias else (weight,)

    comps = [
        Component("z", "gate rows of in_proj", in_rows("z"), "z"),
        Component("x", "x rows of in_proj", in_rows("x"), "x"),
        Component("B", "B rows of in_proj", in_rows("B"), "B"),
        Component("C", "C rows of in_proj", in_rows("C"), "C"),
        Component(
            "dt", "Δ path: in_proj dt rows and dt_bias", in_rows("dt") + (TensorSlice("dt_bias", None, ("H",)),), "dt"
        ),
        Component(
            "conv1d",
            "depthwise causal convolution over [x | B | C]",
            (TensorSlice("conv1d.weight", None, ("ED+2GN",)),)
            + ((TensorSlice("conv1d.bias", None, ("ED+2GN",)),) if conv_bias else ()),
            "conv",
            "conv1d",
        ),
        Component("A_log", "log of the negated per-head decay rates", (TensorSlice("A_log", None, ("H",)),), "A"),
        Component("D", "per-head skip connection D", (TensorSlice("D", None, ("H",)),), "y"),
        Component(
            "norm", "gated RMS norm weight", (TensorSlice("norm.weight", None, ("H", "P")),), "out_proj_in", "norm"
        ),
        Component(
            "out_proj",
            "output projection",
            (TensorSlice("out_proj.weight", None, ("D",), col_layout=("H", "P")),)
            + ((TensorSlice("out_proj.bias", None, ("D",)),) if (in_bias if out_bias is None else out_bias) else ()),
            "out",
        ),
    ]
    dims = {"D": D, "ED": ED, "N": N, "H": H, "P": P, "G": G, "K": K}
    inputs = {"in_proj.weight": "in", "conv1d.weight": "conv_in", "out_proj.weight": "out_proj_in"}
    return dims, comps, _M2_HOOKS, inputs


def _attention_parts(D: int, AH: int, KV: int, AP: int, bias: bool, width: int | None = None):
    """Attention components ``q, k, v, o`` (``q_proj``... ``o_proj`` of the attention module). ``width``: the
    input width of ``q_proj``, ``k_proj``, ``v_proj`` when it is not ``D`` (Zamba2: 2·D), as dim ``DA``."""
    inp = ("D",) if width is None else ("DA",)

    def proj(name: str, rows: tuple[str, ...], cols: tuple[str, ...]) -> tuple[TensorSlice, ...]:
        w = TensorSlice(f"{name}.weight", None, rows, col_layout=cols)
        return (w, TensorSlice(f"{name}.bias", None, rows)) if bias else (w,)

    comps = [
        Component("q", "query projection q_proj", proj("q_proj", ("AH", "AP"), inp), "q", unit="attention"),
        Component("k", "key projection k_proj", proj("k_proj", ("KV", "AP"), inp), "k", unit="attention"),
        Component("v", "value projection v_proj", proj("v_proj", ("KV", "AP"), inp), "v", unit="attention"),
        Component("o", "output projection o_proj", proj("o_proj", ("D",), ("AH", "AP")), "attn_out",
                  unit="attention"),  # fmt: skip
    ]
    inputs = {"q_proj.weight": "attn_in", "k_proj.weight": "attn_in", "v_proj.weight": "attn_in",
              "o_proj.weight": "o_in"}  # fmt: skip
    if width is None:
        return {"AH": AH, "KV": KV, "AP": AP}, comps, _ATTN_HOOKS, inputs
    hooks = tuple(replace(h, shape="(B, L, DA)") if h.name == "attn_in" else h for h in _ATTN_HOOKS)
    return {"AH": AH, "KV": KV, "AP": AP, "DA": width}, comps, hooks, inputs


def _mlp_parts(style: str, F: int, bias: bool = False):
    """MLP components: ``gated`` (``gate_proj``, ``up_proj``, ``down_proj``), ``packed`` (Granite: ``input_linear``
    rows ``[gate | up]``, ``output_linear``; Zamba2 ``gate_up``: ``gate_up_proj`` rows ``[gate | up]``,
    ``down_proj``) or ``plain`` (Nemotron-H: ``up_proj``, ``down_proj``, no gate)."""
    if style in ("packed", "gate_up"):
        packed, out = ("input_linear", "output_linear") if style == "packed" else ("gate_up_proj", "down_proj")
        gate = (TensorSlice(f"{packed}.weight", (0, F), ("F",), col_layout=("D",)),)
        up = (TensorSlice(f"{packed}.weight", (F, 2 * F), ("F",), col_layout=("D",)),)
        down = (TensorSlice(f"{out}.weight", None, ("D",), col_layout=("F",)),)
        inputs = {f"{packed}.weight": "mlp_in", f"{out}.weight": "down_in"}
    else:
        gate = (TensorSlice("gate_proj.weight", None, ("F",), col_layout=("D",)),)
        up = (TensorSlice("up_proj.weight", None, ("F",), col_layout=("D",)),)
        down = (TensorSlice("down_proj.weight", None, ("D",), col_layout=("F",)),)
        if bias:  # gate_proj / up_proj / down_proj biases (mlp_bias)
            gate += (TensorSlice("gate_proj.bias", None, ("F",)),)
            up += (TensorSlice("up_proj.bias", None, ("F",)),)
            down += (TensorSlice("down_proj.bias", None, ("D",)),)
        inputs = {"gate_proj.weight": "mlp_in", "up_proj.weight": "mlp_in", "down_proj.weight": "down_in"}
    comps = [Component("gate", "MLP gate projection", gate, "down_in", unit="mlp")] if style != "plain" else []
    comps += [Component("up", "MLP up projection", up, "down_in", unit="mlp"),
              Component("down", "MLP down projection", down, "mlp_out", unit="mlp")]  # fmt: skip
    if style == "plain":
        inputs.pop("gate_proj.weight")
    return {"F": F}, comps, _MLP_HOOKS, inputs


def _moe_parts(E: int, router: str, up: str = "experts.gate_up_proj", shared: bool = False, bias: bool = False):
    """MoE components: the ``router`` weight, the ``experts`` (fused 3-D expert weights ``up`` and
    ``experts.down_proj``, not pruned by the unstructured methods: each expert sees only the tokens routed to it)
    and Nemotron-H's ``shared_experts`` (an MLP every token goes through)."""
    comps = [
        Component("router", "router weight (one row per expert)",
                  (TensorSlice(router, None, ("E",), col_layout=("D",)),), "moe_out", unit="moe"),  # fmt: skip
        Component("experts", "every expert's fused up (and gate) and down weights",
                  (TensorSlice(up, None, ("E",)), TensorSlice("experts.down_proj", None, ("E",))),
                  "moe_out", unit="moe"),  # fmt: skip
    ]
    if shared:
        tensors = (TensorSlice("shared_experts.up_proj.weight", None, ("F",), col_layout=("D",)),
                   TensorSlice("shared_experts.down_proj.weight", None, ("D",), col_layout=("F",)))
        if bias:
            tensors += (TensorSlice("shared_experts.up_proj.bias", None, ("F",)),
                        TensorSlice("shared_experts.down_proj.bias", None, ("D",)))
        comps.append(Component("shared_experts", "the shared experts' up and down projections", tensors, "moe_out",
                               unit="moe"))  # fmt: skip
    return {"E": E}, comps, _MOE_HOOKS, {}


def _registry(arch: str, ssm, units: list[dict[str, str]], layers_path: str, final_norm_path: str,
              others=(), embed_scale: float = 1.0, logit_scale: float = 1.0, rotary_path: str | None = None,
              **fields) -> Registry:  # fmt: skip
    """Assemble a registry from its SSM parts and the parts of its other units (only kinds some layer holds);
    ``fields``: further :class:`Registry` fields (``shared``, ``block_args``, ``embeds_layers``,
    ``ssm_multipliers``, ``regroup_norm``)."""
    dims, comps, hooks, inputs = ssm
    dims, comps, hooks, inputs = dict(dims), list(comps), list(hooks), dict(inputs)
    present = {k for u in units for k in u}
    for kind, (d, c, h, i) in others:
        if kind in present:
            dims.update(d)
            comps += c
            hooks += h
            inputs.update(i)
    if set(present) != {"ssm"}:
        hooks = _BLOCK_HOOKS[:1] + tuple(hooks) + _BLOCK_HOOKS[1:]
    return Registry(arch, len(units), dims, tuple(comps), tuple(hooks), inputs, layers_path, tuple(units),
                    final_norm_path, float(embed_scale), float(logit_scale), rotary_path,
                    config_fields=dict(CONFIG_FIELDS[arch]), **fields)  # fmt: skip


def _mamba1(config) -> Registry:
    ssm = _mamba1_parts(config.hidden_size, config.intermediate_size, config.state_size, int(config.time_step_rank),
                        config.conv_kernel, getattr(config, "use_bias", False), getattr(config, "use_conv_bias", True),
                        "weightless" if config.model_type == "falcon_mamba" else None)  # fmt: skip
    units = [{"ssm": "mixer"} for _ in range(config.num_hidden_layers)]
    return _registry(config.model_type, ssm, units, "backbone.layers", "backbone.norm_f")


def _mamba2(config) -> Registry:
    ssm = _mamba2_parts(config.hidden_size, config.num_heads, config.head_dim, config.state_size, config.n_groups,
                        config.conv_kernel, getattr(config, "use_bias", False), getattr(config, "use_conv_bias", True))
    units = [{"ssm": "mixer"} for _ in range(config.num_hidden_layers)]
    return _registry("mamba2", ssm, units, "backbone.layers", "backbone.norm_f", regroup_norm=True)


def _attn_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _bamba_like(config) -> Registry:
    """Bamba and Granite 4 (``granitemoehybrid``): decoder layers of a Mamba-2 ``mamba`` or an attention
    ``self_attn``, then an MLP (Bamba ``feed_forward``; Granite ``shared_mlp``, plus ``block_sparse_moe``)."""
    c, granite = config, config.model_type == "granitemoehybrid"
    ssm = _mamba2_parts(c.hidden_size, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups,
                        c.mamba_d_conv, c.mamba_proj_bias, c.mamba_conv_bias)  # fmt: skip
    experts = granite and getattr(c, "num_local_experts", 0) > 0
    units = []
    for kind in c.layer_types:
        unit = {"ssm": "mamba"} if kind == "linear_attention" else {"attention": "self_attn"}
        unit["mlp"] = "shared_mlp" if granite else "feed_forward"
        if experts:
            unit["moe"] = "block_sparse_moe"
        units.append(unit)
    F = c.shared_intermediate_size if granite else c.intermediate_size
    others = [("attention", _attention_parts(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                             _attn_head_dim(c), c.attention_bias)),
              ("mlp", _mlp_parts("packed" if granite else "gated", F, not granite and c.mlp_bias))]  # fmt: skip
    if experts:
        others.append(("moe", _moe_parts(c.num_local_experts, "router.weight")))
    if granite:
        rotary = "model.rotary_emb" if c.position_embedding_type == "rope" else None
        return _registry(c.model_type, ssm, units, "model.layers", "model.norm", others,
                         c.embedding_multiplier, 1.0 / c.logits_scaling, rotary)  # fmt: skip
    return _registry(c.model_type, ssm, units, "model.layers", "model.final_layernorm", others,
                     rotary_path="model.rotary_emb")  # fmt: skip


def _nemotron_h(config) -> Registry:
    """Nemotron-H: one unit per block (``mixer``): Mamba-2, attention, a ReLU² MLP or a MoE."""
    c = config
    ssm = _mamba2_parts(c.hidden_size, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups,
                        c.conv_kernel, c.use_bias, c.use_conv_bias)  # fmt: skip
    kinds = {"linear_attention": "ssm", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
    units = [{kinds[k]: "mixer"} for k in c.layer_types]
    others = [("attention", _attention_parts(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                             _attn_head_dim(c), False)),  # NemotronHAttention: no biases
              ("mlp", _mlp_parts("plain", c.intermediate_size, c.mlp_bias)),
              ("moe", _moe_parts(c.n_routed_experts, "gate.weight", "experts.up_proj", c.n_shared_experts > 0,
                                     c.mlp_bias))]  # fmt: skip
    return _registry("nemotron_h", ssm, units, "model.layers", "model.norm_f", others)


def _jamba(config) -> Registry:
    """Jamba: decoder layers of a Mamba-1 ``mamba`` (with weighted Δ/B/C norms) or an attention ``self_attn``,
    then ``feed_forward``: an MLP, or a MoE every ``expert_layer_period`` layers."""
    c = config
    ED = c.mamba_expand * c.hidden_size
    ssm = _mamba1_parts(c.hidden_size, ED, c.mamba_d_state, c.mamba_dt_rank, c.mamba_d_conv, c.mamba_proj_bias,
                        c.mamba_conv_bias, "weighted")  # fmt: skip
    units = []
    for i, kind in enumerate(c.layer_types):
        unit = {"ssm": "mamba"} if kind == "linear_attention" else {"attention": "self_attn"}
        unit["moe" if c.layers_num_experts[i] > 1 else "mlp"] = "feed_forward"
        units.append(unit)
    others = [("attention", _attention_parts(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                             c.hidden_size // c.num_attention_heads, False)),
              ("mlp", _mlp_parts("gated", c.intermediate_size)),
              ("moe", _moe_parts(c.num_experts, "router.weight"))]  # fmt: skip
    return _registry("jamba", ssm, units, "model.layers", "model.final_layernorm", others)


def _falcon_h1(config) -> Registry:
    """Falcon-H1: every decoder layer holds a Mamba-2 ``mamba`` and an attention ``self_attn`` in parallel, then an
    MLP ``feed_forward``. The gated ``norm`` exists only with ``mamba_rms_norm``; embeddings and logits are scaled
    by ``embedding_multiplier`` and ``lm_head_multiplier`` (the other µP multipliers act inside the HF forwards and
    the instrumented mixer)."""
    c = config
    ssm = _mamba2_parts(c.hidden_size, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups,
                        c.mamba_d_conv, c.mamba_proj_bias, c.mamba_conv_bias, c.projectors_bias)  # fmt: skip
    dims, comps, hooks, inputs = ssm
    if not c.mamba_rms_norm:
        comps = [comp for comp in comps if comp.name != "norm"]
        gated = ("y * silu(z); no gated norm (mamba_rms_norm is False)", "equals gated, the input of out_proj")
    elif c.mamba_norm_before_gate:
        gated = ("norm(y) * silu(z): the grouped RMS norm comes before the gate (mamba_norm_before_gate)",
                 "equals gated, the input of out_proj")  # fmt: skip
    else:
        gated = ("y * silu(z), before the gated RMS norm", "gated RMS norm output, the input of out_proj")
    what = {"in": "mixer input times ssm_in_multiplier, the input of in_proj", "gated": gated[0],
            "out_proj_in": gated[1]}  # fmt: skip
    hooks = tuple(replace(h, description=what[h.name]) if h.name in what else h for h in hooks)
    units = [{"ssm": "mamba", "attention": "self_attn", "mlp": "feed_forward"} for _ in range(c.num_hidden_layers)]
    others = [("attention", _attention_parts(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                             _attn_head_dim(c), c.attention_bias)),
              ("mlp", _mlp_parts("gated", c.intermediate_size))]  # fmt: skip
    return _registry("falcon_h1", (dims, comps, hooks, inputs), units, "model.layers", "model.final_layernorm",
                     others, c.embedding_multiplier, c.lm_head_multiplier, "model.rotary_emb",
                     ssm_multipliers=True)  # fmt: skip


def _zamba2(config) -> Registry:
    """Zamba2: Mamba-2 decoder layers (``mamba``) and hybrid layers: the shared transformer (attention
    ``shared_transformer.self_attn`` on ``concat(residual, input embeddings)``, MLP
    ``shared_transformer.feed_forward``), ``linear``, then a Mamba-2 decoder (``mamba_decoder.mamba``). Hybrid layer
    j uses memory block ``j % num_mem_blocks``: the layers of one block share its attention and MLP tensors."""
    c = config
    ssm = _mamba2_parts(c.hidden_size, c.n_mamba_heads, c.mamba_headdim, c.mamba_d_state, c.mamba_ngroups,
                        c.mamba_d_conv, c.add_bias_linear, True)  # fmt: skip
    units, shared, hybrid = [], [], 0
    for kind in c.layers_block_type:
        if kind == "hybrid":
            units.append({"ssm": "mamba_decoder.mamba", "attention": "shared_transformer.self_attn",
                          "mlp": "shared_transformer.feed_forward"})  # fmt: skip
            shared.append({"attention": hybrid % c.num_mem_blocks, "mlp": hybrid % c.num_mem_blocks})
            hybrid += 1
        else:
            units.append({"ssm": "mamba"})
            shared.append({})
    others = [("attention", _attention_parts(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                             c.attention_head_dim, False, c.attention_hidden_size)),
              ("mlp", _mlp_parts("gate_up", c.intermediate_size))]  # fmt: skip
    args = {"mask": "causal_mask", "layer": "layer_idx", "embeds": "original_hidden_states"}
    return _registry("zamba2", ssm, units, "model.layers", "model.final_layernorm", others,
                     rotary_path="model.rotary_emb" if c.use_mem_rope else None, shared=tuple(shared),
                     block_args=args, embeds_layers=tuple(c.hybrid_layer_ids))  # fmt: skip


FAMILIES = {"mamba": _mamba1, "falcon_mamba": _mamba1, "mamba2": _mamba2, "bamba": _bamba_like,
            "granitemoehybrid": _bamba_like, "nemotron_h": _nemotron_h, "jamba": _jamba, "falcon_h1": _falcon_h1,
            "zamba2": _zamba2}  # fmt: skip
"""model_type -> registry builder."""

_M1_FIELDS = {"N": "state_size", "out_bias": "use_bias", "n_layers": "num_hidden_layers"}
CONFIG_FIELDS = {
    "mamba": _M1_FIELDS,
    "falcon_mamba": _M1_FIELDS,
    "mamba2": {"N": "state_size", "H": "num_heads", "P": "head_dim", "expand": "expand", "out_bias": "use_bias",
               "n_layers": "num_hidden_layers"},
    "bamba": {"N": "mamba_d_state", "H": "mamba_n_heads", "P": "mamba_d_head", "expand": "mamba_expand",
              "out_bias": "mamba_proj_bias", "n_layers": "num_hidden_layers", "attn_layers": "attn_layer_indices"},
    "granitemoehybrid": {"N": "mamba_d_state", "H": "mamba_n_heads", "P": "mamba_d_head", "expand": "mamba_expand",
                         "out_bias": "mamba_proj_bias", "n_layers": "num_hidden_layers", "layer_types": "layer_types"},
    "nemotron_h": {"N": "ssm_state_size", "H": "mamba_num_heads", "P": "mamba_head_dim", "expand_hint": "expand",
                   "out_bias": "use_bias", "layer_types": "layers_block_type"},
    "jamba": {"N": "mamba_d_state", "out_bias": "mamba_proj_bias", "n_layers": "num_hidden_layers",
              "attn_period": "attn_layer_period", "attn_offset": "attn_layer_offset",
              "expert_period": "expert_layer_period", "expert_offset": "expert_layer_offset"},
    "falcon_h1": {"N": "mamba_d_state", "H": "mamba_n_heads", "P": "mamba_d_head", "ED": "mamba_d_ssm",
                  "out_bias": "projectors_bias", "n_layers": "num_hidden_layers"},
    "zamba2": {"N": "mamba_d_state", "H": "n_mamba_heads", "P": "mamba_headdim", "expand": "mamba_expand",
               "out_bias": "add_bias_linear", "n_layers": "num_hidden_layers", "layer_types": "layers_block_type"},
}  # fmt: skip
"""model_type -> role -> the config field holding it (transformers 5.24), what structured pruning and block removal
rewrite. Roles: ``N``, ``H``, ``P`` the SSM state size, heads and head dim; ``ED`` a field holding the inner width
itself (Falcon-H1's ``mamba_d_ssm``, which overrides ``mamba_expand``); ``expand`` a field the mixer builds its
width from as ``expand * hidden_size`` (an integer, so the width must stay a multiple of ``hidden_size``);
``expand_hint`` a width ratio the model does not read (Nemotron-H's mixer is ``mamba_num_heads * mamba_head_dim``
wide); ``out_bias`` the flag creating the mixer's ``out_proj`` bias (Zamba2's ``add_bias_linear`` also creates
``in_proj`` and MLP biases); layout: ``n_layers`` the layer count, ``layer_types`` a per-layer list of kinds,
``attn_layers`` the attention layers' indices (Bamba), ``attn_period`` / ``attn_offset`` and ``expert_period`` /
``expert_offset`` Jamba's periodic attention and MoE layers. Zamba2 derives ``mamba_headdim`` from
``mamba_expand * hidden_size / n_mamba_heads`` and ``hybrid_layer_ids`` from ``layers_block_type``."""


def build_registry(config) -> Registry:
    """Build the registry for a HF config of one of :data:`ARCHITECTURES`.

    Raises:
        ValueError: For any other ``model_type``, or a Mamba-2 config whose heads do not fill its inner width.
    """
    arch = getattr(config, "model_type", None)
    if arch == "mamba2":
        if int(config.expand * config.hidden_size) != config.num_heads * config.head_dim:
            raise ValueError(
                f"mamba2 config has expand*hidden_size={int(config.expand * config.hidden_size)} but "
                f"num_heads*head_dim={config.num_heads * config.head_dim}; they must be equal"
            )
    if arch not in FAMILIES:
        raise ValueError(f"unsupported model_type {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    return FAMILIES[arch](config)

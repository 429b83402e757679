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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce

import pandas as pd
import torch
from torch import nn

from .spec import SpecError

__all__ = ["ARCHITECTURES", "DEFAULT_EXCLUDE", "Component", "HookSpec", "Registry", "TensorSlice", "build_registry"]

ARCHITECTURES = ("mamba", "mamba2", "falcon_mamba")
DEFAULT_EXCLUDE = ("conv1d",)
"""Components kept dense unless asked for: the depthwise convolution has only K taps per channel."""


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
    """

    name: str
    description: str
    tensors: tuple[TensorSlice, ...]
    hook: str
    module: str | None = None


@dataclass(frozen=True)
class HookSpec:
    """A named activation of the instrumented mixer forward and its shape (legend letters plus B, L)."""

    name: str
    shape: str
    description: str


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


@dataclass(frozen=True)
class Registry:
    """Canonical components and hook points of every mixer layer of one model.

    Attributes:
        arch: ``"mamba"``, ``"mamba2"`` or ``"falcon_mamba"``.
        n_layers: Number of mixer layers.
        dims: Sizes by legend letter (``D``, ``ED``, ``N``, ``K``, and ``R`` or ``H``, ``P``, ``G``).
        components: Components of one mixer layer, in a fixed order.
        hooks: Hook points of one mixer layer, in forward order.
        input_hooks: Weight parameter -> hook point carrying that weight's input activations (what WANDA's
            ``||X_j||`` is measured on), e.g. ``{"in_proj.weight": "in", "out_proj.weight": "out_proj_in"}``.
        layers_path: Dotted path from the causal-LM model to the list of blocks.
        mixer_attr: Attribute of a block holding its mixer.
        final_norm_path: Dotted path from the causal-LM model to the norm applied after the last block.

    Example:
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
    mixer_attr: str = "mixer"
    final_norm_path: str = "backbone.norm_f"
    _by_name: dict[str, Component] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({c.name: c for c in self.components})

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    @property
    def hook_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hooks)

    def component(self, name: str) -> Component:
        """The component called ``name``; a :class:`SpecError` naming the allowed names otherwise."""
        if name not in self._by_name:
            raise SpecError(f"unknown component {name!r} for {self.arch}; allowed: {', '.join(self.component_names)}",
                            "component")  # fmt: skip
        return self._by_name[name]

    def packed_rows(self, param: str) -> dict[str, tuple[int, int]]:
        """Component name -> row range for a packed parameter, e.g. ``packed_rows("in_proj.weight")``."""
        return {c.name: t.rows for c in self.components for t in c.tensors if t.param == param and t.rows}

    def input_hook(self, param: str) -> str:
        """The hook point whose activation is the input of weight ``param`` (its channels = the weight's columns)."""
        if param not in self.input_hooks:
            raise ValueError(f"no input hook for {param!r}; weights with one: {', '.join(self.input_hooks)}")
        return self.input_hooks[param]

    def weights(self, name: str) -> tuple[TensorSlice, ...]:
        """The weight-matrix slices of component ``name``: those with an input hook point (linear rows and the
        depthwise conv's taps), what WANDA, magnitude and the schedules prune; biases, ``A_log``, ``D``,
        ``dt_bias`` and norms are never among them.

        Example:
            >>> [t.describe() for t in build_registry(tiny_config("mamba")).weights("dt")]
            ['x_proj.weight[0:8]', 'dt_proj.weight']
        """
        return tuple(t for t in self.component(name).tensors if t.param in self.input_hooks)

    @property
    def prunable_components(self) -> tuple[str, ...]:
        """Components with at least one weight-matrix slice, in registry order (Mamba-2: ``z, x, B, C, dt, conv1d,
        out_proj``; Mamba-1 / FalconMamba: ``x, z, conv1d, dt, B, C, out_proj``)."""
        return tuple(c.name for c in self.components if self.weights(c.name))

    def resolve(self, components=None, exclude=DEFAULT_EXCLUDE) -> tuple[str, ...]:
        """The components a pruner or schedule covers: ``components`` (default every prunable one) minus
        ``exclude``, in registry order.

        Raises:
            ValueError: For an unknown or non-prunable name, a component both asked for and excluded, or nothing
                left.

        Example:
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

    def weight_sizes(self, model: nn.Module, components=None) -> dict[tuple[int, str], int]:
        """Number of weight-matrix entries of every (layer, component), read from ``model``'s tensors
        (``components``: default every prunable one, ``conv1d`` included), layer-major in registry order."""
        names = self.resolve(components, exclude=())
        return {(layer, name): sum(t.get(self.mixer(model, layer)).numel() for t in self.weights(name))
                for layer in range(self.n_layers) for name in names}  # fmt: skip

    def check_layer(self, layer: int, field: str = "layer") -> int:
        """``layer`` if it is a layer of this model; else a :class:`SpecError` naming ``field``."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise SpecError(f"{layer!r} is out of range; allowed: 0..{self.n_layers - 1}", field)
        return layer

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The list of residual blocks (each ``hidden -> hidden + mixer(norm(hidden))``)."""
        return reduce(getattr, self.layers_path.split("."), model)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm between the last block and the LM head."""
        return reduce(getattr, self.final_norm_path.split("."), model)

    def mixer(self, model: nn.Module, layer: int) -> nn.Module:
        """The mixer module of ``layer``."""
        return getattr(self.blocks(model)[self.check_layer(layer)], self.mixer_attr)

    def tensors(self, model: nn.Module, layer: int, name: str) -> list[torch.Tensor]:
        """Views of the parameter rows owned by component ``name`` in ``layer`` (writes go to the model)."""
        mixer = self.mixer(model, layer)
        return [t.get(mixer) for t in self.component(name).tensors]

    def hook_point(self, model: nn.Module, layer: int, name: str) -> nn.Module:
        """The hook-point module carrying activation ``name`` in ``layer`` (model must be instrumented)."""
        if name not in self.hook_names:
            raise ValueError(f"unknown hook point {name!r} for {self.arch}; allowed: {', '.join(self.hook_names)}")
        mixer = self.mixer(model, layer)
        points = getattr(mixer, "hook_points", None)
        if points is None:
            raise ValueError("model is not instrumented; call sensitivity.instrument(model) first")
        return points[name]

    def table(self, model: nn.Module | None = None) -> pd.DataFrame:
        """One row per (layer, component, tensor): names, row/column ranges, shapes, layouts and hook points."""
        rows = []
        for layer in range(self.n_layers):
            mixer = self.mixer(model, layer) if model is not None else None
            for comp in self.components:
                for t in comp.tensors or (None,):
                    shape = tuple(t.get(mixer).shape) if (t is not None and mixer is not None) else None
                    rows.append(
                        {
                            "layer": layer,
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


def _mamba1(config) -> Registry:
    D, ED, N = config.hidden_size, config.intermediate_size, config.state_size
    R, K = int(config.time_step_rank), config.conv_kernel
    in_bias = getattr(config, "use_bias", False)
    conv_bias = getattr(config, "use_conv_bias", True)

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
    arch = config.model_type
    if arch == "falcon_mamba":
        comps += [
            Component("dt_norm", "weightless RMS norm on the Δ low-rank input", (), "dt_low", "dt_layernorm"),
            Component("B_norm", "weightless RMS norm on B", (), "B", "b_layernorm"),
            Component("C_norm", "weightless RMS norm on C", (), "C", "c_layernorm"),
        ]
    inputs = {"in_proj.weight": "in", "conv1d.weight": "x", "x_proj.weight": "u", "dt_proj.weight": "dt_low",
              "out_proj.weight": "out_proj_in"}  # fmt: skip
    dims = {"D": D, "ED": ED, "N": N, "R": R, "K": K}
    return Registry(arch, config.num_hidden_layers, dims, tuple(comps), _M1_HOOKS, inputs)


def _mamba2(config) -> Registry:
    D, H, P = config.hidden_size, config.num_heads, config.head_dim
    ED, N, G, K = int(config.expand * config.hidden_size), config.state_size, config.n_groups, config.conv_kernel
    in_bias = getattr(config, "use_bias", False)
    conv_bias = getattr(config, "use_conv_bias", True)
    bounds = {"z": (0, ED), "x": (ED, 2 * ED), "B": (2 * ED, 2 * ED + G * N), "C": (2 * ED + G * N, 2 * ED + 2 * G * N)}
    bounds["dt"] = (2 * ED + 2 * G * N, 2 * ED + 2 * G * N + H)
    layouts = {"z": ("H", "P"), "x": ("H", "P"), "B": ("G", "N"), "C": ("G", "N"), "dt": ("H",)}

    def in_rows(name: str) -> tuple[TensorSlice, ...]:
        weight = TensorSlice("in_proj.weight", bounds[name], layouts[name], col_layout=("D",))
        return (weight, TensorSlice("in_proj.bias", bounds[name], layouts[name])) if in_bias else (weight,)

    comps = (
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
            + ((TensorSlice("out_proj.bias", None, ("D",)),) if in_bias else ()),
            "out",
        ),
    )
    dims = {"D": D, "ED": ED, "N": N, "H": H, "P": P, "G": G, "K": K}
    inputs = {"in_proj.weight": "in", "conv1d.weight": "conv_in", "out_proj.weight": "out_proj_in"}
    return Registry("mamba2", config.num_hidden_layers, dims, comps, _M2_HOOKS, inputs)


def build_registry(config) -> Registry:
    """Build the registry for a HF Mamba, Mamba2 or FalconMamba config.

    Raises:
        ValueError: For any other ``model_type``.
    """
    arch = getattr(config, "model_type", None)
    if arch in ("mamba", "falcon_mamba"):
        return _mamba1(config)
    if arch == "mamba2":
        if int(config.expand * config.hidden_size) != config.num_heads * config.head_dim:
            raise ValueError(
                f"mamba2 config has expand*hidden_size={int(config.expand * config.hidden_size)} but "
                f"num_heads*head_dim={config.num_heads * config.head_dim}; they must be equal"
            )
        return _mamba2(config)
    raise ValueError(f"unsupported model_type {arch!r}; allowed: {', '.join(ARCHITECTURES)}")

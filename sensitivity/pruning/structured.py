"""SSM-structured pruning: remove whole states, heads or head channels from every SSM mixer layer.

Ghattas et al. (2025), "On Pruning State-Space LLMs", carry structured pruning over to Mamba's own units:

* ``state``: state dimension ``n`` of the SSM. Mamba-2: the B and C rows of ``in_proj`` that produce it in every
  B/C group (one index set shared by the groups, its score summed over them) and their ``conv1d`` channels.
  Mamba-1 / FalconMamba / Jamba: the B and C rows of ``x_proj``, column ``n`` of ``A_log`` and, on Jamba, entry
  ``n`` of the B and C RMS norm weights.
* ``head`` (Mamba-2 mixers): head ``h``: its z, x and dt rows of ``in_proj``, its x channels of ``conv1d``,
  ``A_log[h]``, ``D[h]``, ``dt_bias[h]``, its gated-norm weights and ``out_proj`` columns. Head ``h`` reads B/C group
  ``h // (H/G)`` and the gated RMS norm normalises over groups of ``ED/G`` channels, so the same number of heads
  goes from every group.
* ``headdim`` (Mamba-2 mixers): ``k`` of the ``P`` channels of every head (each head its own index set) in x and z rows,
  x conv channels, norm weights and ``out_proj`` columns.

Scores (the lowest go): ``taylor``, the second-order Taylor term with the empirical Fisher as Hessian diagonal,
``W**2 * E[g**2]`` per entry (LLM-Pruner, Ma et al. 2023); ``flap``, FLAP's fluctuation metric on the input
channels of ``out_proj`` (An et al., 2024, eq. 5); ``magnitude``, ``W**2``; ``random``, seeded.

A pruned model is either shrunk (smaller tensors, rewritten config; ``from_pretrained`` rebuilds it) or masked
(the units' parameters zeroed, shapes kept, for per-layer sparsities). Masked heads and channels compute what the
shrunk model computes because the gated norm weights are rescaled (up to the norm's epsilon, see
:func:`norm_factors`); so are Jamba's B and C RMS norm weights for masked states. FalconMamba's weightless RMS norms
on B and C average over all N states, so masked states there only approximate removed ones.

Hybrids (Bamba, Granite 4, Nemotron-H, Jamba, Falcon-H1, Zamba2) are pruned in their SSM layers only (the
``layers`` option narrows that further); attention, MLP and MoE units are untouched. ``head`` and ``headdim`` need
Mamba-2 mixers (every family but Mamba, FalconMamba and Jamba). Shrinking rewrites the family's own config fields
(:data:`~sensitivity.core.registry.CONFIG_FIELDS`): the state size, head count and head dim, and the inner width
where the config holds it: Mamba-2, Bamba, Granite and Zamba2 build it as ``expand * hidden_size`` with an integer
``expand``, so heads and head channels shrink only to a width that is a multiple of ``hidden_size`` (else they are
masked, or ``mode="shrink"`` says why not); Falcon-H1 holds it in ``mamba_d_ssm`` and Nemotron-H derives it from
``mamba_num_heads * mamba_head_dim`` (its ``expand`` is not read and is kept in step only when the ratio is an
integer), so those two always shrink. Heads and channels go in the same number from every SSM layer when the model
is shrunk, since each config holds one global head count and head dim.

Shape legend: D model width, ED inner channels, N state size, H heads, P head dim, G B/C groups, K conv kernel,
U units of one layer (N, H or ED).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import reduce

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..attribution import weight_scores
from ..core.hooks import hook_name
from ..core.instrumented import instrument, is_instrumented
from ..core.loading import LoadedModel, as_loaded
from ..core.registry import Registry, TensorSlice, build_registry
from ..core.removal import missing_unit
from ..core.spec import SpecError
from ..core.stats import channel_stats
from ..data import Windows
from ._config import derived_fields, rewrite_config
from .methods import _CALIBRATED_SCORES, METHODS, resolve

__all__ = [
    "UNITS",
    "applicable_units",
    "StructuredResult",
    "UnitIndex",
    "expand_value",
    "flap_bias",
    "flap_scores",
    "norm_factors",
    "prune_structured",
    "removal_counts",
    "select_lowest",
    "ssm_layers",
    "state_scores",
    "taylor_entries",
    "unit_index",
    "unit_totals",
]

logger = logging.getLogger(__name__)

UNITS = ("state", "head", "headdim")
"""The SSM units structured pruning removes: states, heads and head channels (``head``, ``headdim``: Mamba-2
mixers only)."""
# Components whose Fisher a head / head-channel Taylor score needs (every parameter the unit owns).
_TAYLOR_COMPONENTS = {
    "head": ("z", "x", "dt", "conv1d", "A_log", "D", "norm", "out_proj"),
    "headdim": ("z", "x", "conv1d", "norm", "out_proj"),
}
_PER_BLOCK = {"state": "states", "head": "heads per B/C group", "headdim": "channels per head"}

UnitIndex = dict[str, tuple[int, torch.Tensor]]
"""Parameter name (as in the mixer's ``state_dict``) -> (dim, (U, m) indices along dim owned by each unit)."""


@dataclass
class StructuredResult:
    """What :func:`prune_structured` did.

    Attributes:
        unit: ``state``, ``head`` or ``headdim``.
        score: The unit score used.
        mode: ``"shrink"`` (tensors physically smaller, config rewritten) or ``"mask"`` (units zeroed).
        removed: SSM layer -> removed unit indices (states n, heads h, or for headdim flat channels ``h*P + p``).
        n_units: Units per layer before pruning (N, H or P).
        params_before: Unique parameters before.
        params_after: Unique parameters after (fewer only when shrunk; masking keeps them, adding biases adds some).
        bias_compensation: Whether FLAP's bias compensation was applied.
        use_bias_added: Whether ``config.use_bias`` was switched on (with zero ``in_proj`` biases) to hold it.
        config_changes: Config field -> ``[before, after]``.
        mode_reason: Why this mode was used.
    """

    unit: str
    score: str
    mode: str
    removed: dict[int, list[int]]
    n_units: int
    params_before: int
    params_after: int
    bias_compensation: bool
    use_bias_added: bool = False
    config_changes: dict[str, list] = field(default_factory=dict)
    mode_reason: str = ""

    def to_dict(self) -> dict:
        """JSON-able copy (layer keys as strings), for the pruning manifest."""
        out = asdict(self)
        out["removed"] = {str(layer): list(units) for layer, units in self.removed.items()}
        return out


# --- pure functions -------------------------------------------------------------------------------------------


def removal_counts(n: int, sparsity: Sequence[float], what: str = "units", layers: Sequence[int] | None = None
                   ) -> list[int]:  # fmt: skip
    """Units to remove from each block of ``n``: ``int(n * s + 1e-9)`` per layer sparsity ``s`` (``layers``: the
    layer index of each value, for messages; default ``0, 1, ...``).

    Raises:
        ValueError: If a sparsity would remove all ``n``.

    Examples:
        >>> removal_counts(16, [0.25, 0.5])
        [4, 8]
    """
    counts = [int(n * s + 1e-9) for s in sparsity]
    for layer, s, k in zip(layers if layers is not None else range(len(counts)), sparsity, counts):
        if k >= n:
            raise SpecError(f"{s!r} removes all {n} {what} in layer {layer}; at most {n - 1} of {n} can go",
                            "sparsity")  # fmt: skip
    return counts


def select_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest scores of each row, ascending (ties go to the earlier position).

    Args:
        scores: (blocks, n) scores, e.g. (G, H/G) head scores, one row per B/C group.
        k: Units to remove per row.

    Returns:
        (blocks, k) int64 indices within each row.

    Examples:
        >>> select_lowest(torch.tensor([[3.0, 1.0, 2.0, 0.5]]), 2)
        tensor([[1, 3]])
    """
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # (blocks, k)
    return order.sort(dim=1).values


def taylor_entries(weight: torch.Tensor, fisher: torch.Tensor, n_windows: int) -> torch.Tensor:
    """Second-order Taylor saliency per entry, ``W**2 * E[g**2]`` with ``E[g**2] = fisher / n_windows``.

    Removing ``w`` changes the loss by ``-g w + w**2 H / 2``; at a minimum the first term averages out and the
    empirical Fisher stands in for the Hessian diagonal (LLM-Pruner's second-order term; the 1/2 is dropped).
    """
    return weight.detach().float().square() * fisher.float() / n_windows


def state_scores(b: torch.Tensor, c: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-state score from per-entry values of the B and C rows: the mean over each row, summed over B and C and
    over the B/C groups.

    Args:
        b: (G*N, cols) per-entry values of the B rows (``in_proj`` rows on Mamba-2, ``x_proj`` rows on Mamba-1).
        c: (G*N, cols) the same for the C rows.
        groups: G (1 on Mamba-1).

    Returns:
        (N,) scores.
    """
    per_row = b.float().mean(1) + c.float().mean(1)  # (G*N,)
    return per_row.view(groups, -1).sum(0)  # (N,)


def flap_scores(mean: torch.Tensor, meansq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric of each input channel j of a linear layer: ``Var(X_j) * ||W[:, j]||**2``.

    Args:
        mean: (C,) mean of the input channel over calibration tokens.
        meansq: (C,) mean of its square.
        weight: (D, C) the layer's weight.

    Returns:
        (C,) scores.
    """
    var = (meansq.float() - mean.float().square()).clamp_min(0)  # (C,)
    return var * weight.detach().float().square().sum(0)  # (C,)


def flap_bias(weight: torch.Tensor, mean: torch.Tensor, removed: Sequence[int]) -> torch.Tensor:
    """FLAP's bias compensation: the mean contribution of the removed input channels, ``W[:, R] @ mean[R]``.

    Args:
        weight: (D, C) weight of the layer whose input channels are removed.
        mean: (C,) mean of each input channel over calibration tokens.
        removed: Removed channel indices R.

    Returns:
        (D,) float32 vector to add to the layer's bias.
    """
    idx = torch.as_tensor(list(removed), dtype=torch.long, device=weight.device)
    return weight.detach().float()[:, idx] @ mean.float().to(weight.device)[idx]  # (D,)


def norm_factors(removed: Sequence[int], channels: int, groups: int) -> torch.Tensor:
    """Gated-norm weight factors ``sqrt((gs - r_g) / gs)`` that make zeroed channels equal removed ones.

    Mamba-2's gated RMS norm divides each group of ``gs = channels / groups`` channels by
    ``sqrt(mean(x**2) + eps)``; with ``r_g`` of them zeroed the mean over ``gs`` is ``(gs - r_g) / gs`` times the
    mean over the kept ones, which these factors undo (exactly up to ``eps``, which acts as ``eps * gs / (gs - r_g)``).

    Returns:
        (G,) float32 factors.
    """
    gs = channels // groups
    r = torch.bincount(torch.as_tensor(list(removed), dtype=torch.long) // gs, minlength=groups)  # (G,)
    return ((gs - r).float() / gs).sqrt()


def unit_totals(values: Mapping[str, torch.Tensor], index: Mapping[str, tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Sum of per-entry values over each unit's entries.

    Args:
        values: Parameter name -> per-entry values shaped like the parameter (e.g. ``W**2``).
        index: :data:`UnitIndex` of the unit; parameters missing from ``values`` are skipped.

    Returns:
        (U,) float32 totals.
    """
    total = None
    for name, (dim, idx) in index.items():
        if name not in values:
            continue
        v = values[name].float()
        per_position = v.sum([d for d in range(v.dim()) if d != dim]) if v.dim() > 1 else v  # (size along dim,)
        part = per_position[idx.to(v.device)].sum(1).cpu()  # (U,)
        total = part if total is None else total + part
    return total


def expand_value(inner: int, hidden: int) -> int | float:
    """The Mamba-2 ``expand`` for ``inner`` channels: ``inner // hidden`` when ``hidden`` divides ``inner``, else the
    smallest float with ``expand * hidden >= inner``, so ``int(expand * hidden_size)`` cannot round down to
    ``inner - 1``. That product equals ``inner`` exactly (as the config's ``hidden_size * expand ==
    num_heads * head_dim`` check needs) whenever any float gives it; for a few pairs none does (1009 / 1000)."""
    if inner % hidden == 0:
        return inner // hidden
    value = inner / hidden
    while value * hidden < inner:
        value = math.nextafter(value, math.inf)
    while math.nextafter(value, -math.inf) * hidden >= inner:
        value = math.nextafter(value, -math.inf)
    return value


def _row_start(reg: Registry, component: str, param: str) -> int:
    return next(t.rows[0] for t in reg.component(component).tensors if t.param == param)


def _params(reg: Registry) -> set[str]:
    return {t.param for c in reg.components for t in c.tensors}


def _mamba2_style(reg: Registry) -> bool:
    """Whether the model's SSM mixers are Mamba-2 (heads ``H`` of ``P`` channels, B/C groups)."""
    return "H" in reg.dims


def ssm_layers(reg: Registry) -> tuple[int, ...]:
    """The layers holding an SSM mixer (every layer of a pure Mamba model)."""
    return tuple(i for i in range(reg.n_layers) if "ssm" in reg.units[i])


def unit_index(reg: Registry, unit: str) -> UnitIndex:
    """Which entries of which parameters each unit owns, from the registry's row ranges and dims.

    Mamba-2 conv channels are ``[x | B | C]`` (``ED``, ``G*N``, ``G*N``), as the mixer splits them. Parameters are
    relative to the SSM mixer.

    Returns:
        Parameter name -> (dim, (U, m) indices): U = N (state), H (head) or ED (headdim, channel ``h*P + p``).

    Raises:
        SpecError: ``head`` or ``headdim`` on Mamba-1 mixers, naming the units they have.

    Examples:
        >>> dim, idx = unit_index(build_registry(tiny_config("mamba2")), "head")["out_proj.weight"]
        >>> dim, idx.shape
        (1, torch.Size([8, 16]))
    """
    d, params, out = reg.dims, _params(reg), {}

    def put(name: str, dim: int, idx: torch.Tensor) -> None:
        if name in params:
            out[name] = (dim, idx)

    if unit == "state":
        n = torch.arange(d["N"])[:, None]  # (N, 1)
        if not _mamba2_style(reg):
            b0, c0 = _row_start(reg, "B", "x_proj.weight"), _row_start(reg, "C", "x_proj.weight")
            put("x_proj.weight", 0, torch.cat([b0 + n, c0 + n], 1))  # (N, 2)
            put("A_log", 1, n)  # (N, 1)
            for norm in ("B_norm", "C_norm"):  # Jamba's weighted RMS norms over the N states of B and C
                for t in reg.component(norm).tensors if norm in reg.component_names else ():
                    put(t.param, 0, n)
            return out
        gn = torch.arange(d["G"])[None, :] * d["N"] + n  # (N, G): row g*N + n of a (G, N) block
        b0, c0 = _row_start(reg, "B", "in_proj.weight"), _row_start(reg, "C", "in_proj.weight")
        rows = torch.cat([b0 + gn, c0 + gn], 1)  # (N, 2G)
        conv = torch.cat([d["ED"] + gn, d["ED"] + d["G"] * d["N"] + gn], 1)  # (N, 2G)
        for name, idx in (("in_proj", rows), ("conv1d", conv)):
            put(f"{name}.weight", 0, idx)
            put(f"{name}.bias", 0, idx)
        return out
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; allowed: {', '.join(UNITS)}")
    if not _mamba2_style(reg):
        raise SpecError(f"{unit} pruning needs Mamba-2 mixers (heads); {reg.arch} mixers are Mamba-1; units "
                        f"{reg.arch} has: state", "method")  # fmt: skip
    z0, x0 = _row_start(reg, "z", "in_proj.weight"), _row_start(reg, "x", "in_proj.weight")
    if unit == "head":
        h = torch.arange(d["H"])[:, None]  # (H, 1)
        ch = h * d["P"] + torch.arange(d["P"])[None, :]  # (H, P)
        rows = torch.cat([z0 + ch, x0 + ch, _row_start(reg, "dt", "in_proj.weight") + h], 1)  # (H, 2P+1)
        for name in ("dt_bias", "A_log", "D"):
            put(name, 0, h)
    else:
        ch = torch.arange(d["ED"])[:, None]  # (ED, 1)
        rows = torch.cat([z0 + ch, x0 + ch], 1)  # (ED, 2)
    put("in_proj.weight", 0, rows)
    put("in_proj.bias", 0, rows)
    put("conv1d.weight", 0, ch)  # the x channels come first in the conv
    put("conv1d.bias", 0, ch)
    put("norm.weight", 0, ch)
    put("out_proj.weight", 1, ch)
    return out


# --- argument checks -----------------------------------------------------------------------------------------


def _targets(reg: Registry, layers) -> tuple[int, ...]:
    """The SSM layers to prune: ``layers`` (checked to hold an SSM mixer), or every SSM layer."""
    if layers is None:
        return ssm_layers(reg)
    for layer in layers:
        if "ssm" not in reg.units[reg.check_layer(layer, "options.layers")]:
            raise missing_unit(reg, layer, "ssm", "options.layers")
    return tuple(sorted(set(layers)))


def _per_layer(reg: Registry, sparsity, targets: tuple[int, ...], from_schedule: bool = False) -> dict[int, float]:
    """One validated sparsity for every target layer: from one value, one per layer of the model (non-target
    layers must hold 0, unless the values come from a schedule, whose attention and MLP layers are ignored), or one
    per target layer."""
    if isinstance(sparsity, float):
        return dict.fromkeys(targets, sparsity)
    values = list(sparsity)
    if len(values) == reg.n_layers:
        for layer, s in enumerate(values):
            if s and layer not in targets and not from_schedule:
                what = "holds no ssm unit" if layer not in ssm_layers(reg) else "is not in options.layers"
                raise SpecError(f"{s!r} for layer {layer}, which {what}; give 0 there or one value per pruned layer "
                                f"({', '.join(map(str, targets))})", f"sparsity.{layer}")  # fmt: skip
        return {layer: values[layer] for layer in targets}
    if len(values) == len(targets):
        return dict(zip(targets, values))
    also = f" or one per pruned SSM layer ({len(targets)})" if len(targets) != reg.n_layers else ""
    raise SpecError(f"{len(values)} values for a model of {reg.n_layers} layers; give one or one per layer{also}",
                    "sparsity")  # fmt: skip


def _blocks(reg: Registry, unit: str) -> tuple[int, int, str]:
    """(blocks per layer, units per block, what a unit is called): units are chosen within each block."""
    d = reg.dims
    if unit == "state":
        return 1, d["N"], "states"
    if unit == "head":
        what = f"heads of a B/C group (heads go group by group: {d['H']} heads in {d['G']} groups)"
        return d["G"], d["H"] // d["G"], what
    return d["H"], d["P"], "channels of a head"


# --- config ---------------------------------------------------------------------------------------------------


def _shrunk_dims(reg: Registry, unit: str, k: int) -> dict[str, int]:
    """The SSM sizes (``N``, and ``H``, ``P``, ``ED`` on Mamba-2) after ``k`` units go from every block."""
    d = reg.dims
    if unit == "state":
        return {"N": d["N"] - k}
    H, P = (d["H"] - k * d["G"], d["P"]) if unit == "head" else (d["H"], d["P"] - k)
    return {"N": d["N"], "H": H, "P": P, "ED": H * P}


def _config_changes(reg: Registry, dims: dict[str, int]) -> dict:
    """Config fields of the shrunk model with SSM sizes ``dims`` (the family's fields, ``Registry.config_fields``)."""
    fields, d, changes = reg.config_fields, reg.dims, {}
    for letter in ("N", "H", "P", "ED"):
        if letter in fields and letter in dims and dims[letter] != d[letter]:
            changes[fields[letter]] = dims[letter]
    if dims.get("ED", d.get("ED")) != d.get("ED"):
        if "expand" in fields:  # the mixer builds its width as int(expand * hidden_size)
            changes[fields["expand"]] = expand_value(dims["ED"], d["D"])
        if "expand_hint" in fields and dims["ED"] % d["D"] == 0:  # not read by the model: kept in step when it can
            changes[fields["expand_hint"]] = dims["ED"] // d["D"]
    return changes


def _shrink_problem(reg: Registry, config, dims: dict[str, int]) -> str | None:
    """Why a config with the SSM sizes ``dims`` would not rebuild the shrunk model through ``from_pretrained``
    (None if it would)."""
    changes = _config_changes(reg, dims)
    try:
        got = build_registry(rewrite_config(config, changes)).dims
    except Exception as e:  # strict HF configs raise huggingface_hub errors that are not ValueErrors
        reason = str(e).strip().splitlines()[-1].strip()
        hint, fields = "", reg.config_fields
        if isinstance(changes.get(fields.get("expand")), float):
            hint = (f"; {fields['H']}*{fields['P']} = {dims['ED']} is not a multiple of hidden_size "
                    f"{reg.dims['D']}, so {fields['expand']} is not an integer")  # fmt: skip
        return f"the shrunk config {changes} is rejected ({reason}){hint}"
    if wrong := [f"{k} {got.get(k)} instead of {v}" for k, v in dims.items() if got.get(k) != v]:
        return f"the shrunk config {changes} rebuilds mixers with {', '.join(wrong)}"
    return None


def _shrinkable(reg: Registry, config, unit: str, n: int) -> list[str]:
    """Sparsities (per block ``k / n``) whose uniform removal shrinks."""
    ok = [k for k in range(1, n) if _shrink_problem(reg, config, _shrunk_dims(reg, unit, k)) is None]
    return [f"{k / n:g}" for k in ok]


# --- scores ---------------------------------------------------------------------------------------------------


def _weight_slice(reg: Registry, component: str) -> TensorSlice:
    return next(t for t in reg.component(component).tensors if t.param.endswith("weight"))


def _full_fisher(reg: Registry, fisher: Mapping, layer: int, mixer: nn.Module) -> dict[str, torch.Tensor]:
    """Slice-shaped Fisher scores of ``layer`` written back into tensors shaped like whole parameters."""
    out: dict[str, torch.Tensor] = {}
    for (lay, comp, desc), f in fisher.items():
        if lay != layer:
            continue
        t = next(t for t in reg.component(comp).tensors if t.describe() == desc)
        full = out.setdefault(t.param, torch.zeros(mixer.get_parameter(t.param).shape, dtype=torch.float32))
        t.select(full).copy_(f)
    return out


def _scores(lm: LoadedModel, unit: str, score: str, windows, seed: int, batch_size: int, show_progress: bool,
            targets: tuple[int, ...]):  # fmt: skip
    """Per target layer: unit scores shaped (blocks, units per block), and out_proj input means (flap only)."""
    reg, module = lm.registry, lm.model
    kw = dict(batch_size=batch_size, show_progress=show_progress)
    gen = torch.Generator().manual_seed(seed) if score == "random" else None
    stats = fisher = None
    if score == "flap":
        names = {layer: hook_name(layer, "out_proj_in") for layer in targets}
        got = channel_stats(lm, windows, names.values(), **kw)
        stats = {layer: got[name] for layer, name in names.items()}
    elif score == "taylor":
        fisher = weight_scores(lm, windows, "fisher", components=taylor_components(unit), layers=targets, **kw)
    scores, means = {}, {}
    for layer in targets:
        scores[layer], means[layer] = layer_scores(reg, reg.mixer(module, layer), layer, unit, score, gen=gen,
                                                   stats=stats[layer] if stats else None, fisher=fisher,
                                                   n_windows=len(windows) if windows is not None else 0)  # fmt: skip
    return scores, (means if score == "flap" else None)


def taylor_components(unit: str) -> tuple[str, ...]:
    """The components whose Fisher a unit's Taylor score reads (every parameter the unit owns; B and C for states)."""
    return ("B", "C") if unit == "state" else _TAYLOR_COMPONENTS[unit]


def layer_scores(reg: Registry, mixer: nn.Module, layer: int, unit: str, score: str, *,
                 gen: torch.Generator | None = None, stats=None, fisher: Mapping | None = None,
                 n_windows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """One SSM layer's unit scores, (blocks, units per block), and its out_proj input mean (flap; else None).

    Args:
        reg: The model's registry.
        mixer: Layer ``layer``'s SSM mixer, its weights loaded.
        layer: The layer.
        unit: ``state``, ``head`` or ``headdim``.
        score: ``random`` (draws from ``gen``), ``magnitude``, ``flap`` (``stats``: the layer's
            :class:`~sensitivity.core.stats.ChannelStats` at ``out_proj_in``) or ``taylor`` (``fisher``: Fisher
            sums keyed ``(layer, component, slice)`` over ``n_windows`` windows, as :func:`weight_scores` returns).
    """
    blocks, n, _ = _blocks(reg, unit)
    if score == "random":
        return torch.rand(blocks, n, generator=gen), None
    if score == "flap":
        mean, meansq = stats.sum / stats.count, stats.sumsq / stats.count  # (ED,)
        out_w = _weight_slice(reg, "out_proj").get(mixer)  # (D, ED)
        channel = flap_scores(mean, meansq, out_w).cpu()  # (ED,)
        per_head = channel.view(reg.dims["H"], reg.dims["P"])  # (H, P)
        return (per_head.sum(1).view(blocks, n) if unit == "head" else per_head), mean  # (G, H/G) or (H, P)
    taylor = score == "taylor"
    if unit == "state":
        parts = []
        for comp in ("B", "C"):
            t = _weight_slice(reg, comp)
            w = t.get(mixer).detach()  # (G*N, D) or (N, ED)
            parts.append(taylor_entries(w, fisher[(layer, comp, t.describe())], n_windows) if taylor
                         else w.float().square())  # fmt: skip
        return state_scores(*parts, reg.dims.get("G", 1)).cpu().view(1, n), None
    index = unit_index(reg, unit)
    full = _full_fisher(reg, fisher, layer, mixer) if taylor else {}
    values = {}
    for name in index:
        w = mixer.get_parameter(name).detach()
        values[name] = taylor_entries(w, full[name].to(w.device), n_windows) if taylor else w.float().square()
    return unit_totals(values, index).view(blocks, n), None  # (blocks, n)


# --- applying -------------------------------------------------------------------------------------------------


def _channels(unit: str, removed: list[int], P: int) -> list[int]:
    """out_proj input channels of removed heads / head channels."""
    return [h * P + p for h in removed for p in range(P)] if unit == "head" else list(removed)


def _add_zero_biases(lm: LoadedModel) -> str:
    """Switch on the config flag creating the mixers' ``out_proj`` bias (``Registry.config_fields["out_bias"]``) and
    give every linear layer that flag creates a zero bias, so the model is what ``from_pretrained`` builds from the
    new config: Mamba-2's ``use_bias`` and Bamba's ``mamba_proj_bias`` create ``in_proj`` and ``out_proj`` biases,
    Zamba2's ``add_bias_linear`` also the MLP's (one shared bias where the weight is shared). Returns the flag."""
    module, config = lm.model, lm.model.config
    flag = lm.registry.config_fields["out_bias"]
    made: dict[int, nn.Parameter] = {}
    for name in bias_flag_params(module, flag):
        owner = module.get_submodule(name.rpartition(".")[0])
        if not (name.endswith(".bias") and isinstance(owner, nn.Linear)):
            raise RuntimeError(f"{flag}=True adds {name}, which is not a linear layer's bias")
        w = owner.weight
        if id(w) not in made:
            made[id(w)] = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                       requires_grad=w.requires_grad)  # fmt: skip
        owner.bias = made[id(w)]
    setattr(config, flag, True)
    lm.registry = build_registry(config)
    return flag


def bias_flag_params(module: nn.Module, flag: str) -> dict[str, torch.Size]:
    """The parameters (name -> shape) that switching the config's bias ``flag`` on adds to ``module``."""
    config = module.config
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(type(config).from_dict({**config.to_dict(), flag: True}))
    have = dict(module.named_parameters(remove_duplicate=False))
    return {n: p.shape for n, p in ref.named_parameters(remove_duplicate=False) if n not in have}


def _mask(lm: LoadedModel, unit: str, index: UnitIndex, removed: dict[int, list[int]]) -> None:
    for layer, units in removed.items():
        if units:
            mask_layer(lm.registry, lm.registry.mixer(lm.model, layer), unit, index, units)


def mask_layer(reg: Registry, mixer: nn.Module, unit: str, index: UnitIndex, units: list[int]) -> None:
    """Zero the removed ``units`` of one SSM mixer in place and rescale its norm weights to match removal."""
    rm = torch.as_tensor(units, dtype=torch.long)
    for name, (dim, idx) in index.items():
        p = mixer.get_parameter(name)
        p.index_fill_(dim, idx[rm].flatten().to(p.device), 0)
    d = reg.dims
    if unit != "state" and "norm" in reg.component_names:  # the gated norm's groups lose channels
        factors = norm_factors(_channels(unit, units, d["P"]), d["ED"], d["G"])  # (G,)
        w = _weight_slice(reg, "norm").get(mixer)  # (ED,)
        w.mul_(factors.repeat_interleave(d["ED"] // d["G"]).to(w.device, w.dtype))
    if unit == "state":  # Jamba's weighted RMS norms over the N states of B and C
        factor = float(norm_factors(units, d["N"], 1)[0])
        for norm in ("B_norm", "C_norm"):
            for t in reg.component(norm).tensors if norm in reg.component_names else ():
                t.get(mixer).mul_(factor)


def shrunk_state(state: Mapping[str, torch.Tensor], index: UnitIndex, units: list[int]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # fmt: skip
    """One mixer's ``state_dict`` without the removed ``units``: (the sliced state, parameter -> kept positions
    along its unit dim, for the parameters that lost entries)."""
    rm = torch.as_tensor(units, dtype=torch.long)
    keeps, out = {}, {}
    for name, tensor in state.items():
        if name in index:
            dim, idx = index[name]
            keep = torch.ones(tensor.shape[dim], dtype=torch.bool)
            keep[idx[rm].flatten()] = False
            keeps[name] = keep.nonzero().flatten()
            tensor = tensor.index_select(dim, keeps[name].to(tensor.device))
        out[name] = tensor
    return out, keeps


def _set_mixer(reg: Registry, module: nn.Module, layer: int, mixer: nn.Module) -> None:
    """Put ``mixer`` where layer ``layer`` holds its SSM mixer (``Registry.units``; nested on Zamba2)."""
    owner, _, attr = reg.units[layer]["ssm"].rpartition(".")
    block = reg.blocks(module)[layer]
    setattr(reduce(getattr, owner.split("."), block) if owner else block, attr, mixer)


def _new_mixer(base: type, config, layer: int) -> nn.Module:
    """A fresh HF mixer of class ``base`` for ``layer``, without its own weight initialisation where it takes
    ``initialize_mixer_weights``."""
    try:
        return base(config, layer_idx=layer, initialize_mixer_weights=False)
    except TypeError as e:
        if "initialize_mixer_weights" not in str(e):
            raise
        return base(config, layer_idx=layer)


def _shrink(lm: LoadedModel, index: UnitIndex, removed: dict[int, list[int]], changes: dict) -> None:
    """Rebuild every SSM mixer with the shrunk config from its kept parameter entries."""
    reg, module, config = lm.registry, lm.model, lm.model.config
    instrumented = is_instrumented(module)
    scan = getattr(reg.mixer(module, next(iter(removed))), "_sensitivity_scan", "auto")
    derived, fresh = derived_fields(config), rewrite_config(config, changes)
    for key in (*changes, *derived):  # the fields and what __post_init__ derives from them (Zamba2's head dim)
        setattr(config, key, getattr(fresh, key))
    for layer, units in removed.items():
        old = reg.mixer(module, layer)
        state, keeps = shrunk_state(old.state_dict(), index, units)
        base = next(c for c in type(old).__mro__ if c.__module__.startswith("transformers."))  # under instrumented
        # Some HF mixers (FalconMamba, transformers 5.24 and 5.25) fail when asked to initialise their weights
        # themselves; they are overwritten anyway, and the nn.Linear init runs under a forked RNG so the caller's
        # stream is kept. The flag is passed, not looked up: 5.25 wraps __init__ (kernels) and hides its signature.
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            new = _new_mixer(base, config, layer)
        new.load_state_dict(state, strict=True, assign=True)
        old_params, old_buffers = dict(old.named_parameters()), dict(old.named_buffers())
        for name, p in new.named_parameters():
            p.requires_grad_(old_params[name].requires_grad)
        new_buffers = dict(new.named_buffers())
        for name, buf in list(new_buffers.items()):  # FalconMamba's dummy norm weights: device and dtype as before
            ref = old_buffers.get(name, buf)
            owner, _, attr = name.rpartition(".")
            dtype = ref.dtype if buf.is_floating_point() else buf.dtype
            new.get_submodule(owner)._buffers[attr] = buf.to(device=ref.device, dtype=dtype)
        for name, buf in old_buffers.items():  # buffers the model gives its mixers (Falcon-H1's mup_vector)
            if name in new_buffers:
                continue
            if "." in name or buf.shape[-1] != old.in_proj.out_features:
                raise RuntimeError(f"cannot carry buffer {name} {tuple(buf.shape)} of layer {layer}'s mixer over")
            rows = keeps.get("in_proj.weight")  # the buffer scales in_proj's rows
            kept = buf if rows is None else buf.index_select(-1, rows.to(buf.device))
            new.register_buffer(name, kept, persistent=False)
        new.train(old.training)
        _set_mixer(reg, module, layer, new)
    if instrumented:
        instrument(module, scan=scan)


def prune_structured(
    model: LoadedModel | nn.Module,
    unit: str,
    sparsity: float | Sequence[float],
    *,
    windows: Windows | None = None,
    seed: int = 0,
    batch_size: int = 8,
    show_progress: bool = True,
    **options,
) -> StructuredResult:
    """Remove SSM states, heads or head channels from every SSM mixer layer, in place (Ghattas et al., 2025).

    Per layer, ``k = int(units * s + 1e-9)`` units with the lowest scores go: states out of N; heads out of the
    ``H/G`` of each B/C group (``k`` per group, ``G*k`` per layer); head channels out of the P of each head (``k``
    per head). With the same count in every SSM layer the model is shrunk: tensors are sliced, ``config`` (shared by
    the model) gets the family's new state size / head count / head dim and width fields
    (:data:`~sensitivity.core.registry.CONFIG_FIELDS`), every mixer is rebuilt as its HF class and re-instrumented,
    and ``save_pretrained`` / ``from_pretrained`` round-trips. Otherwise units are masked: their parameters are
    zeroed (conv weight and bias included, so their outputs are exactly zero) and the gated-norm weights rescaled
    (:func:`norm_factors`). FLAP's bias compensation adds ``W[:, R] @ mean(X_R)`` to ``out_proj.bias``; a model
    without that bias gets the family's bias flag switched on (``use_bias``, ``mamba_proj_bias``,
    ``projectors_bias``, ``add_bias_linear``) with zero biases wherever the flag creates them. On hybrids only the
    SSM layers are pruned.

    Args:
        model: A ``LoadedModel`` or HF causal LM of one of the registry's architectures (instrumented for
            ``taylor`` and ``flap``). Modified in place; forward hooks on its mixers are dropped when shrinking.
        unit: ``"state"``, ``"head"`` or ``"headdim"`` (the last two on Mamba-2 mixers only).
        sparsity: Fraction of units to remove, in [0, 1): one float for every SSM layer, one per layer of the model
            (0 in layers without an SSM mixer) or one per pruned SSM layer.
        windows: Calibration windows (n, L); needed by ``taylor`` and ``flap``.
        seed: Seed of the random scores.
        batch_size: Windows per forward for FLAP's statistics.
        show_progress: Show tqdm bars.
        **options: The unit's options (:class:`StateOptions`, :class:`HeadOptions`): ``score`` (default
            ``taylor`` for states, ``flap`` else; ``taylor``: ``sum W**2 E[g**2]`` over the unit's entries (states:
            mean over each B and C row); ``magnitude``: the same with ``W**2``; ``flap``: ``Var(X_j)
            ||W_out[:, j]||**2`` summed over the unit's out_proj input channels; ``random``: uniform, from
            ``torch.Generator().manual_seed(seed)``), ``mode`` (``"auto"``: shrink when every SSM layer removes the
            same count and the config can express it, else mask; ``"shrink"``; ``"mask"``. Mamba-2, Bamba, Granite
            and Zamba2 build the mixer width as an integer ``expand`` times ``hidden_size``, so heads and head
            channels shrink only when the new ``heads * head_dim`` is a multiple of ``hidden_size``), ``layers``
            (the SSM layers to prune; default all) and, for heads and head channels, ``bias_compensation``
            (FLAP's, with ``score="flap"`` only).

    Returns:
        A :class:`StructuredResult`.

    Raises:
        SpecError: Unknown unit or option; head units on Mamba-1 mixers; a layer in ``layers`` without an SSM
            mixer (naming the layers with one); a sparsity outside [0, 1), of the wrong length, or removing every
            unit of a layer / group / head; missing windows for ``taylor`` or ``flap``; ``mode="shrink"`` with
            differing per-layer counts or a shape the config cannot hold.

    Examples:
        >>> lm = load_model("tiny:mamba2")
        >>> result = prune_structured(lm, "state", 0.25, windows=windows)
        >>> result.mode, lm.model.config.state_size
        ('shrink', 12)
    """
    lm = as_loaded(model)
    entry, opts, request = resolve(lm, unit, options, sparsity=sparsity, schedule=None, windows=windows, seed=seed,
                                   batch_size=batch_size)  # fmt: skip
    if entry.info.get("unit") != unit:
        raise SpecError(f"{unit!r} is not a structured unit; allowed: {', '.join(UNITS)}", "method")
    return _structured(lm, unit, opts, request.sparsity, windows, seed, request.batch_size, show_progress)


@dataclass
class StructuredPlan:
    """What a structured pruning run will remove, decided from the config and the request alone (no weights read):
    see :func:`plan_structured`.

    Attributes:
        unit, score: The unit and its score.
        mode: ``"shrink"`` or ``"mask"``; ``reason``: why.
        counts: SSM layer -> units removed per block (0 in SSM layers not pruned).
        targets: The layers that lose units, ascending.
        blocks, n: Blocks per layer and units per block (units are chosen within each block).
        n_units: Units per layer (N, H or P).
        dims: The SSM sizes after shrinking (None when masking); ``changes``: the config fields they rewrite.
        bias: Whether FLAP's bias compensation is applied.
    """

    unit: str
    score: str
    mode: str
    reason: str
    counts: dict[int, int]
    targets: tuple[int, ...]
    blocks: int
    n: int
    n_units: int
    dims: dict[str, int] | None
    changes: dict
    bias: bool

    def select(self, layer: int, scores: torch.Tensor) -> list[int]:
        """The removed units of ``layer`` from its (blocks, n) scores: the lowest of each block, as flat indices."""
        idx = select_lowest(scores, self.counts[layer]) + self.n * torch.arange(self.blocks)[:, None]  # (blocks, k)
        return idx.flatten().tolist()


def plan_structured(lm: LoadedModel, unit: str, opts, sparsity, from_schedule: bool = False) -> StructuredPlan:
    """Decide what :func:`prune_structured` removes and how (shrink or mask), from the config alone.

    Raises:
        SpecError: As :func:`prune_structured`.
    """
    reg = lm.registry
    score, mode, bias_compensation = opts.score, opts.mode, getattr(opts, "bias_compensation", False)
    unit_index(reg, unit)  # SpecError for heads on Mamba-1 mixers
    targets = _targets(reg, opts.layers)
    if score in _CALIBRATED_SCORES:
        as_loaded(lm, instrumented=True)  # ValueError naming the fix
    per_layer = _per_layer(reg, sparsity, targets, from_schedule)
    blocks, n, what = _blocks(reg, unit)
    counts = dict.fromkeys(ssm_layers(reg), 0)  # per block, in every SSM layer
    counts.update(zip(per_layer, removal_counts(n, list(per_layer.values()), what, list(per_layer))))
    n_units = {"state": reg.dims["N"], "head": reg.dims.get("H"), "headdim": reg.dims.get("P")}[unit]
    uniform = len(set(counts.values())) == 1
    k0 = next(iter(counts.values()))

    dims = None
    if mode == "mask":
        reason = "mode='mask' was asked for"
    elif not uniform:
        if mode == "shrink":
            raise SpecError(f"'shrink' needs the same number of units removed in every SSM layer, got per-layer "
                            f"counts {list(counts.values())}; use 'mask' or 'auto'", "options.mode")  # fmt: skip
        mode, reason = "mask", f"per-layer counts {list(counts.values())} differ, so the layers cannot share one config"
    elif k0 == 0:
        mode, reason = "shrink", "nothing to remove"
    else:
        dims = _shrunk_dims(reg, unit, k0)
        problem = _shrink_problem(reg, lm.model.config, dims)
        if problem is None:
            mode, reason = "shrink", f"{k0} {_PER_BLOCK[unit]} removed in every SSM layer"
            hint = reg.config_fields.get("expand_hint")
            if hint and "ED" in dims and dims["ED"] % reg.dims["D"]:  # Nemotron-H's expand cannot follow
                reason += (f"; {hint} (not read by the model) stays {getattr(lm.model.config, hint)}: "
                           f"{dims['ED']} channels are not a multiple of hidden_size {reg.dims['D']}")  # fmt: skip
        elif mode == "shrink":
            allowed = _shrinkable(reg, lm.model.config, unit, n)
            raise SpecError(f"cannot shrink: {problem}; sparsities that shrink this model: "
                            f"{', '.join(allowed) or 'none'}; use 'mask' for others", "options.mode")  # fmt: skip
        else:
            mode, reason, dims = "mask", problem, None
    logger.info("%s pruning by %s: mode %s (%s)", unit, score, mode, reason)
    weightless = "B_norm" in reg.component_names and not reg.component("B_norm").tensors
    if mode == "mask" and unit == "state" and weightless and any(counts.values()):
        logger.warning("masked states on %s only approximate removed ones: its weightless B/C RMS norms still "
                       "average over all %d states", reg.arch, reg.dims["N"])  # fmt: skip
    return StructuredPlan(unit, score, mode, reason, counts, tuple(layer for layer in targets if counts[layer]),
                          blocks, n, n_units, dims, _config_changes(reg, dims) if dims is not None else {},
                          score == "flap" and bias_compensation)  # fmt: skip


def _structured(lm: LoadedModel, unit: str, opts, sparsity, windows, seed: int, batch_size: int,
                show_progress: bool, from_schedule: bool = False) -> StructuredResult:  # fmt: skip
    reg = lm.registry
    plan = plan_structured(lm, unit, opts, sparsity, from_schedule)
    params_before = lm.n_params
    removed: dict[int, list[int]] = {layer: [] for layer in ssm_layers(reg)}
    if not plan.targets:
        return StructuredResult(unit, plan.score, plan.mode, removed, plan.n_units, params_before, params_before,
                                False, mode_reason=plan.reason)  # fmt: skip
    scores, means = _scores(lm, unit, plan.score, windows, seed, batch_size, show_progress, plan.targets)
    for layer in plan.targets:
        removed[layer] = plan.select(layer, scores[layer])

    before = {key: getattr(lm.model.config, key) for key in plan.changes}
    bias_flag = None
    with torch.no_grad():
        if plan.bias:
            comps = {layer: compensation(reg, reg.mixer(lm.model, layer), unit, units, means[layer])
                     for layer, units in removed.items() if units}  # fmt: skip
            if reg.mixer(lm.model, plan.targets[0]).out_proj.bias is None:
                bias_flag = _add_zero_biases(lm)
            for layer, comp in comps.items():
                b = lm.registry.mixer(lm.model, layer).out_proj.bias
                b.add_(comp.to(b.device, b.dtype))
        index = unit_index(lm.registry, unit)
        if plan.mode == "mask":
            _mask(lm, unit, index, removed)
        else:
            _shrink(lm, index, removed, plan.changes)
    lm.registry = build_registry(lm.model.config)
    config_changes = {key: [value, getattr(lm.model.config, key)] for key, value in before.items()}
    if bias_flag is not None:
        config_changes[bias_flag] = [False, True]
    return StructuredResult(unit, plan.score, plan.mode, removed, plan.n_units, params_before, lm.n_params,
                            plan.bias, bias_flag is not None, config_changes, plan.reason)  # fmt: skip


def compensation(reg: Registry, mixer: nn.Module, unit: str, units: list[int], mean: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation of one mixer's ``out_proj`` for the removed ``units`` (before they are removed)."""
    out_w = _weight_slice(reg, "out_proj").get(mixer)  # (D, ED)
    return flap_bias(out_w, mean, _channels(unit, units, reg.dims["P"]))  # (D,)




def _implement(unit: str) -> None:
    def apply(lm, opts, *, sparsity, schedule, windows, seed, batch_size, show_progress):
        if schedule is not None:
            schedule.validate(lm.registry)
            sparsity = tuple(schedule.per_layer())
        result = _structured(lm, unit, opts, sparsity, windows, seed, batch_size, show_progress,
                             from_schedule=schedule is not None)  # fmt: skip
        return schedule, result.to_dict()

    METHODS.implement(unit)(apply)


for _unit in UNITS:
    _implement(_unit)


def applicable_units(registry: Registry) -> tuple[str, ...]:
    """The structured units a model of this architecture can lose."""
    return tuple(u for u in METHODS.names(registry.arch) if METHODS[u].info.get("unit") == u)

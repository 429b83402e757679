"""Greedy removal of whole blocks (Mamba-Shedder) or of one unit kind from blocks, by measured damage.

Mamba-Shedder (Muñoz et al., 2025) removes the blocks of an SSM model whose removal hurts least, one at a time: at
each step every remaining candidate is removed in turn on top of those already gone, the mean next-token loss on
the calibration windows is measured, and the cheapest goes. ``unit="block"`` removes whole blocks (block output :=
block input, through the ``block_in`` / ``block_out`` hook points); ``unit="ssm"``, ``"attention"`` or ``"mlp"``
removes only that unit from the blocks holding it (its output := 0, at ``out``, ``attn_out``, ``mlp_out``). Losses
come from the :class:`~sensitivity.core.runner.LayerRunner`, which reruns only the blocks from the candidate on.

Saving:

* Removed blocks are removed from the model: its config's layer layout is rewritten (the family's
  ``Registry.config_fields``: ``num_hidden_layers``, and ``attn_layer_indices`` (Bamba), ``layer_types`` (Granite),
  ``layers_block_type`` (Nemotron-H, Zamba2) or Jamba's ``attn_layer_period`` / ``attn_layer_offset`` and
  ``expert_layer_period`` / ``expert_layer_offset``), the model is rebuilt from that config with the kept blocks'
  tensors under renumbered state-dict keys, and ``save_pretrained`` writes an ordinary checkpoint. Blocks whose
  removal the config cannot express are never candidates: on Jamba, those leaving attention or MoE layers that are
  not periodic; on Zamba2, the hybrid layers (their shared transformer blocks hold one LoRA adapter per hybrid layer
  and cycle through ``num_mem_blocks``, so a removed hybrid layer would shift every later one's weights).
* A removed unit is saved by zeroing its output projection (and its bias): ``out_proj`` of an SSM mixer, ``o_proj``
  of an attention, the MLP's down projection (``down_proj``; Granite's ``output_linear``); the block's residual
  then carries nothing from it, as with the hook. The tensors stay (the model keeps its shapes). Zamba2's shared
  attention and MLP are removed from every layer sharing them at once (one candidate per memory block).

Shape legend: n windows, L sequence length, D model width.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ..core.hooks import hooks
from ..core.instrumented import instrument
from ..core.loading import LoadedModel, as_loaded
from ..core.registry import Registry, build_registry
from ..core.removal import removal_hooks
from ..core.runner import LayerRunner
from ..core.spec import SpecError
from ..data import Windows
from ._config import rewrite_config
from .methods import METHODS, BlockOptions, resolve

__all__ = ["OUTPUT_COMPONENTS", "BlocksResult", "layout_changes", "periodic", "prune_blocks"]

logger = logging.getLogger(__name__)

OUTPUT_COMPONENTS = {"ssm": "out_proj", "attention": "o", "mlp": "down"}
"""Unit kind -> the registry component whose zeroed tensors remove the unit from a saved checkpoint."""

Candidate = tuple[int, ...]
"""Layers removed together: one block, or the layers sharing one unit's tensors (Zamba2)."""


@dataclass
class BlocksResult:
    """What :func:`prune_blocks` did.

    Attributes:
        unit: ``"block"``, ``"ssm"``, ``"attention"`` or ``"mlp"``.
        removed: The candidates removed, in removal order (original layer indices; several for a shared unit).
        steps: Per step: the candidate ``removed``, the ``loss`` after removing it, its ``damage`` (loss increase
            over the step before) and every candidate's ``damages`` (``"3"`` or ``"1,3"`` -> loss increase), plus
            the candidates ``excluded`` at that step and why.
        dense_loss: Mean next-token NLL (nats/token) on the calibration windows before removal.
        loss: The same after the last step.
        n_layers_before: Layers before.
        n_layers_after: Layers after (fewer only for ``unit="block"``).
        saved_as: How the removal is held by the model (and so by its checkpoint).
        config_changes: Config field -> ``[before, after]``.
        zeroed: The parameters zeroed (unit removal), by name in the model (``model.layers.1.self_attn.o_proj.weight``;
            a shared tensor once).
        excluded: Candidates never considered, and why.
    """

    unit: str
    removed: list[list[int]]
    steps: list[dict]
    dense_loss: float
    loss: float
    n_layers_before: int
    n_layers_after: int
    saved_as: str
    config_changes: dict[str, list] = field(default_factory=dict)
    zeroed: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able copy, for the pruning manifest."""
        return {"method": "blocks", **asdict(self)}


# --- layouts --------------------------------------------------------------------------------------------------


def periodic(flags: Sequence[bool]) -> tuple[int, int] | None:
    """The smallest ``(period, offset)`` with ``flags[j] == (j % period == offset)`` for every ``j``, or None.

    Examples:
        >>> periodic([False, True, False, True]), periodic([False, False, True]), periodic([False, True, True])
        ((2, 1), (3, 2), None)
    """
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all((j % period == offset) == bool(f) for j, f in enumerate(flags)):
                return period, offset
    return None


def layout_changes(reg: Registry, config, keep: Sequence[int]) -> dict:
    """Config fields of the model holding only blocks ``keep`` (in order), from ``Registry.config_fields``.

    Raises:
        SpecError: If the family's config cannot express that layout (Jamba's periodic attention / MoE layers).

    Examples:
        >>> layout_changes(build_registry(tiny_config("bamba")), tiny_config("bamba"), [0, 1, 3])
        {'num_hidden_layers': 3, 'attn_layer_indices': [1]}
    """
    fields, out = reg.config_fields, {}
    if "n_layers" in fields:
        out[fields["n_layers"]] = len(keep)
    if "layer_types" in fields:
        kinds = list(getattr(config, fields["layer_types"]))
        out[fields["layer_types"]] = [kinds[i] for i in keep]
    if "attn_layers" in fields:
        attention = set(getattr(config, fields["attn_layers"]) or ())
        out[fields["attn_layers"]] = [j for j, i in enumerate(keep) if i in attention]
    for role, unit in (("attn", "attention"), ("expert", "moe")):
        if f"{role}_period" not in fields:
            continue
        flags = [unit in reg.units[i] for i in keep]
        found = periodic(flags)
        if found is None:
            having = [j for j, f in enumerate(flags) if f]
            raise SpecError(f"the kept blocks would hold {unit} units at layers {having}, which {reg.arch}'s "
                            f"{fields[role + '_period']} / {fields[role + '_offset']} cannot express (not periodic)",
                            "options.layers")  # fmt: skip
        out[fields[f"{role}_period"]], out[fields[f"{role}_offset"]] = found
    return out


def _layout_problem(reg: Registry, config, keep: Sequence[int]) -> str | None:
    """Why a checkpoint holding only blocks ``keep`` cannot be written (None if it can)."""
    try:
        changes = layout_changes(reg, config, keep)
    except SpecError as e:
        return e.detail
    rebuilt = build_registry(rewrite_config(config, changes))
    if rebuilt.units != tuple(reg.units[i] for i in keep):
        return f"the rewritten config {changes} lays out other blocks"
    return None


def _shared_problem(reg: Registry, layer: int) -> str | None:
    """Why block ``layer`` cannot be removed from a checkpoint because it holds shared units (None if not)."""
    shared = reg.shared[layer]
    if not shared:
        return None
    kinds = ", ".join(sorted(shared))
    layers = [i for i in range(reg.n_layers) if reg.shared[i] == shared]
    return (
        f"layer {layer}'s {kinds} weights are shared with layers {', '.join(map(str, layers))} (one LoRA adapter "
        f"per layer and memory blocks assigned in layer order), so {reg.arch} cannot save the model without it"
    )


# --- candidates -----------------------------------------------------------------------------------------------


def _candidates(reg: Registry, unit: str, layers) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates (one block or one shared unit each) and those never removable, with why."""
    asked = None if layers is None else sorted({reg.check_layer(i, "options.layers") for i in layers})
    excluded: dict[str, str] = {}
    if unit == "block":
        out = []
        for layer in asked if asked is not None else range(reg.n_layers):
            problem = _shared_problem(reg, layer)
            if problem is None:
                out.append((layer,))
            elif asked is not None:
                removable = [i for i in range(reg.n_layers) if _shared_problem(reg, i) is None]
                raise SpecError(f"{problem}; removable blocks: {', '.join(map(str, removable)) or 'none'}",
                                "options.layers")  # fmt: skip
            else:
                excluded[str(layer)] = problem
        return out, excluded
    having = [i for i in range(reg.n_layers) if unit in reg.units[i]]
    if not having:
        kinds = sorted({k for u in reg.units for k in u}, key=("ssm", "attention", "mlp", "moe").index)
        raise SpecError(f"{reg.arch} models hold no {unit} unit; their layers hold: {', '.join(kinds)}",
                        "options.unit")  # fmt: skip
    for layer in asked or ():
        try:
            removal_hooks(reg, layer, unit)  # SpecError naming the layers with one
        except SpecError as e:
            raise e.within("options") from None
    comp = OUTPUT_COMPONENTS[unit]
    groups = dict.fromkeys(reg.sharing(layer, comp) for layer in (asked if asked is not None else having))
    return list(groups), excluded


def _label(candidate: Candidate) -> str:
    return ",".join(map(str, candidate))


# --- measuring ------------------------------------------------------------------------------------------------


def _hooks_from(reg: Registry, unit: str, removed: Sequence[Candidate], start: int) -> dict:
    """Removal hooks of ``removed`` in the layers from ``start`` on (a forward from ``start`` fires only those)."""
    out = {}
    for candidate in removed:
        for layer in candidate:
            if layer >= start:
                out.update(removal_hooks(reg, layer, unit))
    return out


def _greedy(lm: LoadedModel, unit: str, candidates: list[Candidate], k: int, windows: Windows, batch_size: int,
            show_progress: bool) -> tuple[list[Candidate], list[dict], float, float]:  # fmt: skip
    """Remove ``k`` candidates, cheapest measured damage first. Returns (removed, steps, dense loss, final loss)."""
    reg = lm.registry
    runner = LayerRunner(lm, windows, batch_size)
    removed: list[Candidate] = []
    stream = runner.stream()  # n_layers + 1 of (n, L, D)
    dense = loss = runner.loss(stream[-1], reg.n_layers)[0]
    steps = []
    bar = tqdm(total=k, desc=f"blocks ({unit})", disable=not show_progress, unit="step")
    for step in range(k):
        left = [c for c in candidates if c not in removed]
        excluded = {}
        if unit == "block":
            kept = [i for i in range(reg.n_layers) if all(i not in c for c in removed)]
            for c in list(left):
                problem = _layout_problem(reg, lm.model.config, [i for i in kept if i not in c])
                if problem is not None:
                    excluded[_label(c)] = problem
                    left.remove(c)
        if not left:
            raise SpecError(f"step {step + 1} of {k}: no removable candidate left ({_describe(excluded)}); ask for "
                            f"fewer (n_blocks <= {step})", "options.n_blocks")  # fmt: skip
        damages = {}
        for c in left:
            start = min(c)
            fns = _hooks_from(reg, unit, removed, start)
            for layer in c:
                fns.update(removal_hooks(reg, layer, unit))
            with hooks(lm, fns):
                damages[c] = runner.loss(stream[start], start)[0] - loss
        best = min(left, key=lambda c: (damages[c], c))
        removed.append(best)
        with hooks(lm, _hooks_from(reg, unit, removed, 0)):
            stream = runner.stream()
        new_loss = runner.loss(stream[-1], reg.n_layers)[0]
        steps.append({"step": step + 1, "removed": list(best), "loss": new_loss, "damage": new_loss - loss,
                      "damages": {_label(c): d for c, d in damages.items()}, "excluded": excluded})  # fmt: skip
        logger.info("blocks step %d: removed %s %s (damage %.4g nats/token, loss %.4g)", step + 1, unit,
                    _label(best), new_loss - loss, new_loss)  # fmt: skip
        loss = new_loss
        bar.update()
    bar.close()
    return removed, steps, dense, loss


def _describe(excluded: dict[str, str]) -> str:
    return "; ".join(f"{c}: {why}" for c, why in excluded.items()) or "none"


# --- applying -------------------------------------------------------------------------------------------------


def _zero_units(lm: LoadedModel, unit: str, removed: Sequence[Candidate]) -> list[str]:
    """Zero the output projection (weight and bias) of ``unit`` in every removed layer; the tensors zeroed."""
    reg, comp, done, names = lm.registry, OUTPUT_COMPONENTS[unit], set(), []
    for candidate in removed:
        for layer in candidate:
            owner = reg.owner(lm.model, layer, comp)
            for t in reg.component(comp).tensors:
                linear = owner.get_submodule(t.param.rpartition(".")[0])
                for name, p in (("weight", linear.weight), ("bias", linear.bias)):
                    if p is None or id(p) in done:
                        continue
                    done.add(id(p))
                    p.data.zero_()
                    names.append(f"{reg.layers_path}.{layer}.{reg.units[layer][unit]}.{t.param.rpartition('.')[0]}"
                                 f".{name}")  # fmt: skip
    return names


def _drop_blocks(lm: LoadedModel, removed: Sequence[Candidate]) -> dict[str, list]:
    """Rebuild the model without the removed blocks: the rewritten config, the kept tensors under renumbered keys,
    in place (the model object stays the same). Returns the config changes."""
    reg, old = lm.registry, lm.model
    gone = {i for c in removed for i in c}
    keep = [i for i in range(reg.n_layers) if i not in gone]
    changes = layout_changes(reg, old.config, keep)
    config = rewrite_config(old.config, changes)
    new_index = {i: j for j, i in enumerate(keep)}
    prefix = reg.layers_path + "."

    def rename(key: str) -> str | None:
        """The model's key ``key`` in the rebuilt model (None for the removed blocks' tensors)."""
        if not key.startswith(prefix):
            return key
        index, _, rest = key[len(prefix) :].partition(".")
        return f"{prefix}{new_index[int(index)]}.{rest}" if int(index) in new_index else None

    # the very Parameter objects (keep_vars): tied and shared ones stay one tensor, requires_grad stays as it was
    state = {new: v for k, v in old.state_dict(keep_vars=True).items() if (new := rename(k)) is not None}
    buffers = {new: b for k, b in old.named_buffers(remove_duplicate=False) if (new := rename(k)) is not None}
    scan = next((m._sensitivity_scan for m in old.modules() if hasattr(m, "_sensitivity_scan")), None)
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(config)
    new.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(new.named_buffers(remove_duplicate=False)):  # non-persistent ones (rotary, µP vectors)
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            new.get_submodule(owner)._buffers[attr] = buffers[name]
    new.tie_weights()
    if meta := [n for n, t in (*new.named_parameters(), *new.named_buffers()) if t.is_meta]:
        raise RuntimeError(f"rebuilding without blocks {sorted(gone)} left {', '.join(meta)} unset")
    new.generation_config = old.generation_config
    new.train(old.training)
    if type(new) is not type(old):
        raise RuntimeError(f"rebuilt a {type(new).__name__} from a {type(old).__name__}")
    before = {key: getattr(old.config, key, None) for key in changes}
    old.__dict__.clear()
    old.__dict__.update(new.__dict__)  # the caller's model object is the pruned model
    if scan is not None:
        instrument(old, scan=scan)
    lm.registry = build_registry(old.config)
    return {key: [value, getattr(old.config, key)] for key, value in before.items()}


def prune_blocks(
    model: LoadedModel | nn.Module,
    n_blocks: int | None = None,
    *,
    sparsity: float | None = None,
    unit: str = "block",
    layers: Sequence[int] | None = None,
    windows: Windows | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> BlocksResult:
    """Remove ``n_blocks`` blocks (or units), greedily by measured damage, in place (Mamba-Shedder).

    Each step removes, on top of those already gone, the candidate whose removal raises the mean next-token loss on
    ``windows`` least. See the module docstring for what is removed and how it is saved. The residual stream
    entering every layer is held during the search (``n_layers + 1`` tensors of (n, L, D)), so each candidate
    reruns only the blocks from its own on.

    Args:
        model: A ``LoadedModel`` or instrumented HF causal LM. Modified in place: removed blocks are gone from it
            (its config is rewritten and its layers renumbered); removed units have zero output projections.
        n_blocks: How many candidates to remove.
        sparsity: Instead of ``n_blocks``: the fraction of the candidates to remove, ``int(candidates * s + 1e-9)``.
        unit: ``"block"`` (whole blocks), or ``"ssm"``, ``"attention"``, ``"mlp"`` (that unit only).
        layers: Candidate layers (default every one that can lose ``unit``).
        windows: Calibration windows (n, L) the damage is measured on.
        batch_size: Windows per forward.
        show_progress: Show a tqdm bar.

    Returns:
        A :class:`BlocksResult` (the order and damages of the removals).

    Raises:
        SpecError: Neither or both of ``n_blocks`` and ``sparsity``; no windows; a layer of ``layers`` without
            ``unit`` (naming the layers with one) or whose removal cannot be saved; more candidates asked for than
            can go.

    Examples:
        >>> lm = load_model("tiny:bamba")
        >>> result = prune_blocks(lm, 1, windows=windows)
        >>> result.removed, lm.model.config.num_hidden_layers
        ([[2]], 3)
    """
    lm = as_loaded(model)
    options = {"n_blocks": n_blocks, "unit": unit, "layers": layers}
    _, opts, request = resolve(lm, "blocks", options, sparsity=sparsity, schedule=None, windows=windows, seed=0,
                               batch_size=batch_size)  # fmt: skip
    return _apply(lm, opts, request.sparsity, windows, request.batch_size, show_progress)


def _apply(lm: LoadedModel, opts: BlockOptions, sparsity: float | None, windows: Windows, batch_size: int,
           show_progress: bool) -> BlocksResult:  # fmt: skip
    as_loaded(lm, instrumented=True)  # ValueError naming the fix
    reg, unit = lm.registry, opts.unit
    candidates, excluded = _candidates(reg, unit, opts.layers)
    k = opts.n_blocks if opts.n_blocks is not None else int(len(candidates) * sparsity + 1e-9)
    limit = len(candidates) if unit != "block" else min(len(candidates), reg.n_layers - 1)
    if k > limit:
        what = "blocks (one must stay)" if unit == "block" and limit == reg.n_layers - 1 else f"{unit} candidates"
        raise SpecError(f"{k} is more than the {limit} removable {what}: "
                        f"{'; '.join(map(_label, candidates)) or 'none'}" +
                        (f" (excluded: {_describe(excluded)})" if excluded else ""), "options.n_blocks")  # fmt: skip
    n_before = reg.n_layers
    removed, steps, dense, loss = _greedy(lm, unit, candidates, k, windows, batch_size, show_progress)
    changes, zeroed = {}, []
    with torch.no_grad():
        if not removed:
            saved = "nothing removed"
        elif unit == "block":
            changes = _drop_blocks(lm, removed)
            saved = f"blocks removed: layers renumbered, config {', '.join(changes)} rewritten"
        else:
            zeroed = _zero_units(lm, unit, removed)
            proj = lm.registry.component(OUTPUT_COMPONENTS[unit]).tensors[0].param.rpartition(".")[0]
            saved = f"{unit} units kept with zero output projections ({proj})"
    return BlocksResult(unit, [list(c) for c in removed], steps, dense, loss, n_before, lm.registry.n_layers, saved,
                        changes, zeroed, excluded)  # fmt: skip


@METHODS.implement("blocks")
def _blocks_method(lm, opts, *, sparsity, schedule, windows, seed, batch_size, show_progress):
    return None, _apply(lm, opts, sparsity, windows, batch_size, show_progress).to_dict()

"""The pruning methods' table and their options.

:data:`METHODS` maps each method name to its implementation, its options (:class:`UnstructuredOptions`,
:class:`WandaOptions`, :class:`StateOptions`, :class:`HeadOptions`, :class:`BlockOptions`), whether it needs
calibration windows and which architectures it applies to. ``magnitude`` and ``wanda`` register in
:mod:`.unstructured`; ``state``, ``head`` and ``headdim`` in :mod:`.structured`; ``blocks`` in
:mod:`.blocks`. An implementation is called as
``fn(lm, options, *, sparsity, schedule, windows, seed, batch_size, show_progress)`` and returns
``(schedule applied or None, structured record or None)``.
"""

from __future__ import annotations

from typing import Literal

from ..core.methods import Method, Methods
from ..core.names import DEFAULT_EXCLUDE, MAMBA2_ARCHS
from ..core.spec import Count, Exclude, Fraction, Ints, Names, Seed, Spec, SpecError, Structure

__all__ = [
    "METHODS",
    "BlockOptions",
    "HeadOptions",
    "PruneRequest",
    "StateOptions",
    "StructuredOptions",
    "UnstructuredOptions",
    "WandaOptions",
    "check_method",
    "check_target",
]

MANIFEST = "pruning_manifest.json"
"""The record a pruned checkpoint carries."""
METHODS = Methods("pruning method")
"""Every pruning method: ``magnitude``, ``wanda`` (weights, unstructured or N:M), ``state``, ``head``,
``headdim`` (SSM units) and ``blocks`` (whole blocks or units, greedily), plus any registered from user code."""

class UnstructuredOptions(Spec):
    """Options of the weight pruners (``magnitude``)."""

    structure: Structure = None
    """N:M sparsity 'n:m' (e.g. 2:4: keep 2 of every 4 consecutive input weights of a row), or unstructured."""
    compare: Literal["row", "tensor"] = "row"
    """Rank weights within each output row (WANDA's default) or across the whole tensor."""
    components: Names | None = None
    """Components to prune with one sparsity (default: every prunable one not excluded)."""
    exclude: Exclude = DEFAULT_EXCLUDE
    """Components kept dense ('none': keep none dense)."""


class WandaOptions(UnstructuredOptions):
    """Options of ``wanda``."""

    sequential: bool = False
    """Calibrate each layer on the outputs of the already-pruned layers (WANDA's procedure) instead of one dense
    forward."""


class StructuredOptions(Spec):
    """Options shared by the SSM-structured pruners."""

    mode: Literal["auto", "shrink", "mask"] = "auto"
    """Shrink the tensors (one count in every layer) or zero the units; auto: shrink when possible."""
    layers: Ints | None = None
    """Layers to prune: state/head/headdim the SSM layers (default every one; the others keep all their units, so
    the model is masked), blocks the candidate layers (default every one that can lose the unit)."""


class StateOptions(StructuredOptions):
    """Options of ``state`` pruning."""

    score: Literal["taylor", "magnitude", "random"] = "taylor"
    """How units are scored, the lowest removed first: taylor (W^2 E[g^2] over the unit's entries), flap
    (Var(X_j) ||W_out[:, j]||^2 over its out_proj inputs), magnitude (W^2) or random."""


class HeadOptions(StructuredOptions):
    """Options of ``head`` and ``headdim`` pruning (Mamba-2 mixers)."""

    score: Literal["flap", "taylor", "magnitude", "random"] = "flap"
    """How units are scored, the lowest removed first: taylor (W^2 E[g^2] over the unit's entries), flap
    (Var(X_j) ||W_out[:, j]||^2 over its out_proj inputs), magnitude (W^2) or random."""
    bias_compensation: bool = True
    """FLAP's bias compensation: add the removed channels' mean contribution to out_proj's bias."""


class BlockOptions(Spec):
    """Options of ``blocks``: greedy removal of whole blocks (Mamba-Shedder) or of one unit kind from blocks."""

    n_blocks: Count | None = None
    """How many blocks (or units) to remove; instead, a sparsity gives the fraction of the candidates."""
    unit: Literal["block", "ssm", "attention", "mlp"] = "block"
    """What goes: whole blocks, or only that unit from the blocks holding it."""
    layers: Ints | None = None
    """Layers to prune: state/head/headdim the SSM layers (default every one; the others keep all their units, so
    the model is masked), blocks the candidate layers (default every one that can lose the unit)."""


class PruneRequest(Spec):
    """What every pruning run takes besides the method's options."""

    sparsity: Fraction | tuple[Fraction, ...] | None = None
    """Fraction removed: of each weight matrix (magnitude, wanda) or of the units of each layer (structured; one
    value, or one per layer)."""
    seed: Seed = 0
    """Seed of the calibration draw and of random scores."""
    batch_size: Count = 8
    """Windows per forward."""


_CALIBRATED_SCORES = ("taylor", "flap")
"""Structured scores that read calibration windows."""
METHODS.declare("magnitude", "sensitivity.pruning.unstructured", options=UnstructuredOptions,
                description="zero the smallest |W| of every weight matrix (unstructured or N:M)")
METHODS.declare("wanda", "sensitivity.pruning.unstructured", options=WandaOptions, calibration=True,
                description="zero the smallest |W_ij| ||X_j|| of every weight matrix (Sun et al., 2023; unstructured "
                "or N:M)")  # fmt: skip
for _unit, _options, _description in (
    ("state", StateOptions, "remove SSM states: B and C rows (and their conv channels), Ghattas et al. 2025"),
    ("head", HeadOptions, "remove Mamba-2 heads, the same number from every B/C group"),
    ("headdim", HeadOptions, "remove channels of every Mamba-2 head (each head its own set)"),
):
    METHODS.declare(_unit, "sensitivity.pruning.structured", options=_options, description=_description, unit=_unit,
                    per_layer=True, calibration=lambda o: o.score in _CALIBRATED_SCORES,
                    archs=None if _unit == "state" else MAMBA2_ARCHS,
                    needs=None if _unit == "state" else "Mamba-2 mixers with heads")  # fmt: skip
METHODS.declare("blocks", "sensitivity.pruning.blocks", options=BlockOptions, calibration=True, kind="blocks",
                description="remove whole blocks (or one unit kind) greedily by measured loss increase, "
                "Mamba-Shedder")  # fmt: skip


def check_target(method: Method, options: Spec, sparsity, has_schedule: bool) -> None:
    """How much to prune must come from exactly one place: a sparsity, a schedule, or (weights) an N:M structure.

    Raises:
        SpecError: Naming the conflicting fields.
    """
    structure = getattr(options, "structure", None)
    if "n_blocks" in method.options.model_fields:  # blocks: a count or a fraction of the candidates
        count = getattr(options, "n_blocks", None)
        if has_schedule:
            raise SpecError(f"{method.name} takes no schedule; give n_blocks or a sparsity (the fraction of the "
                            "candidate blocks to remove)", "schedule")  # fmt: skip
        if count is not None and sparsity is not None:
            raise SpecError("give either a sparsity or n_blocks, not both", "options.n_blocks")
        if count is None and sparsity is None:
            raise SpecError(f"{method.name} needs n_blocks or a sparsity (the fraction of the candidate blocks to "
                            "remove)", "sparsity")  # fmt: skip
        if isinstance(sparsity, tuple):
            raise SpecError(f"{method.name} takes one sparsity (the fraction of the candidate blocks to remove)",
                            "sparsity")  # fmt: skip
        return
    if sparsity is not None and has_schedule:
        raise SpecError("give either a sparsity or a schedule, not both", "schedule")
    if structure is not None:
        n, m = map(int, structure.split(":"))
        if has_schedule:
            raise SpecError(f"{structure!r} fixes the sparsity of every weight to {1 - n / m:g}; it cannot be "
                            "combined with a schedule", "options.structure")  # fmt: skip
        if sparsity is not None and (not isinstance(sparsity, float) or abs(sparsity - (1 - n / m)) > 1e-9):
            raise SpecError(f"{sparsity!r} contradicts structure {structure!r} (which prunes {1 - n / m:g})",
                            "sparsity")  # fmt: skip
    elif sparsity is None and not has_schedule:
        what = "a sparsity, a schedule or an n:m structure" if "structure" in method.options.model_fields else \
            "a sparsity or a schedule"
        raise SpecError(f"{method.name} needs {what}", "sparsity")
    if isinstance(sparsity, tuple) and not method.info.get("per_layer", False):
        raise SpecError(f"{method.name} takes one sparsity; give per-layer or per-component values as a schedule",
                        "sparsity")  # fmt: skip


def check_method(method: str, arch: str) -> Method:
    """The entry of ``method``, which must apply to ``arch``; for a structured unit the model's mixers lack (heads on
    Mamba-1), the error also names what it needs and the structured units this architecture has.

    Raises:
        SpecError: Unknown method, or one that does not apply.
    """
    entry = METHODS.check(method)
    if not entry.applies_to(arch) and entry.info.get("needs"):
        units = [n for n in METHODS.names(arch) if METHODS[n].info.get("unit") == n]
        raise SpecError(f"pruning method {method!r} does not apply to {arch} models; it needs "
                        f"{' or '.join(entry.archs)} ({entry.info['needs']}); structured units for {arch}: "
                        f"{', '.join(units) or 'none'}")  # fmt: skip
    return METHODS.check(method, arch)


def resolve(lm, method: str, options: dict, *, sparsity, schedule, windows, seed, batch_size):
    """Validate one pruning request against the method table: ``(method entry, options, request)``.

    Every rule a pruning call must meet lives here or in the types above: the method exists and applies to the
    model, its options are its own, how much to prune comes from one place (:func:`check_target`), a schedule is a
    :class:`~sensitivity.allocation.Schedule` of this model, and calibration windows are there when the method
    needs them.
    """
    from ..allocation import Schedule  # the schedule type is allocation's, a stage below pruning

    entry = check_method(method, lm.arch)
    opts = entry.validate(options)
    request = PruneRequest(sparsity=sparsity, seed=seed, batch_size=batch_size)
    if schedule is not None and not isinstance(schedule, Schedule):
        raise SpecError(f"{type(schedule).__name__} is not a sensitivity.allocation.Schedule", "schedule")
    check_target(entry, opts, request.sparsity, schedule is not None)
    if entry.needs_calibration(opts) and (windows is None or len(windows) == 0):
        raise SpecError(f"{method} needs calibration windows", "windows")
    return entry, opts, request

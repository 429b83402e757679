"""Hook functions that remove a whole unit or block from one layer of an instrumented model.

Removing a unit (SSM mixer, attention, MLP, MoE) sets its output to zero, so its block adds nothing to the
residual stream; removing a block makes its output its input (Mamba-Shedder's block removal). Both the probes'
``remove`` ablations and the pruning stage's greedy block removal use these, inside
:func:`~sensitivity.core.hooks.hooks`.

Shape legend: B batch, L sequence length, D model width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .hooks import hook_name
from .registry import Registry
from .spec import SpecError

__all__ = ["REMOVABLE", "UNIT_OUTPUTS", "missing_unit", "removal_hooks"]

UNIT_OUTPUTS = {"ssm": "out", "attention": "attn_out", "mlp": "mlp_out", "moe": "moe_out"}
"""Unit kind -> the hook point carrying its output (what the residual stream adds)."""
REMOVABLE = ("block", *UNIT_OUTPUTS)
"""What :func:`removal_hooks` removes: a whole block, or one unit kind."""


HookFn = Callable[[torch.Tensor], torch.Tensor | None]


def removal_hooks(registry: Registry, layer: int, what: str) -> dict[str, HookFn]:
    """Hook name -> function removing ``what`` from ``layer``: ``"block"`` (output := input, through the
    ``block_in`` / ``block_out`` points; on pure SSM models, whose blocks are ``x + mixer(norm(x))``, the mixer
    output := 0) or a unit kind (its output := 0).

    Raises:
        SpecError: If ``what`` is unknown, or ``layer`` holds no such unit (naming the layers that do).

    Examples:
        >>> with hooks(lm, removal_hooks(lm.registry, 1, "attention")):
        ...     logits = lm.model(ids, use_cache=False).logits  # layer 1 without its attention
    """
    registry.check_layer(layer)
    if what == "block":
        if "block_in" not in registry.hook_names:  # pure SSM blocks: residual + mixer
            return {hook_name(layer, "out"): torch.zeros_like}
        seen: dict[str, torch.Tensor] = {}

        def keep_input(t: torch.Tensor) -> None:  # (B, L, D)
            seen["in"] = t

        return {hook_name(layer, "block_in"): keep_input, hook_name(layer, "block_out"): lambda t: seen["in"]}
    if what not in UNIT_OUTPUTS:
        raise SpecError(f"unknown removable {what!r}; allowed: {', '.join(REMOVABLE)}", "unit")
    if what not in registry.units[layer]:
        raise missing_unit(registry, layer, what)
    return {hook_name(layer, UNIT_OUTPUTS[what]): torch.zeros_like}


def missing_unit(registry: Registry, layer: int, unit: str, field: str = "layers") -> SpecError:
    """The error for ``layer`` lacking a ``unit`` it was asked for, naming the layers holding one.

    Examples:
        >>> str(missing_unit(build_registry(tiny_config("bamba")), 1, "ssm"))
        'layers: layer 1 is an attention+mlp layer with no ssm unit; layers with one: 0, 2, 3'
    """
    kind = registry.layer_kind(layer)
    article = "an" if kind.startswith(("ssm", "attention", "mlp")) else "a"  # as read aloud: an SSM, an MLP
    having = [i for i in range(registry.n_layers) if unit in registry.units[i]]
    return SpecError(f"layer {layer} is {article} {kind} layer with no {unit} unit; layers with one: "
                     f"{', '.join(map(str, having)) or 'none'}", field)  # fmt: skip

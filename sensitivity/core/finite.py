"""Non-finite numbers, named: weights holding NaN or infinity, and where a non-finite loss first went wrong.

A checkpoint with NaN weights evaluates to ``perplexity nan`` and prunes to nothing (every WANDA or magnitude
score is NaN), so :func:`check_weights` refuses it at load time, naming the tensors. A loss that turns non-finite
during a run is diagnosed by :func:`first_nonfinite`: one more forward of the offending windows with read-only
hooks on every hook point and block, which names the first activation (layer and hook point, in the order the
forward computes them) that is not finite.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import build_registry

__all__ = ["NonFiniteError", "check_loss", "check_weights", "first_nonfinite", "nonfinite_tensors"]


class NonFiniteError(ValueError):
    """Weights or activations that hold NaN or infinity, named."""


@torch.no_grad()
def nonfinite_tensors(model: nn.Module) -> dict[str, int]:
    """Parameters and buffers holding NaN or infinity: name -> how many of their entries are not finite."""
    found = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found[name] = int((~torch.isfinite(tensor)).sum())
    return found


def check_weights(model: nn.Module, name: str) -> None:
    """Refuse a model whose weights hold NaN or infinity.

    Raises:
        NonFiniteError: Naming up to three tensors, how many entries of each are not finite, and the total.
    """
    found = nonfinite_tensors(model)
    if found:
        shown = ", ".join(f"{t} ({n:,} entries)" for t, n in list(found.items())[:3])
        more = f" and {len(found) - 3} more tensors" if len(found) > 3 else ""
        raise NonFiniteError(f"{name!r} has non-finite weights (NaN or infinity) in {shown}{more}; allowed: finite "
                             "weights (set allow_nonfinite to load it anyway)")  # fmt: skip


@torch.no_grad()
def first_nonfinite(model: nn.Module, ids: torch.Tensor) -> str | None:
    """Where the forward of ``ids`` (B, L) first computes something that is not finite: ``"layer 3, hook point
    dt"`` (instrumented models), ``"the output of layer 3"``, ``"the embeddings"`` or ``"the logits"``; None when
    everything is finite."""
    from .instrumented import HookPoint

    seen: list[str] = []
    handles = []

    def watch(where: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not seen and isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
                seen.append(where)

        return hook

    handles.append(model.get_input_embeddings().register_forward_hook(watch("the embeddings")))
    for layer, block in enumerate(build_registry(model.config).blocks(model)):  # where the blocks live: the registry
        for module in block.modules():
            if isinstance(module, HookPoint):
                handles.append(module.register_forward_hook(watch(f"layer {layer}, hook point {module.name}")))
        handles.append(block.register_forward_hook(watch(f"the output of layer {layer}")))
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    if seen:
        return seen[0]
    return None if torch.isfinite(logits).all() else "the logits"


def check_loss(model: nn.Module, value: float, ids: torch.Tensor, what: str = "the loss") -> None:
    """Raise when ``value`` (a loss over ``ids`` (B, L)) is not finite, naming where the forward first went wrong.

    Raises:
        NonFiniteError: ``"the loss is nan: the first non-finite activation is at layer 3, hook point dt"``.
    """
    if math.isfinite(value):
        return
    where = first_nonfinite(model, ids)
    at = f"the first non-finite activation is at {where}" if where else "every activation is finite (the loss terms "
    at += "" if where else "overflowed)"
    raise NonFiniteError(f"{what} is {value}: {at}")

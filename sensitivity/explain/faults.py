"""Planted faults: known damage to one component of one layer, to check that the explainer finds it.

Each :class:`Fault` edits the tensors the registry assigns to one component (nothing here knows how ``in_proj``
is packed), in whichever unit holds it: an SSM mixer, or on hybrids an attention, MLP or MoE unit. A fault in a
tensor several layers share (Zamba2's shared transformer) damages every layer using it. :func:`default_faults`
spreads ten kinds of damage over a model's SSM layers (plus attention, MLP and MoE faults on hybrids);
:func:`plant` applies one in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.loading import LoadedModel

__all__ = ["FAULT_KINDS", "Fault", "default_faults", "plant"]

FAULT_KINDS = ("scale", "add", "zero", "noise", "negate", "prune")


@dataclass(frozen=True)
class Fault:
    """Damage to one component of one layer.

    Attributes:
        name: Short identifier, e.g. ``"A_log_scaled"``.
        layer: The damaged layer.
        component: The damaged registry component.
        kind: ``scale`` (multiply by ``value``), ``add`` (add ``value``), ``zero``, ``noise`` (replace by Gaussian
            noise with the tensor's own standard deviation), ``negate``, or ``prune`` (zero the fraction ``value``
            of smallest-magnitude entries).
        value: The factor, offset or fraction.
        tensor: Restrict to the component's tensors whose name contains this (e.g. ``"bias"`` for the Δ bias).
    """

    name: str
    layer: int
    component: str
    kind: str
    value: float = 0.0
    tensor: str | None = None

    def describe(self) -> str:
        what = {"scale": f"scaled by {self.value:g}", "add": f"shifted by {self.value:+g}", "zero": "zeroed",
                "noise": "replaced by noise", "negate": "negated",
                "prune": f"pruned to {self.value:.0%} by magnitude"}[self.kind]  # fmt: skip
        part = f"{self.component} ({self.tensor})" if self.tensor else self.component
        return f"{part} of layer {self.layer} {what}"


def default_faults(lm: LoadedModel) -> list[Fault]:
    """Ten faults of different kinds on different layers, for the model's architecture; on hybrids one more per
    attention, MLP and MoE unit kind the model has (``q`` noise, ``down`` pruned, ``router`` zeroed).

    The layers are spread over the depth as fractions of it, so the same list works for any number of layers; on
    hybrids each fault goes to the layer nearest that fraction that holds its component.
    """
    reg = lm.registry
    n = reg.n_layers

    def at(f: float, component: str) -> int:  # nearest layer holding the component; the earlier one on ties
        target = min(n - 1, round(f * (n - 1)))
        return min(reg.layers_with(component), key=lambda layer: (abs(layer - target), layer))

    names = set(reg.component_names)
    faults = [
        Fault("A_log_scaled", at(2 / 7, "A_log"), "A_log", "add", math.log(10.0)),  # A = -exp(A_log) grows 10x
        Fault("conv1d_zeroed", at(5 / 7, "conv1d"), "conv1d", "zero"),
        Fault("dt_bias_shifted", at(3 / 7, "dt"), "dt", "add", 4.0, tensor="bias"),
        Fault("out_proj_pruned", at(6 / 7, "out_proj"), "out_proj", "prune", 0.9),
        Fault("B_noise", at(1 / 7, "B"), "B", "noise"),
        Fault("C_noise", at(4 / 7, "C"), "C", "noise"),
        Fault("z_negated", at(1.0, "z"), "z", "negate"),
        Fault("x_scaled", at(0.0, "x"), "x", "scale", 5.0),
        Fault("D_scaled", at(6 / 7, "D"), "D", "scale", 10.0),
        Fault("norm_zeroed", at(3 / 7, "norm"), "norm", "zero") if "norm" in names
        else Fault("dt_proj_noise", at(3 / 7, "dt"), "dt", "noise", tensor="dt_proj.weight"),
    ]  # fmt: skip
    for name, comp, kind, value in (("q_noise", "q", "noise", 0.0), ("down_pruned", "down", "prune", 0.9),
                                    ("router_zeroed", "router", "zero", 0.0)):  # fmt: skip
        if comp in names:
            faults.append(Fault(name, at(0.5, comp), comp, kind, value))
    return faults


@torch.no_grad()
def plant(lm: LoadedModel, fault: Fault, *, seed: int = 0) -> LoadedModel:
    """Apply ``fault`` to ``lm`` in place (load a fresh copy to undo it).

    Raises:
        ValueError: If the component, layer, kind or tensor filter does not fit the model (a SpecError naming the
            layers holding the component when ``fault.layer`` has none).
    """
    reg = lm.registry
    reg.check_layer(fault.layer)
    if fault.kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {fault.kind!r}; allowed: {', '.join(FAULT_KINDS)}")
    comp = reg.component(fault.component)
    owner = reg.owner(lm.model, fault.layer, fault.component)  # SpecError naming the layers with it
    tensors = [t.get(owner) for t in comp.tensors if fault.tensor is None or fault.tensor in t.describe()]
    if not tensors:
        have = ", ".join(t.describe() for t in comp.tensors) or "none"
        raise ValueError(f"fault {fault.name!r}: component {fault.component!r} has no tensor matching "
                         f"{fault.tensor!r}; its tensors: {have}")  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    for t in tensors:
        if fault.kind == "scale":
            t.mul_(fault.value)
        elif fault.kind == "add":
            t.add_(fault.value)
        elif fault.kind == "zero":
            t.zero_()
        elif fault.kind == "negate":
            t.neg_()
        elif fault.kind == "noise":
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32) * t.float().std()
            t.copy_(noise.to(t.dtype))
        else:  # prune
            k = int(fault.value * t.numel())
            if k:
                mask = torch.zeros(t.numel(), dtype=torch.bool)
                mask[t.abs().reshape(-1).argsort()[:k]] = True
                t.masked_fill_(mask.view(t.shape), 0)
    return lm

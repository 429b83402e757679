"""Planted faults: known damage to one component of one layer, to check that the explainer finds it.

Each :class:`Fault` edits the tensors the registry assigns to one component (nothing here knows how ``in_proj``
is packed). :func:`default_faults` spreads ten kinds of damage over a model's layers; :func:`plant` applies one
in place.
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
    """Ten faults of different kinds on different layers, for the model's architecture.

    The layers are spread over the depth as fractions of it, so the same list works for any number of layers.
    """
    n = lm.registry.n_layers
    at = lambda f: min(n - 1, round(f * (n - 1)))  # noqa: E731
    names = set(lm.registry.component_names)
    faults = [
        Fault("A_log_scaled", at(2 / 7), "A_log", "add", math.log(10.0)),  # A = -exp(A_log) grows 10x
        Fault("conv1d_zeroed", at(5 / 7), "conv1d", "zero"),
        Fault("dt_bias_shifted", at(3 / 7), "dt", "add", 4.0, tensor="bias"),
        Fault("out_proj_pruned", at(6 / 7), "out_proj", "prune", 0.9),
        Fault("B_noise", at(1 / 7), "B", "noise"),
        Fault("C_noise", at(4 / 7), "C", "noise"),
        Fault("z_negated", at(1.0), "z", "negate"),
        Fault("x_scaled", at(0.0), "x", "scale", 5.0),
        Fault("D_scaled", at(6 / 7), "D", "scale", 10.0),
        Fault("norm_zeroed", at(3 / 7), "norm", "zero") if "norm" in names
        else Fault("dt_proj_noise", at(3 / 7), "dt", "noise", tensor="dt_proj.weight"),
    ]  # fmt: skip
    return faults


@torch.no_grad()
def plant(lm: LoadedModel, fault: Fault, *, seed: int = 0) -> LoadedModel:
    """Apply ``fault`` to ``lm`` in place (load a fresh copy to undo it).

    Raises:
        ValueError: If the component, layer, kind or tensor filter does not fit the model.
    """
    reg = lm.registry
    reg.check_layer(fault.layer)
    if fault.kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {fault.kind!r}; allowed: {', '.join(FAULT_KINDS)}")
    comp = reg.component(fault.component)
    mixer = reg.mixer(lm.model, fault.layer)
    tensors = [t.get(mixer) for t in comp.tensors if fault.tensor is None or fault.tensor in t.describe()]
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

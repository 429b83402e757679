"""Argument checks shared by the attribution entry points (each ValueError names the bad value and the allowed ones)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from torch import nn

from ..core.loading import as_loaded
from ..core.registry import Registry
from ..data import Windows


def resolve(model) -> tuple[nn.Module, Registry]:
    """The torch module and registry behind a ``LoadedModel`` or an instrumented HF model."""
    lm = as_loaded(model, instrumented=True)
    return lm.model, lm.registry


def check_choice(what: str, value, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_choices(what: str, values, allowed: Iterable[str]) -> tuple[str, ...]:
    """One name or a sequence of names, deduplicated in order; at least one."""
    allowed = tuple(allowed)
    values = (values,) if isinstance(values, str) else tuple(values)
    if not values:
        raise ValueError(f"no {what}s given; allowed: {', '.join(allowed)}")
    return tuple(dict.fromkeys(check_choice(what, v, allowed) for v in values))


def check_components(registry: Registry, components) -> tuple[str, ...]:
    if components is None:
        return registry.component_names
    components = (components,) if isinstance(components, str) else tuple(components)
    if not components:
        raise ValueError(f"no components given; allowed: {', '.join(registry.component_names)}")
    return tuple(dict.fromkeys(registry.component(c).name for c in components))  # ValueError naming the allowed


def check_layers(registry: Registry, layers) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(registry.n_layers))
    layers = (layers,) if isinstance(layers, numbers.Integral) else tuple(layers)
    if not layers:
        raise ValueError(f"no layers given; allowed: 0..{registry.n_layers - 1}")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ValueError(f"layer {layer!r} is not an integer; allowed: 0..{registry.n_layers - 1}")
        registry.check_layer(int(layer))
    return tuple(dict.fromkeys(int(layer) for layer in layers))


def check_int(name: str, value, minimum: int | None = None) -> int:
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer{bound}")
    return int(value)


def check_float(name: str, value, *, positive: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name}={value!r} is invalid; it must be a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


def check_windows(windows) -> Windows:
    if not isinstance(windows, Windows):
        raise ValueError(f"windows must be sensitivity.data.Windows, got {type(windows).__name__}")
    if len(windows) == 0:
        raise ValueError("windows is empty; need at least 1 calibration window")
    if windows.seqlen < 2:
        raise ValueError(f"windows of {windows.seqlen} token(s) have no next token to predict; need seqlen >= 2")
    return windows

"""Hooks on the instrumented forward, only ever inside context managers that remove them and check they fired.

Hook names are ``"layers.{i}.{point}"`` with ``point`` one of ``Registry.hook_names`` (e.g. ``"layers.3.dt"``).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .loading import as_loaded
from .registry import Registry

__all__ = ["ActiveHook", "active_hooks", "capture", "hook_name", "hooks", "parse_hook_name"]

HookFn = Callable[[torch.Tensor], torch.Tensor | None]
_NAME = re.compile(r"^layers\.(\d+)\.(\w+)$")
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def hook_name(layer: int, point: str) -> str:
    """The full hook name of ``point`` in ``layer``."""
    return f"layers.{layer}.{point}"


def parse_hook_name(name: str, registry: Registry) -> tuple[int, str]:
    """Split ``"layers.{i}.{point}"`` into ``(i, point)``, validating both against ``registry``."""
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"bad hook name {name!r}; expected 'layers.<i>.<point>', e.g. 'layers.0.dt'")
    layer, point = int(m.group(1)), m.group(2)
    registry.check_layer(layer)
    if point not in registry.hook_names:
        raise ValueError(f"unknown hook point {point!r} in {name!r}; allowed: {', '.join(registry.hook_names)}")
    return layer, point


@contextmanager
def hooks(model, fwd_hooks: Mapping[str, HookFn], *, check_fired: bool = True) -> Iterator[dict[str, int]]:
    """Attach functions to hook points for the duration of a ``with`` block.

    Each function receives the activation and returns None (read only) or a tensor that replaces it.

    Args:
        model: A ``LoadedModel`` or an instrumented HF model.
        fwd_hooks: Hook name -> function.
        check_fired: Raise on exit if a hook never fired (e.g. a forward that ran with a generation cache).

    Yields:
        Hook name -> number of times it fired so far.

    Raises:
        RuntimeError: If ``check_fired`` and a hook did not fire.

    Examples:
        >>> with hooks(lm, {"layers.0.dt": lambda dt: dt.mean(1, keepdim=True).expand_as(dt)}):
        ...     logits = lm.model(ids, use_cache=False).logits
    """
    lm = as_loaded(model)
    module, registry = lm.model, lm.registry
    fired = {name: 0 for name in fwd_hooks}
    handles, active = [], _ACTIVE.setdefault(module, [])
    mine: list[ActiveHook] = []
    try:
        for name, fn in fwd_hooks.items():
            layer, point = parse_hook_name(name, registry)

            def _call(t: torch.Tensor, name=name, fn=fn):
                fired[name] += 1
                return fn(t)

            handles.append(registry.hook_point(module, layer, point).register_forward_hook(
                lambda mod, args, output, call=_call: call(output)))  # fmt: skip
            mine.append(ActiveHook(name, _call, lambda name=name: fired.__setitem__(name, fired[name] + 1)))
        active.extend(mine)
        yield fired
    finally:
        for h in handles:
            h.remove()
        for entry in mine:
            if entry in active:
                active.remove(entry)
    if check_fired and (silent := [n for n, k in fired.items() if k == 0]):
        raise RuntimeError(f"hook points did not fire: {', '.join(silent)} (was the forward run with use_cache=False?)")


class ActiveHook(NamedTuple):
    """A hook attached by an open :func:`hooks` block: calling ``apply(activation)`` counts as it firing and returns
    None or the replacement; ``mark()`` counts it as fired without applying it."""

    name: str
    apply: HookFn
    mark: Callable[[], None]


def active_hooks(model) -> list[ActiveHook]:
    """The hooks attached to ``model`` by open :func:`hooks` blocks, in the order they were attached.

    Lets a caller apply an ablation's activation edits to activations it already holds (the first-order probe
    estimates) instead of running a forward.
    """
    return list(_ACTIVE.get(as_loaded(model).model, ()))


@contextmanager
def capture(model, names: Iterable[str], *, detach: bool = True) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record activations at hook points: name -> one tensor per forward call.

    Examples:
        >>> with capture(lm, ["layers.0.dt"]) as acts:
        ...     lm.model(ids, use_cache=False)
        >>> acts["layers.0.dt"][0].shape  # (B, L, ED) or (B, L, H)
    """
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def _recorder(name: str) -> HookFn:
        def fn(t: torch.Tensor) -> None:
            store[name].append(t.detach() if detach else t)

        return fn

    with hooks(model, {n: _recorder(n) for n in store}):
        yield store

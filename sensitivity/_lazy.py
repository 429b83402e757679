"""Package attributes imported when first read (PEP 562), so that importing a package (the command line's spec
checks) loads none of torch, transformers or pandas until a name that needs them is used."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable


def exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose attribute ``name`` is ``names[name]`` (a module
    relative to the package, or ``module:attribute`` when the attribute has another name there).

    An exported name that is also a submodule's (``sensitivity.eval.perplexity``, the function, lives in the module
    ``perplexity``) stays the export once the submodule is imported, as an eager ``from .perplexity import
    perplexity`` in the package would leave it.

    Examples:
        >>> __getattr__, __dir__ = exports(__name__, {"Schedule": ".schedule", "allocate": ".allocate"})
    """

    def resolve(name: str) -> object:
        module, _, attribute = names[name].partition(":")
        return getattr(importlib.import_module(module, package), attribute or name)

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = resolve(name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(names)

    shadowed = {n for n, target in names.items() if target.partition(":")[0] == f".{n}"}
    if shadowed:

        class _Package(types.ModuleType):
            def __getattribute__(self, name: str) -> object:
                value = super().__getattribute__(name)
                if name in shadowed and isinstance(value, types.ModuleType):
                    return getattr(value, name)
                return value

        sys.modules[package].__class__ = _Package
    return __getattr__, __dir__

"""The torch module and registry behind what the attribution entry points are given."""

from __future__ import annotations

from torch import nn

from ..core.loading import as_loaded
from ..core.registry import Registry


def resolve(model) -> tuple[nn.Module, Registry]:
    """The torch module and registry behind a ``LoadedModel`` or an instrumented HF model."""
    lm = as_loaded(model, instrumented=True)
    return lm.model, lm.registry

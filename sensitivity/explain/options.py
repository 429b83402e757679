"""What the explainer measures and its verdict bands, importable without torch (the command line validates explain
and report specs with them); :mod:`sensitivity.explain.explainer` does the measuring."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from ..core.spec import Count, Ints, Names, Number, Seed, Spec, SpecError

__all__ = ["COLLAPSED", "DRIFT", "HEALTHY", "VERDICTS", "ExplainOptions", "Thresholds"]

VERDICTS = ("healthy", "degraded", "collapsed")
"""An explanation's verdicts, by perplexity ratio: up to :attr:`Thresholds.healthy`, between, and from
:attr:`Thresholds.collapsed`."""
HEALTHY, COLLAPSED, DRIFT = 1.2, 2.0, 0.1


class Thresholds(Spec):
    """The verdict bands of a perplexity ratio: healthy up to ``healthy``, collapsed from ``collapsed``."""

    healthy: Annotated[Number, Field(ge=1)] = HEALTHY
    """Perplexity ratio up to which a pruned model is healthy."""
    collapsed: Number = COLLAPSED
    """Perplexity ratio from which a pruned model has collapsed."""

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if not self.healthy < self.collapsed:
            raise SpecError(f"{self.collapsed!r} is not above healthy={self.healthy!r}; need 1 <= healthy < "
                            "collapsed", "collapsed")  # fmt: skip
        return self


class ExplainOptions(Thresholds):
    """What :func:`explain` measures."""

    patch: bool = True
    """Run restoration patching (one partial forward per (layer, component) that differs from dense)."""
    top_layers: Count | None = None
    """Coarse to fine: restore whole units (mixers, attention, MLPs) first, then single components of the
    top_layers layers whose best unit restoration recovers most (default: every layer's components)."""
    components: Names | None = None
    """Components to patch (default: every component that owns weights)."""
    dynamics_layers: Ints | None = None
    """Layers whose SSM dynamics are measured (default: every layer with an SSM mixer; others are skipped)."""
    drift_threshold: Annotated[Number, Field(gt=0)] = DRIFT
    """Relative error of the residual stream that marks a layer as diverged."""
    batch_size: Count = 8
    """Windows per forward."""
    n_samples: Count = 2000
    """Per-token Δ and decay values kept per (layer, model) for distribution plots."""
    seed: Seed = 0
    """Seed of every subsample; recorded."""

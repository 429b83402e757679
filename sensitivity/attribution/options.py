"""The attribution options and the methods' table, importable without torch (the command line validates attribute
specs with them); the methods are implemented in :mod:`sensitivity.attribution.api`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from ..core.execution import Execution
from ..core.methods import Methods
from ..core.names import OBJECTIVES
from ..core.spec import Count, Ints, Names, Number, Seed, Spec

__all__ = ["BASELINES", "GBLM_ALPHA", "METHODS", "OBJECTIVES", "AttributeOptions", "default_methods"]

BASELINES = ("zeros",)
"""captum baselines: all-zero input embeddings."""
GBLM_ALPHA = 100.0
"""GBLM-Pruner's gradient weight: its released code multiplies every gradient by ``scale=100`` before the l2 norm."""

METHODS = Methods("attribution method")
"""Every method of :func:`attribute` (the ``kind`` column), plus any registered from user code. A method is called
as ``fn(ctx: AttributionContext) -> rows`` (``(layer, component, kind, metric, value)`` tuples); its ``info`` says
what it ``needs`` collected (``norms``: input norms at weight input hooks; ``grads``: per-window gradients of every
parameter; ``weight_grads``: of weights with an input hook only), whether it is ``default``, and which components
it ``covers(registry)``."""

_IMPL = "sensitivity.attribution.api"
METHODS.declare("act_norm", _IMPL, needs={"norms"}, default=True,
                description="statistics of the weight inputs ||X_j||: l2_mean, max_over_median, outlier_ratio")
METHODS.declare("taylor", _IMPL, needs={"grads"}, default=True,
                description="|w * mean_k g_k| (Molchanov et al., 2019): sum and mean")
METHODS.declare("fisher", _IMPL, needs={"grads"}, default=True,
                description="empirical Fisher sum_k g_k**2: sum and mean")
METHODS.declare("gblm", _IMPL, needs={"norms", "weight_grads"}, default=True,
                description="|W| ||X_j|| + alpha |W| ||G|| (Das et al., 2023): sum and mean")
METHODS.declare("grad_x_act", _IMPL, default=True,
                description="captum LayerGradientXActivation at the component's hook point")
METHODS.declare("integrated_gradients", _IMPL, default=False,
                description="captum LayerIntegratedGradients (n_steps forwards per hook point)")
METHODS.declare("conductance", _IMPL, default=False,
                description="captum LayerConductance (n_steps forwards per hook point)")


class AttributeOptions(Execution, Spec):
    """What :func:`attribute` computes."""

    methods: Names | None = None
    """Attribution methods (default: act_norm, taylor, fisher, gblm, grad_x_act; integrated_gradients and
    conductance cost n_steps forwards per hook point)."""
    components: Names | None = None
    """Registry components (default: all)."""
    layers: Ints | None = None
    """Layers (default: all)."""
    batch_size: Count = 8
    """Windows per forward for activation statistics and captum (gradients use one window each)."""
    seed: Seed = 0
    """Seeds torch's RNG inside the call (the methods are deterministic) and fills the seed column."""
    objective: Literal[OBJECTIVES] = "loss"  # type: ignore[valid-type]
    """What is attributed: the mean next-token loss per window, or the sum of the target log-probabilities."""
    n_steps: Count = 16
    """Integration steps of integrated_gradients and conductance (captum's n_steps)."""
    internal_batch_size: Count | None = None
    """captum's internal_batch_size for the integration steps (sequences per forward; default: all at once)."""
    owl_m: Annotated[Number, Field(gt=0)] = 5.0
    """OWL's outlier threshold M of act_norm's outlier_ratio."""
    gblm_alpha: Annotated[Number, Field(ge=0)] = GBLM_ALPHA
    """Weight of GBLM's gradient term (the released code scales gradients by 100)."""
    baseline: Literal[BASELINES] = "zeros"  # type: ignore[valid-type]
    """captum baseline: all-zero input embeddings."""

    @field_validator("methods")
    @classmethod
    def _known(cls, methods):
        for method in methods or ():
            METHODS[method]  # SpecError naming the allowed methods
        return methods if methods is None else tuple(dict.fromkeys(methods))


def default_methods() -> tuple[str, ...]:
    """The methods :func:`attribute` runs when none are named."""
    return tuple(m for m in METHODS if METHODS[m].info.get("default"))

"""Why a pruned model degrades: per-layer drift, restoration patching, SSM dynamics and a verdict."""

from .dynamics import QUANTITIES, decay, memory_length, ssm_states
from .explainer import (
    UNIT_ROWS,
    VERDICTS,
    ExplainOptions,
    Explanation,
    Thresholds,
    explain,
    explain_method,
    verdict,
)

__all__ = ["ExplainOptions", "Explanation", "QUANTITIES", "Thresholds", "UNIT_ROWS", "VERDICTS", "decay", "explain",
           "explain_method", "memory_length", "ssm_states", "verdict"]  # fmt: skip

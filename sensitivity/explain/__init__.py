"""Why a pruned model degrades: per-layer drift, restoration patching, SSM dynamics and a verdict."""

from .._lazy import exports

__all__ = ["ExplainOptions", "Explanation", "QUANTITIES", "Thresholds", "UNIT_ROWS", "VERDICTS", "decay", "explain",
           "explain_method", "memory_length", "ssm_states", "verdict"]  # fmt: skip

_EXPORTS = {
    "QUANTITIES": ".dynamics",
    "decay": ".dynamics",
    "memory_length": ".dynamics",
    "ssm_states": ".dynamics",
    "UNIT_ROWS": ".explainer",
    "VERDICTS": ".options",
    "ExplainOptions": ".options",
    "Explanation": ".explainer",
    "Thresholds": ".options",
    "explain": ".explainer",
    "explain_method": ".explainer",
    "verdict": ".explainer",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)

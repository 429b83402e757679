"""Ablation probes: damage from ablating each component of each mixer layer, measured on held-out windows."""

from .._lazy import exports

__all__ = ["COLUMNS", "KINDS", "METRICS", "SWEEPS", "UNITS", "Probe", "ProbeOptions", "ablation_table", "applicable",
           "plan", "probe"]

_EXPORTS = {
    "KINDS": ".options",
    "UNITS": ".ablations",
    "Probe": ".ablations",
    "ablation_table": ".ablations",
    "applicable": ".ablations",
    "COLUMNS": ".options",
    "METRICS": ".options",
    "SWEEPS": ".options",
    "ProbeOptions": ".options",
    "plan": ".sweep",
    "probe": ".sweep",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)

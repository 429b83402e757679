"""Ablation probes: damage from ablating each component of each mixer layer, measured on held-out windows."""

from .ablations import ABLATION_KINDS, SPARSIFY_METHODS, UNITS, Probe, ablation_table
from .sweep import COLUMNS, KINDS, METRICS, SWEEPS, ProbeConfig, plan, probe

__all__ = [
    "ABLATION_KINDS", "COLUMNS", "KINDS", "METRICS", "SPARSIFY_METHODS", "SWEEPS", "UNITS", "Probe", "ProbeConfig",
    "ablation_table", "plan", "probe",
]

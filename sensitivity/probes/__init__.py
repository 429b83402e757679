"""Ablation probes: damage from ablating each component of each mixer layer, measured on held-out windows."""

from .ablations import KINDS, UNITS, Probe, ablation_table, applicable
from .sweep import COLUMNS, METRICS, SWEEPS, ProbeOptions, plan, probe

__all__ = ["COLUMNS", "KINDS", "METRICS", "SWEEPS", "UNITS", "Probe", "ProbeOptions", "ablation_table", "applicable",
           "plan", "probe"]

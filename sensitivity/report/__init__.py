"""The sensitivity report: the whole pipeline on one model, as HTML, markdown, figures, CSV and a schedule."""

from .pipeline import GRIDS, ReportConfig, build_report
from .render import Section, write_report

__all__ = ["GRIDS", "ReportConfig", "Section", "build_report", "write_report"]

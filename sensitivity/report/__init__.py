"""The sensitivity report: the whole pipeline on one model, as HTML, markdown, figures, CSV and a schedule; and the
pruning grid it (and the ``grid`` job) runs."""

from .grid import DENSE, GridRun, grid_row, plan_grid, prune_run
from .pipeline import GRIDS, ReportOptions, ReportSpec, build_report
from .render import Section, write_report

__all__ = ["DENSE", "GRIDS", "GridRun", "ReportOptions", "ReportSpec", "Section", "build_report", "grid_row",
           "plan_grid", "prune_run", "write_report"]

"""The sensitivity report: the whole pipeline on one model, as HTML, markdown, figures, CSV and a schedule; and the
pruning grid it (and the ``grid`` job) runs. The rendering (``Section``, ``write_report``, seaborn figures) is
imported when first used, so commands that do not draw do not load matplotlib."""

from .grid import DENSE, GridRun, grid_row, plan_grid, prune_run
from .pipeline import GRIDS, ReportOptions, ReportSpec, build_report

__all__ = ["DENSE", "GRIDS", "GridRun", "ReportOptions", "ReportSpec", "Section", "build_report", "grid_row",
           "plan_grid", "prune_run", "write_report"]


def __getattr__(name: str):
    if name in ("Section", "write_report"):
        from . import render

        return getattr(render, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

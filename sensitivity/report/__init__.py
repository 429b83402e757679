"""The sensitivity report: the whole pipeline on one model, as HTML, markdown, figures, CSV and a schedule; and the
pruning grid it (and the ``grid`` job) runs. The rendering (``Section``, ``write_report``, seaborn figures) is
imported when first used, so commands that do not draw do not load matplotlib."""

from .._lazy import exports

__all__ = ["DENSE", "GRIDS", "GridRun", "ReportOptions", "ReportSpec", "Section", "build_report", "grid_row",
           "plan_grid", "prune_run", "write_report"]

_EXPORTS = {
    "DENSE": ".grid",
    "GridRun": ".grid",
    "grid_row": ".grid",
    "plan_grid": ".grid",
    "prune_run": ".grid",
    "GRIDS": ".options",
    "ReportOptions": ".options",
    "ReportSpec": ".options",
    "build_report": ".pipeline",
    "Section": ".render",
    "write_report": ".render",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)

"""The ``report`` and ``grid`` jobs."""

from __future__ import annotations

import io
import json
import os
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator

from ..allocation import METHODS as ALLOCATORS
from ..core.execution import Execution
from ..core.jobs import JOBS, Inputs, JobResult, JobSpec
from ..core.methods import Methods
from ..core.names import DEVICES
from ..core.objective import Tasks
from ..core.output import OutputDir, versions
from ..core.spec import Count, Names, Seed, Seqlen, Sparsities, SpecError, Structure, Text
from ..core.zoo import ZOO_MODELS
from ..data.corpus import DEFAULT_CORPUS
from ..pruning import METHODS
from .options import EvalWindows, ReportSpec

__all__ = ["GridSpec", "ReportSpec", "run_grid", "run_report"]


@JOBS.register("report", options=ReportSpec,
               description="the whole pipeline on one model: report.html, report.md, figures, CSV")  # fmt: skip
def run_report(spec: ReportSpec, inputs: Inputs, *, overwrite: bool = False, show_progress: bool = True
               ) -> JobResult:  # fmt: skip
    """Build the report ``spec`` describes; the paths it wrote are the job's value."""
    from .pipeline import build_report

    paths = build_report(spec.out, spec, overwrite=overwrite, show_progress=show_progress, inputs=inputs)
    return JobResult(spec, dict(paths), paths)


def _allocators(names):
    for name in names:
        ALLOCATORS[name]
    return names


class GridSpec(Execution, JobSpec):
    """The ``grid`` job: every pruning method at every sparsity on each model, evaluated by test perplexity."""

    name_tables: ClassVar[dict[str, Methods]] = {"allocators": ALLOCATORS}

    job: Literal["grid"] = "grid"
    models: Names = tuple(dict.fromkeys(ZOO_MODELS.values()))
    """Models to prune (zoo names, checkpoint directories...; default: every shipped model)."""
    data: Text = DEFAULT_CORPUS
    """Corpus of the calibration, probe and test windows."""
    device: Literal[DEVICES] = "cpu"  # type: ignore[valid-type]
    """Where the models run: cpu, cuda, or auto (CUDA when there is a GPU)."""
    sparsities: Sparsities = (0.25, 0.5, 0.75)
    """Sparsities of magnitude, WANDA and WANDA on each allocator's schedule."""
    structured_sparsities: Sparsities = (0.25, 0.5)
    """Sparsities of the structured units each model has."""
    allocators: Annotated[Names, AfterValidator(_allocators)] = ("owl", "sensitivity")
    """Schedules WANDA runs on (sensitivity: from WANDA probes of every prunable component)."""
    structure: Structure = "2:4"
    """The N:M structure of the WANDA N:M run ('unstructured' for none)."""
    calib_windows: Count = 64
    """Calibration windows (train split) of WANDA, OWL and the structured scores."""
    seqlen: Seqlen = 256
    """Tokens per calibration and probe window."""
    probe_windows: Count = 8
    """Validation windows of the probes behind the sensitivity schedule."""
    probe_sparsities: Sparsities = (0.25, 0.5, 0.75, 0.9)
    """Sparsities of those probes (the schedule's curves; its max_sparsity is the largest)."""
    eval_windows: EvalWindows = None
    """Test windows of eval_seqlen tokens (consecutive) for perplexity; null or 'all': the whole split."""
    eval_seqlen: Seqlen = 512
    """Tokens per evaluation window."""
    tasks: Tasks = ()
    """Objectives scored on every run besides perplexity, a column each (cloze, choice, recall, recall:P)."""
    task_items: Count = 200
    """Items per objective (the first K of a built-in task; K recall items)."""
    seed: Seed = 0
    """Seed of every window draw (and of the recall items)."""
    out: Text
    """Output directory (grid.csv, grid.json, probes/, manifest.json; rerunning resumes)."""


def _score(method: str) -> str:
    return str(getattr(METHODS[method].options(), "score", "")) if method in METHODS else ""


@JOBS.register("grid", options=GridSpec, description="the pruning grid on one or more models (test perplexity)")
def run_grid(spec: GridSpec, inputs: Inputs, *, overwrite: bool = False, show_progress: bool = True) -> JobResult:
    """Prune every model with every method and evaluate each; the grid table is the job's value."""
    import pandas as pd
    from tqdm.auto import tqdm

    from ..allocation import allocate
    from ..core.distributed import cluster
    from ..core.loading import check_source
    from ..data import calibration_windows, eval_windows
    from ..eval import definition, objective_definition
    from ..probes import probe
    from .grid import DENSE, GridPayload, plan_grid, run_grid_rows
    from .pipeline import _read_csv

    out = OutputDir(spec.out, "grid", spec, overwrite=overwrite).check()
    for name in spec.models:
        try:
            check_source(name)
        except ValueError as e:
            raise SpecError(str(e), "models") from None
    inputs.corpus(spec.data)
    for name in spec.models:  # every model loads (and is checked) before anything is written; Inputs keeps them
        inputs.model(name, field="models")
    with cluster(spec), out:
        csv = out.file("grid.csv")
        done = _read_csv(csv) if csv.is_file() else pd.DataFrame()  # the runs a killed run finished
        rows = done.drop(columns=["ppl_ratio", "prune_s"], errors="ignore").to_dict(orient="records")
        timings: dict = (out.previous or {}).get("timings") or {}  # wall times: model -> label -> sparsity
        out.manifest(status="running", timings=timings)
        corpus = inputs.corpus(spec.data)
        meaning, order, execution = "", {}, {}
        for name in spec.models:
            lm = inputs.model(name)
            test = eval_windows(corpus, lm.tokenizer, spec.eval_seqlen, split="test", max_windows=spec.eval_windows)
            meaning = definition(test)
            calib = calibration_windows(corpus, lm.tokenizer, spec.calib_windows, spec.seqlen, seed=spec.seed)
            curves = {}

            def schedule(allocator: str, budget: float, lm=lm, name=name, calib=calib, curves=curves):
                if allocator != "sensitivity":
                    return allocate(lm, allocator, budget, windows=calib, seed=spec.seed, show_progress=False)
                if "probes" not in curves:  # resumable: the sweep skips finished probes in its directory
                    curves["probes"] = probe(lm, corpus, kinds=["wanda"], sparsities=list(spec.probe_sparsities),
                                             components=list(lm.registry.resolve()), windows=spec.probe_windows,
                                             calib_windows=8, seqlen=spec.seqlen, seed=spec.seed,
                                             out=out.path / "probes" / name, show_progress=False,
                                             **spec.execution())  # fmt: skip
                return allocate(lm, "sensitivity", budget, probes=curves["probes"],
                                max_sparsity=max(spec.probe_sparsities), seed=spec.seed, show_progress=False)

            runs = plan_grid(lm.registry, spec.sparsities, spec.structured_sparsities, allocators=spec.allocators,
                             nm=spec.structure)  # fmt: skip
            order.update({(name, r.label, float(r.sparsity)): len(order) + i for i, r in enumerate(runs)})
            done = {(r["model"], r["label"], float(r["sparsity"])) for r in rows}
            todo = [r for r in runs if (name, r.label, float(r.sparsity)) not in done]
            bar = tqdm(total=len(todo), desc=f"grid {name}", disable=not show_progress)

            def on_row(run, row, seconds, name=name, lm=lm, bar=bar):
                rows.append({"model": name, "arch": lm.arch, **row, "score": _score(run.method)})
                rows.sort(key=lambda r: order[(r["model"], r["label"], float(r["sparsity"]))])  # plan order
                out.write_text("grid.csv", pd.DataFrame(rows).to_csv(index=False))
                timings.setdefault(name, {}).setdefault(run.label, {})[f"{run.sparsity:g}"] = seconds
                out.manifest(status="running", timings=timings)
                bar.update()

            payload = GridPayload(name, "float32", test, calib, {}, seed=spec.seed, tasks=spec.tasks,
                                  task_items=spec.task_items)  # fmt: skip
            stats = run_grid_rows(lm, todo, payload, spec, schedule, on_row)
            bar.close()
            execution[name] = stats.to_dict()
        # the rows as grid.csv holds them (floats in their shortest round-trip form), read back or computed now
        df = _read_csv(io.StringIO(pd.DataFrame(rows).to_csv(index=False)))
        dense = df[df.method == DENSE].set_index("model").perplexity
        df["ppl_ratio"] = df.perplexity / df.model.map(dense)
        out.write_text("grid.csv", df.to_csv(index=False))
        summary = {"benchmark": "pruning grid: test perplexity per method and sparsity", "definition": meaning,
                   "calibration": f"{spec.calib_windows} x {spec.seqlen} tokens of train, seed {spec.seed}",
                   "objectives": [objective_definition(t, spec.task_items, spec.seed) for t in spec.tasks],
                   "dense": dense.to_dict(), "cpus": os.cpu_count(), "versions": versions()}  # fmt: skip
        out.write_text("grid.json", json.dumps(summary, indent=2) + "\n")
        out.manifest(status="complete", definition=meaning, timings=timings, execution=execution)
    return JobResult(spec, {"grid": csv, "summary": out.file("grid.json")}, df)

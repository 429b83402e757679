"""The main job: every stage of the package on one model, written as a sensitivity report.

Stages (each resumes from what an earlier run in the same directory finished):

1. **components**: the registry table, and the layers table (each layer's kind and units: hybrids).
2. **probes**: ablation damage per (layer, component, kind) on held-out validation windows
   (:func:`sensitivity.probe`, resumable probe by probe).
3. **attribution** and **agreement**: activation/gradient scores and their rank correlation with the probes.
4. **schedule**: the sensitivity allocator's schedule at ``budget`` from the probes' WANDA curves
   (``schedule.yaml``, plus an llm-compressor ``recipe.yaml``).
5. **grid**: prune with each method at each sparsity and evaluate test perplexity (one row per run, appended as
   runs finish).
6. **explain**: the explainer on every method at ``explain_sparsity`` (one directory per run).
7. **render**: figures, ``report.md``, self-contained ``report.html``, ``data/*.csv``, ``manifest.json``.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..allocation import Schedule, SensitivityOptions, allocate
from ..attribution import agreement, attribute
from ..core.distributed import cluster
from ..core.jobs import Inputs
from ..core.loading import resolve_device
from ..core.objective import check_recall_pairs
from ..core.output import OutputDir, versions
from ..core.spec import SpecError
from ..data import calibration_windows, eval_windows, tokenize_split
from ..data.objective import parse_task, task_windows
from ..eval import position_nll, recall_accuracy
from ..explain import UNIT_ROWS, ExplainOptions, Explanation, explain
from ..probes import Probe, ProbeOptions, plan, probe
from ..pruning import applicable_units
from .grid import DENSE, GridPayload, GridRun, plan_grid, prune_run, ratio, run_grid_rows
from .options import GRIDS, ReportOptions, ReportSpec

__all__ = ["GRIDS", "ReportOptions", "ReportSpec", "build_report"]

logger = logging.getLogger(__name__)

STEPS = ("components", "probes", "attribution", "agreement", "schedule", "grid", "explain", "render")


def _read_csv(source) -> pd.DataFrame:
    """A CSV table as the report reads it back: every float exactly as written (they are written in the shortest
    form that round-trips), an empty file as a frame without columns."""
    try:
        return pd.read_csv(source, float_precision="round_trip")
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _reread(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """``df`` as CSV text (pandas' default float format: shortest round-trip repr) and that text read back. Stages
    hand on the read-back frame, so a run that computed a table and one that resumed from its file see the same
    values and dtypes."""
    text = df.to_csv(index=False)
    return text, _read_csv(io.StringIO(text))


def _allocators(options: ReportOptions) -> tuple[str, ...]:
    return ("sensitivity", "owl", "depth") if options.grid == "full" else ("sensitivity",)


def _explained(registry, sparsity: float) -> list[GridRun]:
    """The runs explained: magnitude, WANDA, WANDA on the sensitivity schedule, and every structured unit of the
    architecture, at ``sparsity``."""
    return [GridRun("magnitude", sparsity), GridRun("wanda", sparsity), GridRun("wanda", sparsity, "sensitivity"),
            *(GridRun(unit, sparsity) for unit in applicable_units(registry))]  # fmt: skip


LAYER_KINDS = ("zero", "mean", "resample")
"""Kinds the report's estimates read at their layer's output (``layer_kinds``): replacing a whole activation, their
change is one the gradient at the hook point misses (a zeroed gate input, hidden by the scale-invariant gated
norm); read at the layer output they rank at Spearman 0.91-0.96 instead of 0.44-0.92 (``bench_estimate.py``)."""


def _estimated_note(probes: pd.DataFrame) -> str:
    """How many of the probes are estimates and by which estimator, for the probe definition ('' when none are)."""
    damage = probes[probes.metric == "delta_nll"]
    n = int(damage.estimated.sum()) if "estimated" in damage else 0
    if not n:
        return ""
    how = " and ".join(f"'{e}'" for e in damage[damage.estimated].estimator.unique()) if "estimator" in damage \
        else "first order"  # fmt: skip
    return (f"; {n} of {len(damage)} probes are estimates ({how}; from K+1 backward passes, no probe run; column "
            f"'estimator'), the other {len(damage) - n} measured exactly")


def _row_keys(df: pd.DataFrame) -> pd.Series:
    """One string per probe row: layer, component, index, kind, sparsity and metric (missing values as -)."""
    cols = ["layer", "component", "index", "kind", "sparsity", "metric"]
    return df[cols].astype("string").fillna("-").agg("|".join, axis=1)


class _Report:
    def __init__(self, options: ReportOptions, out: OutputDir, show: bool, inputs: Inputs) -> None:
        self.o, self.out, self.dir, self.show, self.inputs = options, out, out.path, show, inputs
        self.corpus = inputs.corpus(options.data)
        self.lm = inputs.model(options.model, allow_nonfinite=options.allow_nonfinite)
        o, tok = options, self.lm.tokenizer
        heldout = "validation" if "validation" in self.corpus.splits else self.corpus.heldout_split
        test = "test" if "test" in self.corpus.splits else self.corpus.heldout_split
        self.calib = calibration_windows(self.corpus, tok, o.calib_windows, o.seqlen, seed=o.seed)
        self.explain_w = calibration_windows(self.corpus, tok, o.explain_windows, o.seqlen, seed=o.seed,
                                             split=heldout)  # fmt: skip
        self.test = eval_windows(self.corpus, tok, o.eval_seqlen, split=test, max_windows=o.eval_windows)
        self.test_split = test
        if o.tasks:  # what the objective curves read, checked before anything is written
            for task in o.tasks:
                if (kind_pairs := parse_task(task))[0] == "recall":
                    check_recall_pairs(kind_pairs[1], tok, "tasks")
                    check_recall_pairs(max(o.recall_pairs), tok, "recall_pairs")
            tokens = tokenize_split(self.corpus, tok, test).numel()
            if tokens < o.long_seqlen:
                raise SpecError(f"{o.long_seqlen:,} is longer than split {test!r} of {o.data} ({tokens:,} tokens); "
                                f"allowed: 2 to {tokens:,}", "long_seqlen")  # fmt: skip
        self.data = self.dir / "data"
        self.schedules: dict[float, Schedule] = {}
        self.timings: dict = {}
        """Wall times by stage (``grid``: label -> sparsity -> prune_s, eval_s), kept in the manifest."""
        self.execution: dict = {}
        """Where the grid ran (backend, workers, threads, restarts), kept in the manifest."""
        self.progress: Callable[[], None] = lambda: None
        """Called after each grid run (writes the manifest with the timings so far)."""

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _csv(self, name: str, df: pd.DataFrame) -> pd.DataFrame:
        """Write ``data/NAME.csv``; returns the table as read back from it (what a resumed run would see)."""
        text, back = _reread(df)
        self.out.write_text(f"data/{name}.csv", text)
        return back

    def _cached(self, name: str) -> pd.DataFrame | None:
        path = self.data / f"{name}.csv"
        return _read_csv(path) if path.is_file() else None

    def _schedule(self, allocator: str, budget: float) -> Schedule:
        if allocator == "sensitivity":
            if budget not in self.schedules:
                self.schedules[budget] = allocate(self.lm, "sensitivity", budget, probes=self._cached("probes"),
                                                  max_sparsity=max(self.o.probe_sparsities), show_progress=False)
            return self.schedules[budget]
        return allocate(self.lm, allocator, budget, windows=self.calib, seed=self.o.seed, show_progress=False)

    # -- stages ----------------------------------------------------------------------------------------------------
    def components(self) -> pd.DataFrame:
        table = self.lm.registry.table(self.lm.model)
        table["params"] = [int(pd.Series(s.split("x"), dtype="int64").prod()) if s else 0 for s in table["shape"]]
        self.layers(table)
        return self._csv("components", table)

    def layers(self, components: pd.DataFrame) -> pd.DataFrame:
        """One row per layer: its kind (``Registry.layer_kind``), its units' module paths in the block, the
        parameters of its components and the layers sharing its tensors (Zamba2's shared transformer)."""
        reg = self.lm.registry
        params = components.groupby("layer")["params"].sum()
        rows = []
        for layer in range(reg.n_layers):
            shared = sorted({other for comp in reg.components_at(layer) for other in reg.sharing(layer, comp.name)}
                            - {layer})  # fmt: skip
            rows.append({"layer": layer, "kind": reg.layer_kind(layer),
                         "units": ", ".join(f"{kind}: {path}" for kind, path in reg.units[layer].items()),
                         "params": int(params.get(layer, 0)),
                         "shares_tensors_with": ", ".join(map(str, shared))})  # fmt: skip
        return self._csv("layers", pd.DataFrame(rows))

    def probes(self) -> pd.DataFrame:
        o = self.o
        common = dict(kinds=list(o.probe_kinds), sparsities=list(o.probe_sparsities), windows=o.probe_windows,
                      calib_windows=8, seqlen=o.seqlen, seed=o.seed, show_progress=self.show,
                      **o.execution())  # fmt: skip
        planned = len(plan(self.lm.registry, ProbeOptions(kinds=o.probe_kinds, sparsities=o.probe_sparsities)))
        if o.exact == "all" or (o.exact != "none" and int(o.exact.split(":")[1]) >= planned):
            return self._csv("probes", probe(self.lm, self.corpus, out=self.dir / "probes", **common))
        layer_kinds = [k for k in o.probe_kinds if k in LAYER_KINDS] or None  # read at the layer output: see estimates
        df = probe(self.lm, self.corpus, estimate=True, layer_kinds=layer_kinds, out=self.dir / "probes-estimate",
                   **common)  # fmt: skip
        if o.exact == "none":
            return self._csv("probes", df)
        damage = df[df.metric == "delta_nll"]
        top = damage.nlargest(int(o.exact.split(":")[1]), "value", keep="first")
        # the schedule reads exact curves: the kind the sensitivity allocator reads is measured in full
        curves = damage[damage.kind == SensitivityOptions.model_fields["probe_method"].default]
        top = pd.concat([top, curves[~curves.index.isin(top.index)]]).sort_index()
        chosen = [Probe(int(r.layer), r.component, r.kind, None if pd.isna(r.index) else int(r.index),
                        None if pd.isna(r.sparsity) else float(r.sparsity)) for r in top.itertuples()]  # fmt: skip
        exact = probe(self.lm, self.corpus, only=chosen, out=self.dir / "probes", **common)
        measured = dict(zip(_row_keys(exact), exact.value))
        keys = _row_keys(df)
        estimated = ~keys.isin(measured)
        df = df.assign(value=[measured.get(k, v) for k, v in zip(keys, df.value)], estimated=estimated,
                       estimator=df.estimator.where(estimated, "exact"))  # fmt: skip
        return self._csv("probes", df)

    def attribution(self) -> pd.DataFrame:
        if (done := self._cached("attribution")) is not None:
            return done
        windows = calibration_windows(self.corpus, self.lm.tokenizer, self.o.attribution_windows, self.o.seqlen,
                                      seed=self.o.seed)  # fmt: skip
        return self._csv("attribution", attribute(self.lm, windows, seed=self.o.seed, show_progress=self.show))

    def agreement(self, probes: pd.DataFrame, attribution: pd.DataFrame) -> pd.DataFrame:
        return self._csv("agreement", agreement(probes, attribution))

    def schedule(self, probes: pd.DataFrame) -> pd.DataFrame:
        o = self.o
        for b in sorted({o.budget, *o.sparsities}):
            file = self.dir / "schedule.yaml" if b == o.budget else self.dir / "schedules" / f"sensitivity-{b:g}.yaml"
            if not file.is_file():
                schedule = allocate(self.lm, "sensitivity", b, probes=probes, max_sparsity=max(o.probe_sparsities),
                                    seed=o.seed, show_progress=False)  # fmt: skip
                file.parent.mkdir(parents=True, exist_ok=True)
                schedule.to_yaml(file)
            self.schedules[b] = Schedule.from_yaml(file)  # as written, whether computed now or by a killed run
            if b == o.budget:  # (re)written from the file: a run killed before it was written still gets it
                self.out.write_text("recipe.yaml", self.schedules[b].to_recipe())
        return self._csv("schedule", self.schedules[o.budget].frame())

    def grid(self) -> pd.DataFrame:
        from ..explain import verdict

        o = self.o
        done = self._cached("grid")  # the rows of the runs finished (plus ppl_ratio and verdict once all are)
        rows = [] if done is None else done.drop(columns=["ppl_ratio", "verdict", "prune_s"],
                                                 errors="ignore").to_dict(orient="records")  # fmt: skip
        have = {(r["label"], float(r["sparsity"])) for r in rows}
        plan = plan_grid(self.lm.registry, o.sparsities, o.structured_sparsities, allocators=_allocators(o))
        runs = [r for r in plan if (r.label, float(r.sparsity)) not in have]
        timings = self.timings.setdefault("grid", {})
        order = {(r.label, float(r.sparsity)): i for i, r in enumerate(plan)}
        bar = tqdm(total=len(runs), desc="pruning grid", disable=not self.show)

        def on_row(run: GridRun, row: dict, seconds: dict[str, float]) -> None:
            rows.append(row)
            rows.sort(key=lambda r: order[(r["label"], float(r["sparsity"]))])  # plan order, as they arrive
            self._csv("grid", pd.DataFrame(rows))
            timings.setdefault(run.label, {})[f"{run.sparsity:g}"] = seconds  # wall times: manifest, never a CSV
            self.progress()
            bar.update()

        payload = GridPayload(o.model, "float32", self.test, self.calib, {}, seed=o.seed, tasks=o.tasks,
                              task_items=o.task_items)  # fmt: skip
        self.execution["grid"] = run_grid_rows(self.lm, runs, payload, o, self._schedule, on_row).to_dict()
        bar.close()
        df = _reread(pd.DataFrame(rows))[1]  # the rows as grid.csv holds them, however many were read back
        dense_nll = float(df[df.method == DENSE].nll.iloc[0])
        df["ppl_ratio"] = [ratio(nll, dense_nll) for nll in df.nll]
        df["verdict"] = ["dense" if m == DENSE else verdict(r, healthy=o.healthy, collapsed=o.collapsed)
                         for m, r in zip(df.method, df.ppl_ratio)]  # fmt: skip
        return self._csv("grid", df)

    def explain(self) -> dict[str, list[Explanation]]:
        """Objective -> the explanation of every explained run on it (``text`` first). With tasks, also the curves
        of each run (and of the dense model): recall against pairs, NLL by position (``curves.csv`` per run)."""
        o, s = self.o, self.o.explain_sparsity
        objectives = ("text", *o.tasks)
        results: dict[str, list[Explanation]] = {t: [] for t in objectives}
        runs = _explained(self.lm.registry, s)
        if o.tasks and not (self.dir / "explain" / "dense" / "curves.csv").is_file():
            self._curves(self.lm, self.dir / "explain" / "dense")
        for run in tqdm(runs, desc="explaining", disable=not self.show):
            base = self.dir / "explain" / f"{run.label.replace(' ', '_').replace(':', '-')}-{s:g}"
            paths = {t: base if t == "text" else base / t.replace(":", "-") for t in objectives}
            todo = [t for t in objectives if not (paths[t] / "explanation.json").is_file()]
            curves = bool(o.tasks) and not (base / "curves.csv").is_file()
            if todo or curves:
                pruned = self.inputs.fresh(o.model, allow_nonfinite=o.allow_nonfinite)
                prune_run(pruned, run, self.calib, self._schedule, seed=o.seed, mask=True)
                for t in todo:
                    windows = self.explain_w if t == "text" else task_windows(t, self.lm.tokenizer,
                                                                              items=o.explain_items, seed=o.seed)
                    e = explain(self.lm, pruned, windows, label=run.label, sparsity=s, healthy=o.healthy,
                                collapsed=o.collapsed, seed=o.seed, show_progress=self.show)  # fmt: skip
                    paths[t].parent.mkdir(parents=True, exist_ok=True)
                    e.save(paths[t], overwrite=True)
                if curves:
                    self._curves(pruned, base)
            for t in objectives:
                results[t].append(Explanation.load(paths[t]))  # as saved: what a resumed run reads back
        return results

    def _curves(self, lm, path: Path) -> None:
        """Recall accuracy against pairs (when a recall objective is asked for) and NLL by position of ``lm``,
        written to ``path/curves.csv`` (long format: curve, x, value)."""
        o, rows = self.o, []
        if any(parse_task(t)[0] == "recall" for t in o.tasks):
            acc = recall_accuracy(lm, self.lm.tokenizer, pairs=o.recall_pairs, items=64, seed=o.seed,
                                  show_progress=False).groupby("pairs").correct.mean()  # fmt: skip
            rows += [{"curve": "recall_pairs", "x": int(p), "value": float(v)} for p, v in acc.items()]
        pos = position_nll(lm, self.lm.tokenizer, seqlen=o.long_seqlen, windows=o.long_windows, corpus=self.corpus,
                           split=self.test_split, show_progress=False)  # fmt: skip
        rows += [{"curve": "position_nll", "x": int(r.stop), "value": float(r.nll)} for r in pos.itertuples()]
        path.mkdir(parents=True, exist_ok=True)
        self.out.write_text(str((path / "curves.csv").relative_to(self.dir)), pd.DataFrame(rows).to_csv(index=False))


def build_report(
    out: str | Path,
    options: ReportOptions | None = None,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    inputs: Inputs | None = None,
    **overrides,
) -> dict[str, Path]:
    """Run the whole pipeline on one model and write the sensitivity report into ``out``.

    Rerunning into the same directory with the same options resumes: finished probes, grid runs and explanations
    are read back instead of recomputed. Another process writing the same directory is refused.

    Args:
        out: Output directory.
        options: What to run (:class:`ReportOptions`); keyword ``overrides`` change its fields (e.g.
            ``model="default-mamba1"``).
        overwrite: Start again (emptying it) in a directory that holds a report made with other settings; a
            directory holding anything but a sensitivity output is never emptied.
        show_progress: Show tqdm bars.
        inputs: Loaded models and corpora to reuse.

    Returns:
        Paths of what was written: ``html``, ``markdown``, ``manifest``, ``schedule_yaml``, ``data`` and one per
        figure (named as the PNG without ``.png``).

    Raises:
        SpecError: For bad options.
        OutputError: For an ``out`` that holds another report (without ``overwrite``), or is being written by
            another process.

    Examples:
        >>> paths = build_report("reports/default")  # the embedded default model and corpus, about 10 min
        >>> paths["html"]
    """
    options = options or ReportOptions()
    fields = {k: v for k, v in options.to_dict().items() if k in ReportOptions.model_fields}
    spec = ReportSpec(**{**fields, **overrides, "out": str(out)})
    directory = OutputDir(out, "report", spec, overwrite=overwrite).check()
    try:
        resolve_device(spec.device)
    except ValueError as e:
        raise SpecError(str(e), "device") from None
    inputs = inputs or Inputs()
    inputs.device = spec.device
    run = _Report(spec, directory, show_progress, inputs)  # loads and checks the inputs; writes nothing
    with cluster(spec), directory:
        return _build(spec, directory, run)


def _objective_tables(o: ReportSpec, run: _Report, grid: pd.DataFrame, by_task: dict) -> dict[str, pd.DataFrame]:
    """The tables of the task objectives: ``objectives`` (accuracy per grid run and objective, with the dense
    accuracy), ``objective_verdicts`` (the explainer on each objective's items) and ``curves`` (recall against pairs
    and NLL by position, dense and every explained run)."""
    from ..eval import objective_column, objective_definition

    rows = []
    for task in o.tasks:
        column = objective_column(task)
        dense = float(grid.loc[grid.method == DENSE, column].iloc[0])
        for r in grid.itertuples():
            rows.append({"objective": task, "label": r.label, "method": r.method, "sparsity": r.sparsity,
                         "accuracy": float(getattr(r, column)), "dense_accuracy": dense,
                         "definition": objective_definition(task, o.task_items, o.seed)})  # fmt: skip
    verdicts = [{"objective": task, **e.summary()} for task in o.tasks for e in by_task[task]]
    curves = []
    for path in sorted((run.dir / "explain").glob("*/curves.csv")):
        df = _read_csv(path)
        name = path.parent.name
        label, sparsity = ("dense", 0.0) if name == "dense" else next(
            (r.label, r.sparsity) for r in _explained(run.lm.registry, o.explain_sparsity)
            if name == f"{r.label.replace(' ', '_').replace(':', '-')}-{o.explain_sparsity:g}")  # fmt: skip
        curves.append(df.assign(label=label, sparsity=sparsity))
    curves_df = pd.concat(curves, ignore_index=True)[["label", "sparsity", "curve", "x", "value"]]
    return {"objectives": run._csv("objectives", pd.DataFrame(rows)),
            "objective_verdicts": run._csv("objective_verdicts", pd.DataFrame(verdicts)),
            "curves": run._csv("curves", curves_df)}  # fmt: skip


def _build(o: ReportSpec, out: OutputDir, run: _Report) -> dict[str, Path]:
    from ..eval import definition
    from .render import write_report

    previous = out.previous or {}
    started = datetime.now(UTC).isoformat(timespec="seconds")
    record = {"seed": o.seed, "created": previous.get("created", started), "resumed": bool(previous), "steps": {}}
    run.timings.update(previous.get("timings") or {})  # those of the grid runs a killed run finished
    record["timings"] = run.timings
    run.progress = lambda: out.manifest(**record, status="running")
    out.manifest(**record, status="running")
    run.data.mkdir(parents=True, exist_ok=True)
    tables: dict[str, pd.DataFrame] = {}

    def step(name: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        record["steps"][name] = {"seconds": round(time.perf_counter() - t, 2), "done": True}
        out.manifest(**record, status="running")
        logger.info("report step %s: %.1f s", name, record["steps"][name]["seconds"])
        return result

    tables["components"] = step("components", run.components)
    tables["layers"] = run._cached("layers")
    tables["probes"] = step("probes", run.probes)
    tables["attribution"] = step("attribution", run.attribution)
    tables["agreement"] = step("agreement", run.agreement, tables["probes"], tables["attribution"])
    tables["schedule"] = step("schedule", run.schedule, tables["probes"])
    tables["grid"] = step("grid", run.grid)
    by_task = step("explain", run.explain)
    explanations = by_task["text"]
    if o.tasks:
        tables.update(_objective_tables(o, run, tables["grid"], by_task))
    grid = tables["grid"].set_index(["label", "sparsity"])
    for name, key in (("drift", "drift"), ("patching", "patching"), ("dynamics", "dynamics"),
                      ("dynamics_samples", "samples"), ("states", "states")):  # fmt: skip
        df = pd.concat([e.frames()[key] for e in explanations], ignore_index=True)
        if name == "patching":  # per model, layer by layer in registry order (the heatmap's column order)
            rank = {c: i for i, c in enumerate([*run.lm.registry.component_names, *UNIT_ROWS.values()])}
            df = df.assign(_m=df.label.map({lab: i for i, lab in enumerate(dict.fromkeys(df.label))}),
                           _c=df.component.map(rank)).sort_values(["_m", "layer", "_c"], kind="stable")
            df = df.drop(columns=["_m", "_c"]).reset_index(drop=True)
        tables[name] = run._csv(name, df)
    verdict_rows = []
    for e in explanations:
        row = e.summary()
        test = grid.loc[(e.label, e.sparsity)] if (e.label, e.sparsity) in grid.index else None
        if test is not None:  # the verdict of record comes from the test perplexity of the grid
            row.update(ppl_ratio=float(test.ppl_ratio), verdict=str(test.verdict))
        verdict_rows.append(row)
    tables["verdicts"] = run._csv("verdicts", pd.DataFrame(verdict_rows))

    dense = tables["grid"][tables["grid"].method == DENSE].iloc[0]
    meta = {"model": run.lm.name, "arch": run.lm.arch, "n_layers": run.lm.registry.n_layers,
            "params": run.lm.n_params, "dense_ppl": float(dense.perplexity),
            "ppl_definition": definition(run.test),
            "probe_definition": f"delta_nll = mean next-token NLL with the component ablated minus dense, over "
                                f"{o.probe_windows} random validation windows of {o.seqlen} tokens "
                                f"(seed {o.seed}){_estimated_note(tables['probes'])}",
            "explain_definition": explanations[0].definition if explanations else "",
            "seed": o.seed, "budget": o.budget, "explain_sparsity": o.explain_sparsity,
            "thresholds": {"healthy": o.healthy, "collapsed": o.collapsed, "drift": ExplainOptions().drift_threshold},
            "calibration": run.calib.describe(),
            **({"layer_kinds": [run.lm.registry.layer_kind(i) for i in range(run.lm.registry.n_layers)]}
               if run.lm.registry.is_hybrid else {}),
            "created": record["created"], "versions": versions(),
            "timings": {k: v["seconds"] for k, v in record["steps"].items()}}  # fmt: skip
    t = time.perf_counter()
    paths = write_report(out.path, tables, meta)
    record["steps"]["render"] = {"seconds": round(time.perf_counter() - t, 2), "done": True}
    record["outputs"] = sorted(str(p.relative_to(out.path)) for p in out.path.rglob("*") if p.is_file()
                               and p.name != "manifest.json")  # fmt: skip
    record["meta"] = {k: v for k, v in meta.items() if k not in ("versions",)}
    out.manifest(**record, execution=run.execution, status="complete")
    return {**paths, "manifest": out.file("manifest.json"), "schedule_yaml": out.file("schedule.yaml"),
            "data": run.data}  # fmt: skip

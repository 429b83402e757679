"""The main job: every stage of the package on one model, written as a sensitivity report.

Stages (each resumes from what an earlier run in the same directory finished):

1. **components**: the registry table.
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

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..core.loading import DEFAULT_MODEL
from ..core.output import atomic_write_text, versions, write_manifest
from ..data.corpus import DEFAULT_CORPUS
from ..explain.explainer import DRIFT
from ..pruning.structured import UNITS, applicable_units

__all__ = ["GRIDS", "ReportConfig", "build_report"]

logger = logging.getLogger(__name__)

GRIDS = ("reduced", "full")
STEPS = ("components", "probes", "attribution", "agreement", "schedule", "grid", "explain", "render")


@dataclass(frozen=True)
class ReportConfig:
    """Everything a report depends on; stored in ``manifest.json`` and checked when a run resumes.

    Attributes:
        model: Zoo name, checkpoint directory or hub id.
        data: Corpus (see :func:`sensitivity.load_corpus`).
        seed: Seed of every window draw and subsample.
        seqlen: Tokens per probe, calibration and explain window.
        probe_windows: Validation windows the probes measure damage on.
        probe_kinds: Ablation kinds probed.
        probe_sparsities: Sparsities of the magnitude/WANDA probes (the sensitivity allocator's curves).
        attribution_windows: Calibration windows for attribution.
        calib_windows: Train windows for WANDA statistics and structured scores.
        eval_windows: Test windows (of ``eval_seqlen`` tokens, consecutive) for perplexity; None = the whole split.
        eval_seqlen: Tokens per evaluation window.
        budget: Global sparsity of the derived schedule (``schedule.yaml``).
        sparsities: Sparsities of the weight-pruning grid.
        structured_sparsities: Sparsities of the structured (state, head, head-dim) grid.
        grid: ``reduced`` (magnitude, WANDA, WANDA + sensitivity schedule, 2:4, structured) or ``full``
            (adds WANDA + OWL and WANDA + depth schedules).
        explain_sparsity: Sparsity at which every method is explained.
        explain_windows: Validation windows the explainer runs on.
        healthy: Perplexity ratio up to which a run is healthy.
        collapsed: Perplexity ratio from which a run has collapsed.
    """

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_CORPUS
    seed: int = 0
    seqlen: int = 256
    probe_windows: int = 8
    probe_kinds: tuple[str, ...] = ("zero", "wanda", "magnitude")
    probe_sparsities: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    attribution_windows: int = 8
    calib_windows: int = 32
    eval_windows: int | None = 48
    eval_seqlen: int = 512
    budget: float = 0.5
    sparsities: tuple[float, ...] = (0.25, 0.5, 0.75)
    structured_sparsities: tuple[float, ...] = (0.25, 0.5)
    grid: str = "reduced"
    explain_sparsity: float = 0.5
    explain_windows: int = 4
    healthy: float = 1.2
    collapsed: float = 2.0

    def __post_init__(self) -> None:
        for name in ("probe_kinds", "probe_sparsities", "sparsities", "structured_sparsities"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; allowed: {', '.join(GRIDS)}")
        for name in ("probe_windows", "attribution_windows", "calib_windows", "explain_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} must be an integer >= 1")
        if self.eval_windows is not None and (not isinstance(self.eval_windows, int) or self.eval_windows < 1):
            raise ValueError(f"eval_windows {self.eval_windows!r} must be an integer >= 1 or None (whole split)")
        for name in ("budget", "explain_sparsity"):
            if not (isinstance(getattr(self, name), (int, float)) and 0 < getattr(self, name) < 1):
                raise ValueError(f"{name} {getattr(self, name)!r} out of range; allowed: 0 < {name} < 1")
        for name in ("probe_sparsities", "sparsities", "structured_sparsities"):
            if bad := [s for s in getattr(self, name) if not (isinstance(s, (int, float)) and 0 < s < 1)]:
                raise ValueError(f"{name} holds {bad[0]!r}; allowed: values with 0 < s < 1")
        if not 1.0 <= self.healthy < self.collapsed:
            raise ValueError(f"healthy={self.healthy!r}, collapsed={self.collapsed!r}; need 1 <= healthy < collapsed")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ReportConfig:
        known = {f.name for f in fields(cls)}
        if bad := sorted(set(d) - known):
            raise ValueError(f"unknown report option {bad[0]!r}; allowed: {', '.join(sorted(known))}")
        return cls(**d)


def _plan(cfg: ReportConfig, registry) -> list[tuple[str, str, float]]:
    """(label, method, sparsity) of every grid run; the dense run first."""
    runs = [("dense", "dense", 0.0)]
    labels = ["magnitude", "wanda", "wanda+sensitivity"] + (["wanda+owl", "wanda+depth"] if cfg.grid == "full" else [])
    for s in cfg.sparsities:
        runs += [(label, label.split("+")[0], s) for label in labels]
    runs.append(("wanda 2:4", "wanda", 0.5))
    units = applicable_units(registry)
    runs += [(u, u, s) for u in units for s in cfg.structured_sparsities]
    return runs


def _explained(cfg: ReportConfig, registry) -> list[tuple[str, str]]:
    """(label, method) explained at ``explain_sparsity``."""
    units = applicable_units(registry)
    return [("magnitude", "magnitude"), ("wanda", "wanda"), ("wanda+sensitivity", "wanda"), *[(u, u) for u in units]]


class _Report:
    def __init__(self, cfg: ReportConfig, out: Path, show: bool) -> None:
        from ..core import load_model
        from ..data import calibration_windows, eval_windows, load_corpus

        self.cfg, self.out, self.show = cfg, out, show
        self.corpus = load_corpus(cfg.data)
        self.lm = load_model(cfg.model)
        if self.lm.tokenizer is None:
            raise ValueError(f"model {cfg.model!r} has no tokenizer; save one next to its config")
        tok = self.lm.tokenizer
        heldout = "validation" if "validation" in self.corpus.splits else self.corpus.heldout_split
        test = "test" if "test" in self.corpus.splits else self.corpus.heldout_split
        self.calib = calibration_windows(self.corpus, tok, cfg.calib_windows, cfg.seqlen, seed=cfg.seed)
        self.explain_w = calibration_windows(self.corpus, tok, cfg.explain_windows, cfg.seqlen, seed=cfg.seed,
                                             split=heldout)  # fmt: skip
        self.test = eval_windows(self.corpus, tok, cfg.eval_seqlen, split=test, max_windows=cfg.eval_windows)
        self.data = out / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.schedules: dict[float, object] = {}

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _csv(self, name: str, df: pd.DataFrame) -> pd.DataFrame:
        atomic_write_text(self.data / f"{name}.csv", df.to_csv(index=False, float_format="%.8g"))
        return df

    def _cached(self, name: str) -> pd.DataFrame | None:
        path = self.data / f"{name}.csv"
        return pd.read_csv(path) if path.is_file() else None

    def _fresh(self):
        """A new copy of the dense model (pruning works in place)."""
        import copy

        from ..core.loading import LoadedModel

        lm = self.lm
        return LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.registry, lm.name)

    # -- stages ----------------------------------------------------------------------------------------------------
    def components(self) -> pd.DataFrame:
        table = self.lm.registry.table(self.lm.model)
        table["params"] = [int(pd.Series(s.split("x"), dtype="int64").prod()) if s else 0 for s in table["shape"]]
        return self._csv("components", table)

    def probes(self) -> pd.DataFrame:
        from ..probes import probe

        cfg = self.cfg
        df = probe(self.lm, self.corpus, kinds=list(cfg.probe_kinds), sparsities=list(cfg.probe_sparsities),
                   windows=cfg.probe_windows, calibration_windows=8, seqlen=cfg.seqlen, seed=cfg.seed,
                   out=self.out / "probes", show_progress=self.show)  # fmt: skip
        return self._csv("probes", df)

    def attribution(self) -> pd.DataFrame:
        from ..attribution import attribute
        from ..data import calibration_windows

        if (done := self._cached("attribution")) is not None:
            return done
        windows = calibration_windows(self.corpus, self.lm.tokenizer, self.cfg.attribution_windows, self.cfg.seqlen,
                                      seed=self.cfg.seed)  # fmt: skip
        return self._csv("attribution", attribute(self.lm, windows, seed=self.cfg.seed, show_progress=self.show))

    def agreement(self, probes: pd.DataFrame, attribution: pd.DataFrame) -> pd.DataFrame:
        from ..attribution import agreement

        return self._csv("agreement", agreement(probes, attribution))

    def schedule(self, probes: pd.DataFrame) -> pd.DataFrame:
        from ..allocation import Schedule, allocate

        cfg = self.cfg
        path = self.out / "schedule.yaml"
        budgets = sorted({cfg.budget, *cfg.sparsities})
        for b in budgets:
            file = path if b == cfg.budget else self.out / "schedules" / f"sensitivity-{b:g}.yaml"
            if file.is_file():
                self.schedules[b] = Schedule.from_yaml(file)
                continue
            schedule = allocate(self.lm, "sensitivity", b, probes=probes, max_sparsity=max(cfg.probe_sparsities),
                                seed=cfg.seed, show_progress=False)  # fmt: skip
            file.parent.mkdir(parents=True, exist_ok=True)
            schedule.to_yaml(file)
            if b == cfg.budget:
                atomic_write_text(self.out / "recipe.yaml", schedule.to_recipe())
            self.schedules[b] = schedule
        return self._csv("schedule", self.schedules[cfg.budget].frame())

    def _prune(self, label: str, method: str, s: float, *, for_explain: bool = False):
        from ..allocation import allocate
        from ..pruning import prune

        lm = self._fresh()
        options: dict = {}
        if label == "wanda+sensitivity":
            options["schedule"] = self.schedules[s]
        elif label in ("wanda+owl", "wanda+depth"):
            options["schedule"] = allocate(lm, label.split("+")[1], s, windows=self.calib, seed=self.cfg.seed,
                                           show_progress=False)  # fmt: skip
        elif label == "wanda 2:4":
            options["structure"] = "2:4"
        else:
            options["sparsity"] = s
        if method == "magnitude":
            options["compare"] = "tensor"
        if method in UNITS:
            options["score"] = "taylor" if method == "state" else "flap"
            if for_explain:
                options["mode"] = "mask"  # equal shapes, so restoration patching applies
        windows = None if method == "magnitude" else self.calib
        result = prune(lm, method, windows=windows, seed=self.cfg.seed, show_progress=False, **options)
        return lm, result

    def grid(self) -> pd.DataFrame:
        from ..eval import perplexity
        from ..explain import verdict

        cfg = self.cfg
        done = self._cached("grid")
        rows = [] if done is None else done.to_dict(orient="records")
        have = {(r["label"], float(r["sparsity"])) for r in rows}
        runs = [r for r in _plan(cfg, self.lm.registry) if (r[0], float(r[2])) not in have]
        for label, method, s in tqdm(runs, desc="pruning grid", disable=not self.show):
            start = time.perf_counter()
            if method == "dense":
                lm, counts = self.lm, {"params": self.lm.n_params, "nonzero": self.lm.n_params}
            else:
                lm, result = self._prune(label, method, s)
                counts = result.manifest["params_after"]
            prune_s = time.perf_counter() - start
            ppl = perplexity(lm, self.test, show_progress=False)
            rows.append({"label": label, "method": method, "sparsity": s, "perplexity": ppl.perplexity,
                         "nll": ppl.nll, "tokens": ppl.tokens, "params": counts["params"],
                         "nonzero": counts["nonzero"], "prune_s": round(prune_s, 2)})  # fmt: skip
            self._csv("grid", pd.DataFrame(rows))
            logger.info("grid %s %.2f: ppl %.3f", label, s, ppl.perplexity)
        df = pd.DataFrame(rows)
        dense_nll = float(df[df.label == "dense"].nll.iloc[0])
        df["ppl_ratio"] = [_exp(nll - dense_nll) for nll in df.nll]
        df["verdict"] = [
            "dense" if lab == "dense" else verdict(r, healthy=cfg.healthy, collapsed=cfg.collapsed)
            for lab, r in zip(df.label, df.ppl_ratio)
        ]
        return self._csv("grid", df)

    def explain(self):
        from ..explain import Explanation, explain

        cfg, s = self.cfg, self.cfg.explain_sparsity
        results = []
        for label, method in tqdm(_explained(cfg, self.lm.registry), desc="explaining", disable=not self.show):
            path = self.out / "explain" / f"{label.replace(' ', '_').replace(':', '-')}-{s:g}"
            if (path / "explanation.json").is_file():
                results.append(Explanation.load(path))
                continue
            if label == "wanda+sensitivity" and s not in self.schedules:
                from ..allocation import allocate

                self.schedules[s] = allocate(self.lm, "sensitivity", s, probes=self._cached("probes"),
                                             max_sparsity=max(cfg.probe_sparsities), show_progress=False)
            pruned, _ = self._prune(label, method, s, for_explain=True)
            e = explain(self.lm, pruned, self.explain_w, label=label, sparsity=s, healthy=cfg.healthy,
                        collapsed=cfg.collapsed, seed=cfg.seed, show_progress=self.show)  # fmt: skip
            e.save(path, overwrite=True)
            results.append(e)
        return results


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def _check_resume(out: Path, cfg: ReportConfig, overwrite: bool) -> dict:
    """The manifest of an earlier run in ``out`` with the same configuration ({} when starting afresh).

    ``overwrite`` starts again only in a directory that holds a report (or nothing): no other directory is deleted.
    """
    manifest = out / "manifest.json"
    if not out.exists():
        return {}
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    old = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if old.get("command") == "report":
        if old.get("config") == cfg.to_dict():
            return old
        if overwrite:
            return {}
        diff = [k for k, v in cfg.to_dict().items() if old.get("config", {}).get(k) != v]
        raise ValueError(f"--out {out} holds a report made with other settings ({', '.join(diff)}); use another "
                         "--out, or --overwrite to start it again")  # fmt: skip
    if any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no report; give a new or empty directory")
    return {}


def build_report(
    out: str | Path,
    config: ReportConfig | None = None,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    **options,
) -> dict[str, Path]:
    """Run the whole pipeline on one model and write the sensitivity report into ``out``.

    Rerunning into the same directory with the same configuration resumes: finished probes, grid runs and
    explanations are read back instead of recomputed.

    Args:
        out: Output directory.
        config: What to run; keyword ``options`` override its fields (e.g. ``model="default-mamba1"``).
        overwrite: Start again (deleting it) in a directory that holds a report made with other settings; a
            directory holding anything but a report is never deleted.
        show_progress: Show tqdm bars.

    Returns:
        Paths of what was written: ``html``, ``markdown``, ``manifest``, ``schedule_yaml``, ``data`` and one per
        figure (named as the PNG without ``.png``).

    Raises:
        ValueError: For bad options, or an ``out`` that holds another report (without ``overwrite``).

    Example:
        >>> paths = build_report("reports/default")  # the embedded default model and corpus, about 10 min
        >>> paths["html"]
    """
    import shutil

    from .render import write_report

    cfg = config or ReportConfig()
    if options:
        cfg = ReportConfig.from_dict({**cfg.to_dict(), **options})
    out = Path(out).expanduser().resolve()
    previous = _check_resume(out, cfg, overwrite)
    if overwrite and out.is_dir() and not previous:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {"command": "report", "config": cfg.to_dict(), "seed": cfg.seed,
                "created": previous.get("created", started), "resumed": bool(previous),
                "steps": {}, "versions": versions()}  # fmt: skip
    write_manifest(out / "manifest.json", manifest)

    run = _Report(cfg, out, show_progress)
    tables: dict[str, pd.DataFrame] = {}

    def step(name: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        manifest["steps"][name] = {"seconds": round(time.perf_counter() - t, 2), "done": True}
        write_manifest(out / "manifest.json", manifest)
        logger.info("report step %s: %.1f s", name, manifest["steps"][name]["seconds"])
        return result

    tables["components"] = step("components", run.components)
    tables["probes"] = step("probes", run.probes)
    tables["attribution"] = step("attribution", run.attribution)
    tables["agreement"] = step("agreement", run.agreement, tables["probes"], tables["attribution"])
    tables["schedule"] = step("schedule", run.schedule, tables["probes"])
    tables["grid"] = step("grid", run.grid)
    explanations = step("explain", run.explain)
    grid = tables["grid"].set_index(["label", "sparsity"])
    for name, key in (("drift", "drift"), ("patching", "patching"), ("dynamics", "dynamics"),
                      ("dynamics_samples", "samples"), ("states", "states")):  # fmt: skip
        df = pd.concat([e.frames()[key] for e in explanations], ignore_index=True)
        if name == "patching":  # per model, layer by layer in registry order (the heatmap's column order)
            rank = {c: i for i, c in enumerate([*run.lm.registry.component_names, "mixer"])}
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

    dense = tables["grid"][tables["grid"].label == "dense"].iloc[0]
    from ..eval.perplexity import _scored  # the same definition string `sensitivity evaluate` prints

    meta = {"model": run.lm.name, "arch": run.lm.arch, "n_layers": run.lm.registry.n_layers,
            "params": run.lm.n_params, "dense_ppl": float(dense.perplexity),
            "ppl_definition": f"token-level perplexity exp(mean next-token NLL, nats) over {_scored(run.test)}",
            "probe_definition": f"delta_nll = mean next-token NLL with the component ablated minus dense, over "
                                f"{cfg.probe_windows} random validation windows of {cfg.seqlen} tokens "
                                f"(seed {cfg.seed})",
            "explain_definition": explanations[0].definition if explanations else "",
            "seed": cfg.seed, "budget": cfg.budget, "explain_sparsity": cfg.explain_sparsity,
            "thresholds": {"healthy": cfg.healthy, "collapsed": cfg.collapsed, "drift": DRIFT},
            "calibration": run.calib.describe(),
            "created": manifest["created"], "versions": manifest["versions"],
            "timings": {k: v["seconds"] for k, v in manifest["steps"].items()}}  # fmt: skip
    t = time.perf_counter()
    paths = write_report(out, tables, meta)
    manifest["steps"]["render"] = {"seconds": round(time.perf_counter() - t, 2), "done": True}
    manifest["outputs"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                                 and p.name != "manifest.json")  # fmt: skip
    manifest["meta"] = {k: v for k, v in meta.items() if k not in ("versions",)}
    write_manifest(out / "manifest.json", manifest)
    return {**paths, "manifest": out / "manifest.json", "schedule_yaml": out / "schedule.yaml", "data": run.data}

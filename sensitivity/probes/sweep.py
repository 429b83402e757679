"""The probe sweep: every ablation of every component of every layer, measured on held-out windows.

The cached sweep runs the dense model once, keeping the residual stream entering each layer and the dense
next-token log-probabilities; a probe at layer ``l`` then runs only blocks ``l..L-1``, the final norm and the head.
The batched sweep (``sweep="batched"``) also starts from the cached residual stream; it runs each probe's ablated
layer alone and then the rest of the model once for up to ``stack`` probes of the same layer, their outputs stacked
along the batch axis, and reuses the result of a probe whose ablated layer output is bitwise equal to an earlier
one's (``z``, ``norm`` and ``out_proj`` zeroed and the mixer removed all make the mixer output 0). The naive sweep
(``sweep="naive"``) runs the whole model for every probe. All three give the same numbers (to float32 round-off:
a stacked batch may sum in another order).

Metrics per probe, over the same positions as :func:`sensitivity.eval.perplexity` (all but the last token of each
window): ``delta_nll`` = mean next-token NLL ablated minus dense (nats/token), ``ppl_ratio`` = ``exp(delta_nll)``,
``kl`` = mean per-token ``KL(dense || ablated)`` (nats).

Shape legend: B batch (windows), L sequence length, D model width, V vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.distributed import run_shards
from ..core.finite import NonFiniteError, check_loss, first_nonfinite
from ..core.hooks import capture, hook_name
from ..core.loading import LoadedModel, as_loaded
from ..core.objective import objective_windows
from ..core.output import OutputDir
from ..core.registry import Registry
from ..core.runner import LayerRunner
from ..core.scores import input_norm
from ..core.spec import SpecError
from ..core.stats import channel_stats
from ..data import Corpus, Windows, calibration_windows, load_corpus
from .ablations import (
    KINDS,
    UNIT_OF,
    UNITS,
    Context,
    Probe,
    ablate,
    applicable,
    exists,
    needed_points,
    present,
    resample_point,
)
from .estimate import estimate
from .options import COLUMNS, METRICS, SWEEPS, ProbeOptions

__all__ = ["COLUMNS", "METRICS", "SWEEPS", "ProbeOptions", "plan", "probe"]

logger = logging.getLogger(__name__)

def plan(registry: Registry, options: ProbeOptions) -> list[Probe]:
    """The probes ``options`` asks for on ``registry``'s architecture, in sweep order (layer-major).

    Raises:
        SpecError: For an unknown component or a layer out of range.
    """
    allowed = [c for c in (*registry.component_names, *UNITS) if exists(registry, c)]
    if options.components is None:
        comps = [*registry.component_names, "mixer", *(["head"] if "H" in registry.dims else [])]
        if registry.is_hybrid:
            comps += [u for u in ("attention", "mlp", "moe", "block") if exists(registry, u)]
    else:
        comps = list(options.components)
        for c in comps:
            if c in UNITS and c not in allowed:
                where = "Mamba-2 mixers" if c == "head" else f"{UNIT_OF[c] or 'hybrid'} layers"
                raise SpecError(f"{c!r} needs {where}; {registry.arch} has none; allowed: {', '.join(allowed)}",
                                "components")  # fmt: skip
            if c not in allowed:
                raise SpecError(f"unknown component {c!r} for {registry.arch}; allowed: {', '.join(allowed)}",
                                "components")  # fmt: skip
    if options.layers is None:
        layers = range(registry.n_layers)
    else:
        layers = [registry.check_layer(i, "layers") for i in options.layers]
    kinds = options.kinds or tuple(KINDS)
    probes = []
    for layer in layers:
        for comp in comps:
            if not present(registry, layer, comp):
                continue
            for kind in kinds:
                if not applicable(registry, comp, kind):
                    continue
                if KINDS[kind].info.get("sparsify"):
                    probes += [Probe(layer, comp, kind, sparsity=s) for s in options.sparsities]
                elif comp == "head":
                    probes += [Probe(layer, comp, kind, h) for h in range(registry.dims["H"])]
                elif comp == "attn_head":
                    probes += [Probe(layer, comp, kind, h) for h in range(registry.dims["AH"])]
                elif comp == "expert":
                    probes += [Probe(layer, comp, kind, e) for e in range(registry.dims["E"])]
                elif comp == "state":
                    probes += [Probe(layer, comp, kind, n) for n in range(registry.dims["N"])]
                else:
                    probes.append(Probe(layer, comp, kind))
    if not probes:
        raise SpecError(f"no probe applies: components {comps} x kinds {list(kinds)}; see ablation_table()", "kinds")
    return probes


class ResampleSources:
    """The dense activations at a layer's resampled hook points on the windows a batch resamples from (window i
    takes window i+1's): one block forward per layer and batch for all of that layer's points, from the dense
    residual ``stream`` entering each layer. Shared by the cached, batched and streamed sweeps."""

    def __init__(self, runner: LayerRunner, stream, points: dict[int, list[str]]) -> None:
        self.runner, self.stream, self.points, self.cache = runner, stream, points, {}
        n = len(runner.ids)
        self.source = (torch.arange(n) + 1) % n

    def __call__(self, layer: int, point: str, b: slice) -> dict[str, torch.Tensor]:
        if layer not in self.cache:
            src = self.source[b].to(self.runner.ids.device)
            acts = self.runner.capture(layer, self.points[layer], self.stream[layer][src], rows=src)
            self.cache[layer] = {hook_name(layer, pt): torch.cat(a) for pt, a in acts.items()}
        name = hook_name(layer, point)
        return {name: self.cache[layer][name]}


@dataclass
class _Dense:
    """The dense model's residual stream entering each layer and its next-token log-probabilities."""

    resid: list[torch.Tensor]  # per layer (n, L, D)
    logp: torch.Tensor  # (n, L-1, V)
    nll: float


class _Sweep:
    def __init__(self, lm: LoadedModel, windows: Windows, config: ProbeOptions) -> None:
        self.model, self.registry, self.config = lm.model, lm.registry, config
        self.runner = LayerRunner(lm, windows, config.batch_size)
        self.source = (torch.arange(len(windows)) + 1) % len(windows)  # resample: window i takes window i+1's

    @torch.no_grad()
    def dense(self) -> _Dense:
        stream = self.runner.stream()
        logp = self.runner.logprobs(stream[-1])  # (n, L-1, V)
        nll = self.runner.mean_nll(logp)
        check_loss(self.model, nll, self.runner.ids, "the dense loss of the held-out windows")
        return _Dense(stream[:-1], logp, nll)

    @torch.no_grad()
    def run(self, probe: Probe, dense: _Dense, ctx: Context) -> dict[str, float]:
        run = self.runner
        nll_sum, kl_sum, count = 0.0, 0.0, 0
        point = resample_point(self.registry, probe)
        for b in run.batches:
            if point is not None:
                ctx.source = self._source(probe.layer, point, b, dense)
            with ablate(self.model, self.registry, probe, ctx):
                if self.config.sweep != "naive":
                    out, logits = run.run(dense.resid[probe.layer][b], probe.layer, rows=b), None  # (B, L, D)
                else:
                    out, logits = self.model(input_ids=run.ids[b], use_cache=False).logits, torch.Tensor.float
            for nll, kl, n in run.terms(out, b, dense.logp, logits):
                nll_sum, kl_sum, count = nll_sum + nll, kl_sum + kl, count + n
            if not math.isfinite(nll_sum):
                self._nonfinite(probe, ctx, b, nll_sum / count)
        delta = nll_sum / count - dense.nll
        return {"delta_nll": delta, "ppl_ratio": math.exp(delta), "kl": kl_sum / count}

    @torch.no_grad()
    def run_layer(self, probes: list[Probe], dense: _Dense, ctx: Context) -> list[dict[str, float]]:
        """The batched sweep of ``probes`` (all of one layer): per batch, each probe's ablated layer on the cached
        residual stream, then the rest of the model once per ``stack`` distinct outputs stacked along the batch."""
        run, layer = self.runner, probes[0].layer
        sums = [[0.0, 0.0, 0] for _ in probes]
        for b in run.batches:
            rows = torch.arange(len(run.ids), device=run.ids.device)[b]  # (B,)
            results: dict[bytes, tuple[float, float, int]] = {}  # digest of an ablated output -> its loss terms
            pending: dict[bytes, torch.Tensor] = {}  # distinct outputs waiting for the stacked forward

            def flush() -> None:
                stacked = run.run(torch.cat(list(pending.values())), layer + 1, rows=rows.repeat(len(pending)))
                for key, last in zip(pending, stacked.split(len(rows))):  # (B, L, D) each
                    results[key] = tuple(sum(t) for t in zip(*run.terms(last, b, dense.logp)))
                pending.clear()

            keys = []
            for p in probes:
                if (point := resample_point(self.registry, p)) is not None:
                    ctx.source = self._source(layer, point, b, dense)
                with ablate(self.model, self.registry, p, ctx):
                    out = run.run(dense.resid[layer][b], layer, layer + 1, rows=b)  # (B, L, D)
                keys.append(_digest(out))
                if keys[-1] not in results and keys[-1] not in pending:
                    pending[keys[-1]] = out
                    if len(pending) == self.config.stack:
                        flush()
            if pending:
                flush()
            for i, p in enumerate(probes):
                sums[i] = [total + term for total, term in zip(sums[i], results[keys[i]])]
                if not math.isfinite(sums[i][0]):
                    self._nonfinite(p, ctx, b, sums[i][0] / sums[i][2])
        values = []
        for nll, kl, count in sums:
            delta = nll / count - dense.nll
            values.append({"delta_nll": delta, "ppl_ratio": math.exp(delta), "kl": kl / count})
        return values

    def _nonfinite(self, probe: Probe, ctx: Context, b: slice, loss: float) -> None:
        with ablate(self.model, self.registry, probe, ctx):
            where = first_nonfinite(self.model, self.runner.ids[b])
        raise NonFiniteError(f"probe {probe.kind} of layer {probe.layer} {probe.component}"
                             f"{'' if probe.index is None else f' {probe.index}'} gives a non-finite loss "
                             f"({loss}): the first non-finite activation is at "
                             f"{where or 'the loss terms'}")  # fmt: skip

    def _source(self, layer: int, point: str, b: slice, dense: _Dense) -> dict[str, torch.Tensor]:
        """The dense activation at ``point`` of ``layer`` on the windows that batch ``b`` resamples from."""
        if self.config.sweep != "naive":
            return ResampleSources(self.runner, dense.resid, {layer: [point]})(layer, point, b)
        src = self.source[b].to(self.runner.ids.device)
        name = hook_name(layer, point)
        with capture(self.model, [name]) as acts:
            self.model(input_ids=self.runner.ids[src], use_cache=False)
        return {name: acts[name][0]}


def _digest(t: torch.Tensor) -> bytes:
    """A 128-bit digest of a tensor's bytes: equal digests mean bitwise-equal tensors (collisions aside)."""
    return hashlib.blake2b(t.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()


def _groups(probes: list[Probe], batched: bool) -> list[list[Probe]]:
    """Probes in sweep order, one per group, or (batched) each layer's probes as one group."""
    if not batched:
        return [[p] for p in probes]
    groups: dict[int, list[Probe]] = {}
    for p in probes:
        groups.setdefault(p.layer, []).append(p)
    return list(groups.values())


def _calibrate(lm: LoadedModel, windows: Windows, probes: list[Probe], options: ProbeOptions, show: bool,
               stats_of=channel_stats) -> Context:  # fmt: skip
    """The means and input norms the probes' ablations read, from ``stats_of`` (``channel_stats``'s signature)."""
    points = sorted({hook_name(p.layer, pt) for p in probes for pt in needed_points(lm.registry, p)})
    if not points:
        return Context({}, {})
    stats = stats_of(lm, windows, points, batch_size=options.batch_size, show_progress=show)
    means = {n: s.mean for n, s in stats.items()}
    return Context(means, {n: input_norm(s.sumsq, len(windows)) for n, s in stats.items()})


def estimator_label(options: ProbeOptions, kind: str | None = None) -> str:
    """What the ``estimator`` column says of a sweep's rows (of ``kind``): ``exact``, or the estimator (with K for
    fisher; ``, layer`` for the kinds of ``layer_kinds``, read at their layer's output)."""
    if not options.estimate:
        return "exact"
    label = f"fisher K={options.samples}" if options.estimator == "fisher" else options.estimator
    return f"{label}, layer" if kind in (options.layer_kinds or ()) else label


def _rows(probe: Probe, values: dict[str, float], seed: int, estimator: str = "exact") -> list[dict]:
    return [
        {"layer": probe.layer, "component": probe.component, "index": probe.index, "kind": probe.kind,
         "sparsity": probe.sparsity, "metric": m, "value": values[m], "seed": seed,
         "estimated": estimator != "exact", "estimator": estimator}
        for m in METRICS
    ]  # fmt: skip


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.astype({"layer": "int64", "index": "Int64", "sparsity": "float64", "value": "float64", "seed": "int64",
                      "estimated": "bool", "estimator": "object"})  # fmt: skip


def _to_csv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False)  # shortest round-trip floats: a resumed sweep reads back the values it computed
    return buf.getvalue()


def probe(
    model,
    data: Corpus | str | None = None,
    *,
    options: ProbeOptions | None = None,
    out: str | Path | OutputDir | None = None,
    heldout: Windows | None = None,
    calibration: Windows | None = None,
    only: Iterable[Probe] | None = None,
    show_progress: bool = True,
    **overrides,
) -> pd.DataFrame:
    """Ablate each component of each layer in turn and measure the damage on held-out windows.

    Args:
        model: A ``LoadedModel`` (or an instrumented HF model when ``heldout`` and ``calibration`` are given).
        data: A :class:`~sensitivity.data.Corpus` or corpus name (None = the built-in default corpus).
        options: What to probe (:class:`ProbeOptions`); keyword ``overrides`` change its fields (e.g.
            ``components=["dt", "B"]``, ``kinds=["zero", "wanda"]``, ``layers=[0, 7]``, ``windows=16``, ``seed=1``).
        out: Directory for ``probes.csv`` and ``manifest.json`` (or a job's
            :class:`~sensitivity.core.output.OutputDir`, opened here once everything else is checked, or already
            open). The CSV is rewritten atomically after each probe; rerunning into the same directory with the same
            options skips the finished probes; another process writing it meanwhile is refused.
        heldout: Held-out windows to use instead of drawing ``options.windows`` from ``data``.
        calibration: Calibration windows to use instead of drawing them from ``data``.
        only: Run only these of the probes ``options`` plans (e.g. the most damaging ones by a first-order
            estimate), in plan order; recorded in the manifest's spec.
        show_progress: Show tqdm bars.

    Returns:
        A tidy frame with columns ``layer, component, index, kind, sparsity, metric, value, seed, estimated,
        estimator``; ``index`` is the head or state of unit probes (else missing), ``sparsity`` the level of
        sparsify kinds (else missing), ``metric`` one of ``delta_nll``, ``ppl_ratio``, ``kl``; ``estimated`` is True
        for estimates (``estimate=True``; ``kl`` is missing but for the fisher estimator) and ``estimator`` names
        how each row was obtained (``exact``, ``fisher K=2``, ...).

    Raises:
        SpecError: For unknown options, components, kinds or layers.
        OutputError: For an ``out`` holding another sweep or being written by another process.

    Examples:
        >>> df = probe(load_model("default"), components=["dt", "conv1d"], kinds=["zero", "bypass"])
        >>> df[df.metric == "delta_nll"].sort_values("value").tail(3)
    """
    options = ProbeOptions.merged(options, **overrides)
    ckpt = None
    if options.streamed:
        from ..core.streamed import StreamedCheckpoint

        try:
            ckpt = model if isinstance(model, StreamedCheckpoint) else StreamedCheckpoint(model)
        except ValueError as e:
            raise SpecError(str(e), "model") from None
        model = ckpt.lm
    lm = as_loaded(model, instrumented=True)
    probes = plan(lm.registry, options)
    if only is not None:
        wanted = {p.key for p in only}
        if missing := wanted - {p.key for p in probes}:
            raise SpecError(f"only= names probes the options do not plan: {sorted(missing)[:3]}", "only")
        probes = [p for p in probes if p.key in wanted]
    windows = heldout if heldout is not None or lm.tokenizer is None else objective_windows(options, lm.tokenizer)
    if (windows is None or calibration is None) and lm.tokenizer is None:
        raise SpecError("the model has no tokenizer; pass heldout= and calibration= windows explicitly", "model")
    corpus = None
    if windows is None or calibration is None:
        corpus = data if isinstance(data, Corpus) else (load_corpus() if data is None else load_corpus(data))
    if windows is None:
        split = options.split or ("validation" if "validation" in corpus.splits else corpus.heldout_split)
        windows = calibration_windows(corpus, lm.tokenizer, options.windows, options.seqlen, seed=options.seed,
                                      split=split)  # fmt: skip
    if calibration is None:
        calibration = calibration_windows(corpus, lm.tokenizer, options.calib_windows, options.seqlen,
                                          seed=options.seed, split=options.calib_split)  # fmt: skip
    if any(KINDS[p.kind].info.get("resample") for p in probes) and len(windows) < 2:
        raise SpecError("kind 'resample' needs at least 2 held-out windows", "windows")
    inputs = {"windows_sha256": windows.sha256()[:16], "calibration_sha256": calibration.sha256()[:16]}
    if out is None:
        return _sweep(lm, probes, options, windows, calibration, None, inputs, show_progress, ckpt)
    if isinstance(out, OutputDir) and out.is_open:
        return _sweep(lm, probes, options, windows, calibration, out, inputs, show_progress, ckpt)
    if isinstance(out, OutputDir):  # a job's, checked before its inputs loaded: opened once they are all good
        directory = out
    else:
        data_name = getattr(corpus, "name", None) or windows.source
        spec = {"job": "probe", "model": lm.name, "data": data_name, **options.to_dict(), "out": str(out)}
        if only is not None:
            spec["only"] = [list(p.key) for p in probes]
        directory = OutputDir(out, "probe", spec, inputs=inputs)
    with directory:
        return _sweep(lm, probes, options, windows, calibration, directory, inputs, show_progress, ckpt)


@dataclass
class _Payload:
    """What a probe shard job needs besides the model."""

    options: ProbeOptions
    windows: Windows
    calibration: Windows
    todo: list[Probe]
    show_progress: bool = False
    ckpt: Any = None  # a StreamedCheckpoint (streamed sweeps)


class _ProbeJob:
    """The set-up every shard of a sweep shares (calibration statistics; the dense pass of an exact sweep), then
    one shard (a list of probes) at a time -> ``(values per probe, dense NLL or None, set-up timings)``."""

    def __init__(self, lm: LoadedModel, payload: _Payload) -> None:
        self.lm, self.p, self.timings = lm, payload, {}
        t0 = time.perf_counter()
        self.ctx = _calibrate(lm, payload.calibration, payload.todo, payload.options, payload.show_progress)
        self.timings["calibration_s"] = time.perf_counter() - t0
        self.sweep = self.dense = None
        if not payload.options.estimate:
            t0 = time.perf_counter()
            self.sweep = _Sweep(lm, payload.windows, payload.options)
            self.dense = self.sweep.dense()
            self.timings["dense_s"] = time.perf_counter() - t0

    def run(self, shard: list[Probe]) -> tuple[list[dict[str, float]], float | None, dict[str, float]]:
        o = self.p.options
        if o.estimate:
            values = estimate(self.lm, shard, self.p.windows, self.ctx, estimator=o.estimator, samples=o.samples,
                              layer_kinds=o.layer_kinds or (),
                              seed=o.seed, batch_size=o.batch_size, show_progress=self.p.show_progress)  # fmt: skip
            return [values[p.key] for p in shard], None, self.timings
        if o.sweep == "batched" and len(shard) > 1:
            values = self.sweep.run_layer(shard, self.dense, self.ctx)
        else:
            values = [self.sweep.run(p, self.dense, self.ctx) for p in shard]
        return values, self.dense.nll, self.timings


def _shards(todo: list[Probe], options: ProbeOptions) -> list[list[Probe]]:
    """The sweep's pieces: every estimate at once (one backward pass per label sequence covers them all); on Ray the
    probes of each layer (a worker reuses its cached stream); in process one probe at a time (written as it ends),
    or a layer's probes for the batched sweep."""
    if options.estimate:
        return [todo]
    return _groups(todo, options.sweep == "batched" or options.backend == "ray" or options.streamed)


def _sweep(lm: LoadedModel, probes: list[Probe], options: ProbeOptions, windows: Windows, calibration: Windows,
           out: OutputDir | None, inputs: dict, show_progress: bool, ckpt=None) -> pd.DataFrame:  # fmt: skip
    done = _load_finished(out) if out is not None else {}
    started = time.time()
    todo = [p for p in probes if p.key not in done]
    record = {"arch": lm.arch, "windows": windows.describe(), "calibration": calibration.describe(),
              "seqlen": windows.seqlen, "seed": options.seed, "probes": len(probes),
              "resumed_with": len(probes) - len(todo)}  # fmt: skip
    timings: dict[str, float] = {}
    rows_of = dict(done)
    if todo:
        local = options.backend == "local"
        payload = _Payload(options, windows, calibration, todo, show_progress and local, ckpt)
        what = "estimates" if options.estimate else f"probes ({options.sweep})"
        bar = tqdm(total=len(todo), desc=what, disable=not show_progress, unit="probe")

        def on_result(shard: list[Probe], result: tuple) -> None:
            values, dense_nll, setup = result
            timings.update(setup)  # the calibration (and dense pass) of the worker that ran it
            if dense_nll is not None:
                record["dense_nll"] = dense_nll
            for p, v in zip(shard, values):
                rows_of[p.key] = _rows(p, v, options.seed, estimator_label(options, p.kind))
            bar.update(len(shard))
            if out is not None:
                ordered = [r for q in probes if q.key in rows_of for r in rows_of[q.key]]
                out.write_text("probes.csv", _to_csv(_frame(ordered)))
                out.manifest(**record, status="running", timings=timings)

        if out is not None:  # running from the start: a run killed before its first probe resumes
            out.manifest(**record, status="running", timings=timings)
        jobs = []

        def job(lm: LoadedModel, payload: _Payload):
            from .streamed import StreamedProbeJob

            jobs.append(StreamedProbeJob(payload.ckpt, payload))
            return jobs[-1]

        try:
            stats = run_shards(lm, job if ckpt is not None else _ProbeJob, payload, _shards(todo, options), options,
                               on_result)  # fmt: skip
        finally:
            for j in jobs:
                j.close()
        bar.close()
        timings["sweep_s"] = stats.seconds
        timings["per_probe_s"] = stats.seconds / len(todo)
        record["execution"] = stats.to_dict()
    elif out is not None and out.previous:
        record["dense_nll"] = out.previous.get("dense_nll")
    df = _frame([r for p in probes for r in rows_of[p.key]])
    if out is not None:
        out.write_text("probes.csv", _to_csv(df))
        timings["total_s"] = time.time() - started
        out.manifest(**record, status="complete", timings=timings)
    logger.info("probed %d ablations (%d resumed)", len(probes), len(probes) - len(todo))
    return df


def _load_finished(out: OutputDir) -> dict[tuple, list[dict]]:
    """Rows of the probes already in ``out/probes.csv`` (same job and spec: :class:`OutputDir` checked that)."""
    csv_path = out.file("probes.csv")
    if not csv_path.exists():
        return {}
    df = pd.read_csv(csv_path, float_precision="round_trip", keep_default_na=True)
    if "estimated" not in df.columns:  # written before estimates existed: every row exact
        df["estimated"] = False
    if "estimator" not in df.columns:  # written before the column: the estimator its spec names (first order)
        named = (out.previous or {}).get("spec", {}).get("estimator", "linear")
        df["estimator"] = df.estimated.map({False: "exact", True: named})
    finished: dict[tuple, list[dict]] = {}
    for rec in _frame(df.to_dict("records")).to_dict("records"):
        rec = {k: (None if pd.isna(v) else v) for k, v in rec.items()}
        probe = Probe(int(rec["layer"]), rec["component"], rec["kind"],
                      None if rec["index"] is None else int(rec["index"]), rec["sparsity"])  # fmt: skip
        finished.setdefault(probe.key, []).append(rec)
    return {k: v for k, v in finished.items() if len(v) == len(METRICS)}

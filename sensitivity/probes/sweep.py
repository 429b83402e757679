"""The probe sweep: every ablation of every component of every layer, measured on held-out windows.

The cached sweep runs the dense model once, keeping the residual stream entering each layer and the dense
next-token log-probabilities; a probe at layer ``l`` then runs only blocks ``l..L-1``, the final norm and the head.
The naive sweep (``sweep="naive"``) runs the whole model for every probe; both give the same numbers.

Metrics per probe, over the same positions as :func:`sensitivity.eval.perplexity` (all but the last token of each
window): ``delta_nll`` = mean next-token NLL ablated minus dense (nats/token), ``ppl_ratio`` = ``exp(delta_nll)``,
``kl`` = mean per-token ``KL(dense || ablated)`` (nats).

Shape legend: B batch (windows), L sequence length, D model width, V vocabulary.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.hooks import capture, hook_name
from ..core.loading import LoadedModel, as_loaded
from ..core.output import atomic_write_text, versions, write_manifest
from ..core.registry import Registry
from ..core.runner import LayerRunner
from ..core.scores import input_norm
from ..core.stats import channel_stats
from ..data import Corpus, Windows, calibration_windows, load_corpus
from .ablations import (
    ABLATION_KINDS,
    SPARSIFY_METHODS,
    UNITS,
    Context,
    Probe,
    ablate,
    applicable,
    needed_points,
    resample_point,
)

__all__ = ["COLUMNS", "KINDS", "METRICS", "SWEEPS", "ProbeConfig", "plan", "probe"]

logger = logging.getLogger(__name__)

KINDS = (*ABLATION_KINDS, *SPARSIFY_METHODS, "remove")
METRICS = ("delta_nll", "ppl_ratio", "kl")
SWEEPS = ("cached", "naive")
COLUMNS = ("layer", "component", "index", "kind", "sparsity", "metric", "value", "seed")


@dataclass(frozen=True)
class ProbeConfig:
    """What a probe sweep measures, and on which windows. Serialisable with :meth:`to_dict`.

    Attributes:
        components: Registry components and units (``mixer``, ``head``, ``state``) to probe; None = every
            component, ``mixer`` and (Mamba-2) ``head``. ``state`` (one probe per state index) is opt-in.
        kinds: Ablation kinds (``zero``, ``mean``, ``resample``, ``bypass``, ``magnitude``, ``wanda``, ``remove``);
            each applies where the ablation table defines it.
        sparsities: Sparsities of the ``magnitude`` and ``wanda`` kinds, each in (0, 1).
        layers: Layers to probe; None = all.
        windows: Held-out windows the damage is measured on (random offsets of ``split``, seeded).
        calibration_windows: Windows of ``calibration_split`` for the means and WANDA's input norms.
        seqlen: Tokens per window.
        split: Split of the held-out windows; None = ``validation`` when the corpus has one (the test split stays
            for final evaluation), else its held-out split.
        calibration_split: Split of the calibration windows.
        seed: Seed of both window draws; recorded in every row.
        batch_size: Windows per forward.
        sweep: ``cached`` (reuse the residual stream before the probed layer) or ``naive`` (full forward).
    """

    components: tuple[str, ...] | None = None
    kinds: tuple[str, ...] = KINDS
    sparsities: tuple[float, ...] = (0.25, 0.5, 0.75)
    layers: tuple[int, ...] | None = None
    windows: int = 8
    calibration_windows: int = 8
    seqlen: int = 256
    split: str | None = None
    calibration_split: str = "train"
    seed: int = 0
    batch_size: int = 8
    sweep: str = "cached"

    def __post_init__(self) -> None:
        for name in ("components", "kinds", "sparsities", "layers"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value) if not isinstance(value, str) else (value,))
        if bad := [k for k in self.kinds if k not in KINDS]:
            raise ValueError(f"unknown probe kind {bad[0]!r}; allowed: {', '.join(KINDS)}")
        if bad := [s for s in self.sparsities if not (isinstance(s, (int, float)) and 0 < s < 1)]:
            raise ValueError(f"sparsity {bad[0]!r} out of range; allowed: 0 < s < 1")
        for name in ("windows", "calibration_windows", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} must be an integer >= 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed {self.seed!r} must be an integer")
        for name in ("components", "kinds", "layers"):
            values = getattr(self, name) or ()
            dups = [v for i, v in enumerate(values) if v in values[:i]]
            if dups:
                raise ValueError(f"{name} lists {dups[0]!r} twice")
        if len({f"{s:g}" for s in self.sparsities}) < len(self.sparsities):
            raise ValueError(f"sparsities {list(self.sparsities)} list one value twice")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ValueError(f"seqlen {self.seqlen!r} must be an integer >= 2")
        if self.sweep not in SWEEPS:
            raise ValueError(f"unknown sweep {self.sweep!r}; allowed: {', '.join(SWEEPS)}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ProbeConfig:
        known = {f.name for f in fields(cls)}
        if bad := sorted(set(d) - known):
            raise ValueError(f"unknown probe option {bad[0]!r}; allowed: {', '.join(sorted(known))}")
        return cls(**d)


def plan(registry: Registry, config: ProbeConfig) -> list[Probe]:
    """The probes ``config`` asks for on ``registry``'s architecture, in sweep order (layer-major).

    Raises:
        ValueError: For an unknown component or a layer out of range.
    """
    allowed = (*registry.component_names, *UNITS)
    if config.components is None:
        comps = [*registry.component_names, "mixer", *(["head"] if registry.arch == "mamba2" else [])]
    else:
        comps = list(config.components)
        if bad := [c for c in comps if c not in allowed]:
            raise ValueError(f"unknown component {bad[0]!r} for {registry.arch}; allowed: {', '.join(allowed)}")
        if "head" in comps and registry.arch != "mamba2":
            raise ValueError(f"component 'head' needs a Mamba-2 model; {registry.arch} has no heads")
    layers = range(registry.n_layers) if config.layers is None else [registry.check_layer(i) for i in config.layers]
    probes = []
    for layer in layers:
        for comp in comps:
            for kind in config.kinds:
                if not applicable(registry, comp, kind):
                    continue
                if kind in SPARSIFY_METHODS:
                    probes += [Probe(layer, comp, f"{kind}@{s:g}") for s in config.sparsities]
                elif comp == "head":
                    probes += [Probe(layer, comp, kind, h) for h in range(registry.dims["H"])]
                elif comp == "state":
                    probes += [Probe(layer, comp, kind, n) for n in range(registry.dims["N"])]
                else:
                    probes.append(Probe(layer, comp, kind))
    if not probes:
        raise ValueError(f"no probe applies: components {comps} x kinds {list(config.kinds)}; see ablation_table()")
    return probes


@dataclass
class _Dense:
    """The dense model's residual stream entering each layer and its next-token log-probabilities."""

    resid: list[torch.Tensor]  # per layer (n, L, D)
    logp: torch.Tensor  # (n, L-1, V)
    nll: float


class _Sweep:
    def __init__(self, lm: LoadedModel, windows: Windows, config: ProbeConfig) -> None:
        self.model, self.registry, self.config = lm.model, lm.registry, config
        self.runner = LayerRunner(lm, windows, config.batch_size)
        self.source = (torch.arange(len(windows)) + 1) % len(windows)  # resample: window i takes window i+1's

    @torch.no_grad()
    def dense(self) -> _Dense:
        stream = self.runner.stream()
        logp = self.runner.logprobs(stream[-1])  # (n, L-1, V)
        nll = -logp.gather(-1, self.runner.targets[..., None]).mean().item()
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
                if self.config.sweep == "cached":
                    out, logits = run.run(dense.resid[probe.layer][b], probe.layer), None  # (B, L, D)
                else:
                    out, logits = self.model(input_ids=run.ids[b], use_cache=False).logits, torch.Tensor.float
            for nll, kl, n in run.terms(out, b, dense.logp, logits):
                nll_sum, kl_sum, count = nll_sum + nll, kl_sum + kl, count + n
        delta = nll_sum / count - dense.nll
        return {"delta_nll": delta, "ppl_ratio": math.exp(delta), "kl": kl_sum / count}

    def _source(self, layer: int, point: str, b: slice, dense: _Dense) -> dict[str, torch.Tensor]:
        """The dense activation at ``point`` of ``layer`` on the windows that batch ``b`` resamples from."""
        src = self.source[b].to(self.runner.ids.device)
        if self.config.sweep == "cached":
            return {hook_name(layer, point): self.runner.capture(layer, [point], dense.resid[layer][src])[point][0]}
        name = hook_name(layer, point)
        with capture(self.model, [name]) as acts:
            self.model(input_ids=self.runner.ids[src], use_cache=False)
        return {name: acts[name][0]}


def _calibrate(lm: LoadedModel, windows: Windows, probes: list[Probe], config: ProbeConfig, show: bool) -> Context:
    points = sorted({hook_name(p.layer, pt) for p in probes for pt in needed_points(lm.registry, p)})
    if not points:
        return Context({}, {})
    stats = channel_stats(lm, windows, points, batch_size=config.batch_size, show_progress=show)
    means = {n: s.mean for n, s in stats.items()}
    return Context(means, {n: input_norm(s.sumsq, len(windows)) for n, s in stats.items()})


def _rows(probe: Probe, values: dict[str, float], seed: int) -> list[dict]:
    return [
        {"layer": probe.layer, "component": probe.component, "index": probe.index, "kind": probe.kind,
         "sparsity": probe.sparsity, "metric": m, "value": values[m], "seed": seed}
        for m in METRICS
    ]  # fmt: skip


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.astype({"layer": "int64", "index": "Int64", "sparsity": "float64", "value": "float64", "seed": "int64"})


def _to_csv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.10g")
    return buf.getvalue()


def probe(
    model,
    data: Corpus | str | None = None,
    *,
    config: ProbeConfig | None = None,
    out: str | Path | None = None,
    heldout: Windows | None = None,
    calibration: Windows | None = None,
    show_progress: bool = True,
    **options,
) -> pd.DataFrame:
    """Ablate each component of each layer in turn and measure the damage on held-out windows.

    Args:
        model: A ``LoadedModel`` (or an instrumented HF model when ``heldout`` and ``calibration`` are given).
        data: A :class:`~sensitivity.data.Corpus` or corpus name (None = the built-in default corpus).
        config: What to probe; keyword ``options`` override its fields (e.g. ``components=["dt", "B"]``,
            ``kinds=["zero", "wanda"]``, ``layers=[0, 7]``, ``windows=16``, ``seed=1``).
        out: Directory for ``probes.csv`` and ``manifest.json``. The CSV is rewritten atomically after each probe;
            rerunning into the same directory with the same configuration skips the finished probes.
        heldout: Held-out windows to use instead of drawing ``config.windows`` from ``data``.
        calibration: Calibration windows to use instead of drawing them from ``data``.
        show_progress: Show tqdm bars.

    Returns:
        A tidy frame with columns ``layer, component, index, kind, sparsity, metric, value, seed``; ``index`` is
        the head or state of unit probes (else missing), ``metric`` one of ``delta_nll``, ``ppl_ratio``, ``kl``.

    Raises:
        ValueError: For unknown options, components, kinds or layers, or an ``out`` holding another sweep.

    Example:
        >>> df = probe(load_model("default"), components=["dt", "conv1d"], kinds=["zero", "bypass"])
        >>> df[df.metric == "delta_nll"].sort_values("value").tail(3)
    """
    config = config or ProbeConfig()
    if options:
        config = ProbeConfig.from_dict({**config.to_dict(), **options})
    lm = as_loaded(model, instrumented=True)
    probes = plan(lm.registry, config)
    windows = heldout
    if (windows is None or calibration is None) and lm.tokenizer is None:
        raise ValueError("model has no tokenizer; pass heldout= and calibration= windows explicitly")
    corpus = None
    if windows is None or calibration is None:
        corpus = data if isinstance(data, Corpus) else (load_corpus() if data is None else load_corpus(data))
    if windows is None:
        split = config.split or ("validation" if "validation" in corpus.splits else corpus.heldout_split)
        windows = calibration_windows(corpus, lm.tokenizer, config.windows, config.seqlen, seed=config.seed,
                                      split=split)  # fmt: skip
    if calibration is None:
        calibration = calibration_windows(corpus, lm.tokenizer, config.calibration_windows, config.seqlen,
                                          seed=config.seed, split=config.calibration_split)  # fmt: skip
    if "resample" in config.kinds and len(windows) < 2:
        raise ValueError("kind 'resample' needs at least 2 held-out windows")
    data_name = getattr(corpus, "name", None) or windows.source
    identity = {"model": lm.name, "data": data_name, "config": config.to_dict(),
                "windows_sha256": windows.sha256()[:16], "calibration_sha256": calibration.sha256()[:16]}  # fmt: skip

    done: dict[tuple, list[dict]] = {}
    out_dir = Path(out) if out is not None else None
    started = time.time()
    if out_dir is not None:
        done = _load_finished(out_dir, identity)
        out_dir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in probes if p.key not in done]
    manifest = {**identity, "command": "probe", "arch": lm.arch, "windows": windows.describe(),
                "calibration": calibration.describe(), "seqlen": windows.seqlen, "seed": config.seed,
                "probes": len(probes), "resumed_with": len(probes) - len(todo), "versions": versions()}  # fmt: skip
    timings: dict[str, float] = {}
    rows_of = dict(done)
    if todo:
        t0 = time.perf_counter()
        ctx = _calibrate(lm, calibration, todo, config, show_progress)
        timings["calibration_s"] = time.perf_counter() - t0
        sweep = _Sweep(lm, windows, config)
        t0 = time.perf_counter()
        dense = sweep.dense()
        timings["dense_s"] = time.perf_counter() - t0
        manifest["dense_nll"] = dense.nll
        if out_dir is not None:
            write_manifest(out_dir / "manifest.json", {**manifest, "status": "running", "timings": timings})
        t0 = time.perf_counter()
        for p in tqdm(todo, desc=f"probes ({config.sweep})", disable=not show_progress, unit="probe"):
            rows_of[p.key] = _rows(p, sweep.run(p, dense, ctx), config.seed)
            if out_dir is not None:
                ordered = [r for q in probes if q.key in rows_of for r in rows_of[q.key]]
                atomic_write_text(out_dir / "probes.csv", _to_csv(_frame(ordered)))
        timings["sweep_s"] = time.perf_counter() - t0
        timings["per_probe_s"] = timings["sweep_s"] / len(todo)
    df = _frame([r for p in probes for r in rows_of[p.key]])
    if out_dir is not None:
        atomic_write_text(out_dir / "probes.csv", _to_csv(df))
        timings["total_s"] = time.time() - started
        write_manifest(out_dir / "manifest.json", {**manifest, "status": "complete", "timings": timings})
    logger.info("probed %d ablations (%d resumed)", len(probes), len(probes) - len(todo))
    return df


def _load_finished(out_dir: Path, identity: dict) -> dict[tuple, list[dict]]:
    """Rows of the probes already in ``out_dir/probes.csv``, keyed by probe, after checking it is the same sweep."""
    manifest_path, csv_path = out_dir / "manifest.json", out_dir / "probes.csv"
    if not manifest_path.exists():
        if csv_path.exists():
            raise ValueError(f"{csv_path} exists without a manifest.json; use a new output directory")
        return {}
    old = json.loads(manifest_path.read_text())
    for key, value in identity.items():
        if old.get(key) != value:
            raise ValueError(
                f"{out_dir} holds a probe sweep with a different {key} ({old.get(key)!r}, now {value!r}); "
                "use a new output directory or the same options"
            )
    if not csv_path.exists():
        return {}
    df = pd.read_csv(csv_path, float_precision="round_trip", keep_default_na=True)
    finished: dict[tuple, list[dict]] = {}
    for rec in _frame(df.to_dict("records")).to_dict("records"):
        rec = {k: (None if pd.isna(v) else v) for k, v in rec.items()}
        key = (int(rec["layer"]), rec["component"], -1 if rec["index"] is None else int(rec["index"]), rec["kind"])
        finished.setdefault(key, []).append(rec)
    return {k: v for k, v in finished.items() if len(v) == len(METRICS)}

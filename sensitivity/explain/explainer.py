"""Why a pruned state-space LM degrades: drift, restoration patching, SSM dynamics and a verdict.

Given a dense model and a pruned copy (same architecture and depth) on the same windows, :func:`explain` measures

* **drift**: per layer, the relative error ``||h_p - h_d|| / ||h_d||`` and the mean token cosine of the residual
  stream after that layer, and the first layer whose relative error exceeds a threshold;
* **restoration patching**: for every (layer, component) that owns weights, put that component's tensors back to
  their dense values inside the pruned model and measure the share of the loss gap that comes back,
  ``recovered = (nll_pruned - nll_patched) / (nll_pruned - nll_dense)``; the top entries name where the damage sits.
  Whole units are patched too (rows ``mixer``, ``attention``, ``mlp``, ``moe``: every tensor of the layer's SSM
  mixer, attention, MLP or MoE restored at once, so the unit's output is what the dense unit computes from its
  input). A restoration acts only while its layer runs, so a tensor several layers share (Zamba2's shared
  transformer) is restored in the patched layer alone;
* **SSM dynamics** per layer holding an SSM mixer (hybrids: attention, MLP and MoE layers have none), dense vs
  pruned: Δ after softplus, the per-step decay ``exp(Δ·A)`` and the implied
  memory length ``-1/log(decay)`` (tokens), state norms over time (rebuilt by the scan recurrence), the share of
  closed gates (``σ(z) < 0.05``), and the outlier shares of x, z and y (``|a| > 5·mean|a|``), all over the units
  the pruned model keeps live (so a shift is how kept heads changed, not which heads were kept), plus the share of
  live units;
* a **verdict** from the perplexity ratio (healthy ≤ 1.2 < degraded < 2.0 ≤ collapsed by default) and a short
  explanation that names the layer, component and dynamics shift behind it, with the numbers.

Shape legend: B batch, L sequence length, D model width, V vocabulary.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.finite import check_loss
from ..core.loading import LoadedModel, as_loaded
from ..core.output import MANIFEST, publish_dir, versions, write_manifest
from ..core.runner import LayerRunner
from ..core.spec import SpecError
from ..data import Windows
from .dynamics import (
    decay,
    gate_closed_share,
    memory_length,
    outlier_share,
    ssm_states,
    summary_stats,
)
from .options import COLLAPSED, HEALTHY, VERDICTS, ExplainOptions, Thresholds

__all__ = ["UNIT_ROWS", "ExplainOptions", "Explanation", "Thresholds", "VERDICTS", "explain", "explain_method",
           "verdict"]  # fmt: skip

logger = logging.getLogger(__name__)

MIN_GAP = 1e-3  # nats/token: below this loss gap, recovered shares are noise and left undefined (NaN)
MIXER = "mixer"  # patching row that restores every component of a layer's SSM mixer at once
UNIT_ROWS = {"ssm": MIXER, "attention": "attention", "mlp": "mlp", "moe": "moe"}
"""Unit kind -> name of the patching row that restores the whole unit of a layer."""
_UNIT_TEXT = {"ssm": "mixer", "attention": "attention", "mlp": "MLP", "moe": "MoE"}
_POINTS = ("u", "dt", "A", "B", "C", "x", "z", "y")
_FILES = ("drift", "patching", "dynamics", "samples", "states")
_NAMES = {"delta": "Δ", "decay": "decay exp(ΔA)", "memory": "memory length", "state_norm": "state norm",
          "gate_closed": "closed-gate share", "outlier_x": "x outlier share", "outlier_z": "z outlier share",
          "outlier_y": "y outlier share", "live_units": "live units"}  # fmt: skip


def verdict(ppl_ratio: float, *, healthy: float = HEALTHY, collapsed: float = COLLAPSED) -> str:
    """``healthy`` when ``ppl_ratio <= healthy``, ``collapsed`` when ``>= collapsed``, else ``degraded``.

    Raises:
        SpecError: If the thresholds are not ``1 <= healthy < collapsed``; ValueError if the ratio is not a positive
            number.
    """
    Thresholds(healthy=healthy, collapsed=collapsed)
    if not (isinstance(ppl_ratio, (int, float)) and ppl_ratio > 0):
        raise ValueError(f"ppl_ratio {ppl_ratio!r} must be a positive number")
    if math.isnan(ppl_ratio) or ppl_ratio >= collapsed:
        return "collapsed"
    return "healthy" if ppl_ratio <= healthy else "degraded"


@dataclass
class Explanation:
    """What :func:`explain` found for one pruned model.

    Attributes:
        label: Name of the pruned model (e.g. ``"wanda"``).
        sparsity: Its sparsity, when known.
        verdict: ``healthy``, ``degraded`` or ``collapsed``.
        nll_dense: Mean next-token NLL of the dense model on the windows (nats/token).
        nll_pruned: The same for the pruned model.
        definition: What the perplexities are (token-level, windows, split).
        first_layer: First layer whose drift exceeds ``drift_threshold`` (None if none does).
        drift_threshold: The relative-error threshold.
        drift: ``layer, rel_error, cosine``.
        patching: ``layer, component, unit, nll, recovered`` sorted by ``recovered`` (empty when not possible);
            ``unit`` is the component's unit kind; components ``mixer``, ``attention``, ``mlp``, ``moe`` restore
            that whole unit of the layer at once (:data:`UNIT_ROWS`).
        dynamics: ``layer, quantity, stat, dense, pruned`` (layers with an SSM mixer only).
        samples: ``layer, quantity, model, value``: subsampled per-token Δ and decay values.
        states: ``layer, position, dense, pruned``: mean state norm at each position.
        text: The generated explanation.
        meta: Windows, thresholds, seed, versions, and why patching was skipped (``patching_note``).
    """

    label: str
    sparsity: float | None
    verdict: str
    nll_dense: float
    nll_pruned: float
    definition: str
    first_layer: int | None
    drift_threshold: float
    drift: pd.DataFrame
    patching: pd.DataFrame
    dynamics: pd.DataFrame
    samples: pd.DataFrame
    states: pd.DataFrame
    text: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def ppl_dense(self) -> float:
        """Perplexity of the dense model, ``exp(nll_dense)``."""
        return math.exp(self.nll_dense)

    @property
    def ppl_pruned(self) -> float:
        """Perplexity of the pruned model, ``exp(nll_pruned)``."""
        return math.exp(self.nll_pruned)

    @property
    def ppl_ratio(self) -> float:
        """Pruned over dense perplexity, ``exp(nll_pruned - nll_dense)``."""
        return math.exp(self.nll_pruned - self.nll_dense)

    @property
    def top(self) -> tuple[int, str, float] | None:
        """``(layer, component, recovered)`` of the single-component restoration that recovers most (only if it
        recovers something), or None."""
        single = self.patching[~_unit_rows(self.patching) & (self.patching.recovered > 0).to_numpy()]
        if single.empty:
            return None
        row = single.loc[single.recovered.idxmax()]
        return int(row.layer), str(row.component), float(row.recovered)

    def summary(self) -> dict:
        """One flat row: label, sparsity, perplexities, verdict, first diverging layer, top restoration, text."""
        top = self.top
        return {"label": self.label, "sparsity": self.sparsity, "ppl_dense": self.ppl_dense,
                "ppl_pruned": self.ppl_pruned, "ppl_ratio": self.ppl_ratio, "verdict": self.verdict,
                "first_layer": self.first_layer, "top_layer": top[0] if top else None,
                "top_component": top[1] if top else None, "recovered": top[2] if top else None,
                "explanation": self.text}  # fmt: skip

    def frames(self) -> dict[str, pd.DataFrame]:
        """The tidy tables with ``label`` and ``sparsity`` columns in front."""
        return {name: getattr(self, name).assign(label=self.label, sparsity=self.sparsity)[
            ["label", "sparsity", *getattr(self, name).columns]] for name in _FILES}  # fmt: skip

    def save(self, out: str | Path, *, overwrite: bool = False, manifest: dict | None = None) -> Path:
        """Write ``explanation.json``, ``explanation.md`` and the tables as CSV into ``out``, which appears whole
        (a locked staging sibling renamed into place; :func:`~sensitivity.core.output.publish_dir`), plus
        ``manifest.json`` when a job passes its ``manifest``.

        Raises:
            OutputError: If ``out`` is a non-empty directory and ``overwrite`` is False, or another process is
                writing it.
        """
        with publish_dir(out, overwrite=overwrite, marker="explanation.json") as tmp:
            for name in _FILES:
                getattr(self, name).to_csv(tmp / f"{name}.csv", index=False)  # shortest round-trip floats
            record = {**self.summary(), "nll_dense": self.nll_dense, "nll_pruned": self.nll_pruned,
                      "definition": self.definition, "drift_threshold": self.drift_threshold, "meta": self.meta}
            (tmp / "explanation.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
            (tmp / "explanation.md").write_text(f"# {self.label}\n\n{self.text}\n")
            if manifest is not None:
                write_manifest(tmp / MANIFEST, manifest)
        return Path(out).expanduser().absolute()

    @classmethod
    def load(cls, path: str | Path) -> Explanation:
        """Read an explanation written by :meth:`save`."""
        path = Path(path)
        if not (path / "explanation.json").is_file():
            raise FileNotFoundError(f"{path} holds no explanation.json")
        rec = json.loads((path / "explanation.json").read_text())
        tables = {name: pd.read_csv(path / f"{name}.csv", float_precision="round_trip") for name in _FILES}
        return cls(label=rec["label"], sparsity=rec["sparsity"], verdict=rec["verdict"], nll_dense=rec["nll_dense"],
                   nll_pruned=rec["nll_pruned"], definition=rec["definition"], first_layer=rec["first_layer"],
                   drift_threshold=rec["drift_threshold"], text=rec["explanation"], meta=rec["meta"],
                   **tables)  # fmt: skip


def _unit_rows(patching: pd.DataFrame) -> pd.Series:
    """Which patching rows restore a whole unit (:data:`UNIT_ROWS`) rather than one component."""
    return patching.component.isin(list(UNIT_ROWS.values()))


def _points(run: LayerRunner, hidden: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """The activations at the dynamics hook points of ``layer``, from its input stream (every window: Zamba2's
    hybrid layers also read their embeddings). name -> (n, ...)."""
    acts = run.capture(layer, _POINTS, hidden, rows=slice(None))
    return {p: acts[p][0] if p == "A" else torch.cat(acts[p]) for p in _POINTS}


def _drift(dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> pd.DataFrame:
    rows = []
    for layer in range(len(dense) - 1):
        d, p = dense[layer + 1].float(), pruned[layer + 1].float()  # (n, L, D)
        rel = (torch.linalg.vector_norm(p - d) / torch.linalg.vector_norm(d).clamp_min(1e-12)).item()
        cos = F.cosine_similarity(p, d, dim=-1).mean().item()
        rows.append((layer, rel, cos))
    return pd.DataFrame(rows, columns=["layer", "rel_error", "cosine"])


def _live(acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Live units and live channels: units (Mamba-2 heads (H,), Mamba-1 channels (ED,)) and inner channels (ED,)
    whose scan input is non-zero on some token. Structured pruners in mask mode zero exactly those inputs."""
    A, u = acts["A"], acts["u"]
    channels = u.abs().amax(dim=(0, 1)) > 0  # (ED,)
    if A.dim() == 1:
        return channels.reshape(A.shape[0], -1).any(dim=1), channels  # (H,), (ED,)
    return channels, channels


def _dynamics(acts: dict[str, torch.Tensor], live: tuple[torch.Tensor, torch.Tensor], seed: int):
    """Per-quantity statistics over the ``live`` units and channels, per-token Δ/decay values to sample from, and
    the mean state norm per position. ``live_units`` is the share of units this model itself keeps live."""
    A, u, dt = acts["A"], acts["u"], acts["dt"]
    units, channels = live
    dec = decay(dt, A)[:, :, units]  # (B, L, H') or (B, L, ED', N)
    norms, _ = ssm_states(u, dt, A, acts["B"])  # (B, L, H) or (B, L)
    if A.dim() == 1:
        norms = norms[..., units]  # (B, L, H')
    stats = {
        "delta": summary_stats(dt[:, :, units], seed=seed),
        "decay": summary_stats(dec, seed=seed),
        "memory": summary_stats(memory_length(dec), seed=seed),
        "state_norm": summary_stats(norms, seed=seed),
        "gate_closed": {"share": gate_closed_share(acts["z"][..., channels])},
        **{f"outlier_{p}": {"share": outlier_share(acts[p][..., channels])} for p in ("x", "z", "y")},
        "live_units": {"share": _live(acts)[0].float().mean().item()},
    }
    per_position = norms.reshape(norms.shape[0], norms.shape[1], -1).mean(dim=(0, 2))  # (L,)
    return stats, {"delta": dt[:, :, units], "decay": dec}, per_position


def _sample(values: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    flat = values.reshape(-1).float()
    if flat.numel() <= k:
        return flat
    return flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:k]]


def _restore_plan(dense_lm: LoadedModel, pruned_lm: LoadedModel, layer: int, component: str):
    """``[(pruned tensor, dense tensor or None)]`` for one component, or a string saying why it cannot be restored.

    A tensor only the pruned model has (e.g. a bias added by FLAP's bias compensation) is restored to zero, which is
    what the dense model computes without it.
    """
    reg_d, reg_p = dense_lm.registry, pruned_lm.registry
    own_d, own_p = reg_d.owner(dense_lm.model, layer, component), reg_p.owner(pruned_lm.model, layer, component)
    src = {t.describe(): t.get(own_d) for t in reg_d.component(component).tensors}
    dst = {t.describe(): t.get(own_p) for t in reg_p.component(component).tensors}
    if missing := [k for k in src if k not in dst]:
        return f"{missing[0]} of layer {layer} has no counterpart in the pruned model (structurally shrunk)"
    for key, tensor in dst.items():
        if key in src and src[key].shape != tensor.shape:
            return (f"{key} of layer {layer} has shape {tuple(tensor.shape)} in the pruned model and "
                    f"{tuple(src[key].shape)} in the dense one (structurally shrunk)")  # fmt: skip
    return [(tensor, src.get(key)) for key, tensor in dst.items()]


def _unchanged(plan) -> bool:
    return all(torch.equal(d, s) if s is not None else not d.any() for d, s in plan)


@contextmanager
def _restored(plan):
    """Copy the dense values of a restore plan into the pruned model for the ``with`` block."""
    saved = [d.detach().clone() for d, _ in plan]
    try:
        with torch.no_grad():
            for d, s in plan:
                d.copy_(s) if s is not None else d.zero_()
        yield
    finally:
        with torch.no_grad():
            for (d, _), old in zip(plan, saved):
                d.copy_(old)


def _patch_plans(dense_lm: LoadedModel, pruned_lm: LoadedModel, components) -> tuple[list, str | None]:
    """Restore plans for every (layer, weight-owning component) the layer holds, then one per unit of the layer
    with more than one of them (:data:`UNIT_ROWS`), or ``([], why)`` when shapes differ."""
    reg = dense_lm.registry
    names = [c.name for c in reg.components if c.tensors]
    if components is not None:
        if bad := [c for c in components if c not in reg.component_names]:
            raise SpecError(f"unknown component {bad[0]!r}; allowed: {', '.join(reg.component_names)}", "components")
        if weightless := [c for c in components if c not in names]:
            raise SpecError(f"{weightless[0]!r} owns no weights to restore; allowed: {', '.join(names)}", "components")
        names = [c for c in names if c in components]
    plans = []
    for layer in range(reg.n_layers):
        held = [c for c in names if reg.has(layer, c)]
        for c in held:
            plan = _restore_plan(dense_lm, pruned_lm, layer, c)
            if isinstance(plan, str):
                return [], (f"restoration patching skipped: {plan}; explain a masked model instead (structured "
                             "pruning with mode='mask')")  # fmt: skip
            plans.append((layer, c, plan))
        for kind, row in UNIT_ROWS.items():  # each whole unit at once: what no single component explains
            parts = {c for c in held if reg.component(c).unit == kind}
            if len(parts) > 1:
                plans.append((layer, row, [pair for lyr, c, plan in plans if lyr == layer and c in parts
                                           for pair in plan]))  # fmt: skip
    return plans, None


def _row_unit(registry, component: str) -> str:
    """The unit kind of a patching row: its component's, or the unit a whole-unit row restores."""
    units = {row: kind for kind, row in UNIT_ROWS.items()}
    return units[component] if component in units else registry.component(component).unit


@torch.no_grad()
def _patched_nll(run: LayerRunner, stream: list[torch.Tensor], layer: int, plan, nll_unpatched: float) -> float:
    """Loss of the pruned model with ``plan`` restored while block ``layer`` runs (no forward when it restores
    nothing). A tensor shared with later layers keeps its pruned values there."""
    if _unchanged(plan):
        return nll_unpatched
    nll_sum, count = 0.0, 0
    for b in run.batches:
        with _restored(plan):
            hidden = run.run(stream[layer][b], layer, layer + 1, rows=b)  # (B, L, D)
        out = run.run(hidden, layer + 1, rows=b)  # (B, L, D)
        for nll, _, n in run.terms(out, b):
            nll_sum, count = nll_sum + nll, count + n
    return nll_sum / count


def _ratio_text(q: str, d: float, p: float) -> str:
    fmt = (lambda v: f"{v:.1%}") if q in ("gate_closed",) or q.startswith("outlier") else (lambda v: f"{v:.3g}")
    ratio = f" (×{p / d:.2f})" if d > 0 and math.isfinite(p / d) else ""
    return f"{_NAMES[q]} {fmt(d)} → {fmt(p)}{ratio}"


def _shifts(dynamics: pd.DataFrame, layer: int, k: int = 2) -> list[str]:
    """The ``k`` largest dense-to-pruned shifts of ``layer``'s dynamics (median or share), as text."""
    df = dynamics[(dynamics.layer == layer) & dynamics.stat.isin(["median", "share"]).to_numpy()]
    df = df[~df.quantity.isin(["decay", "live_units"]).to_numpy()]  # memory length says the same in tokens
    # shares under half a percent are not a shift worth naming
    eps = pd.Series(np.where((df.stat == "share").to_numpy(), 5e-3, 1e-3), index=df.index)
    score = (df.pruned.abs() + eps).apply(math.log) - (df.dense.abs() + eps).apply(math.log)
    df = df.assign(score=score.abs()).sort_values("score", ascending=False, kind="stable")
    return [_ratio_text(r.quantity, r.dense, r.pruned) for r in df.head(k).itertuples() if r.score > 0.05]


def _text(e: Explanation, n_top: int = 3) -> str:
    where = f"{e.label}" + (f" at {e.sparsity:.0%} sparsity" if e.sparsity is not None else "")
    what = "Answer perplexity" if e.meta.get("scored") == "the answer tokens only" else "Perplexity"
    parts = [f"{where}: {e.verdict}. {what} {e.ppl_pruned:.2f} vs {e.ppl_dense:.2f} dense (×{e.ppl_ratio:.3f}; "
             f"{e.meta.get('windows', '')})."]  # fmt: skip
    last = e.drift.iloc[-1]
    if e.first_layer is None:
        parts.append(f"No layer's hidden-state drift exceeds {e.drift_threshold:g} (relative error after the last "
                     f"layer {last.rel_error:.3f}, cosine {last.cosine:.3f}).")  # fmt: skip
    else:
        first = e.drift[e.drift.layer == e.first_layer].iloc[0]
        parts.append(f"Hidden states first drift past {e.drift_threshold:g} at layer {e.first_layer} (relative error "
                     f"{first.rel_error:.3f}, cosine {first.cosine:.3f}); after the last layer the error is "
                     f"{last.rel_error:.3f} (cosine {last.cosine:.3f}).")  # fmt: skip
    top, units = e.top, _unit_rows(e.patching)
    unit_text = {row: _UNIT_TEXT[kind] for kind, row in UNIT_ROWS.items()}
    if top is None:
        gap = e.nll_pruned - e.nll_dense
        wholes = e.patching[units & (e.patching.recovered > 0).to_numpy()]
        if e.meta.get("patching_note"):
            parts.append(e.meta["patching_note"])
        elif abs(gap) <= MIN_GAP:
            parts.append(f"The loss gap ({gap:+.4f} nats/token) is too small to attribute (under {MIN_GAP:g}).")
        elif len(wholes):
            best = wholes.iloc[0]
            parts.append(
                f"No single component's restoration recovers any of the loss gap; restoring the whole "
                f"{unit_text[best.component]} of layer {best.layer} recovers {best.recovered:.0%}."
            )
        else:
            parts.append("No single restoration recovers any of the loss gap: the damage is spread over layers.")
        shift_layer = e.first_layer
    else:
        best = e.patching[~units & (e.patching.recovered > 0).to_numpy()].head(n_top)
        named = [f"{r.component} of layer {r.layer} ({r.recovered:.0%})" for r in best.itertuples()]
        parts.append(f"Restoring {named[0].replace(' (', ' alone recovers ', 1).rstrip(')')} of the loss gap"
                     + (f"; next: {', '.join(named[1:])}." if len(named) > 1 else "."))
        first = e.patching[~units & (e.patching.layer == top[0]) & (e.patching.component == top[1])]
        kind = first.unit.iloc[0] if "unit" in e.patching.columns else "ssm"  # tables saved before hybrids: SSM
        whole = e.patching[(e.patching.component == UNIT_ROWS[kind]) & (e.patching.layer == top[0])]
        if len(whole):
            parts.append(f"Restoring the whole {_UNIT_TEXT[kind]} of layer {top[0]} recovers "
                         f"{whole.recovered.iloc[0]:.0%}.")  # fmt: skip
        shift_layer = top[0]
    if shift_layer is not None and (shifts := _shifts(e.dynamics, shift_layer)):
        parts.append(f"Dynamics of layer {shift_layer}, dense → pruned (median): {'; '.join(shifts)}.")
    return " ".join(parts)


def explain(
    dense: LoadedModel,
    pruned: LoadedModel,
    windows: Windows,
    *,
    label: str = "pruned",
    sparsity: float | None = None,
    options: ExplainOptions | None = None,
    show_progress: bool = True,
    **overrides,
) -> Explanation:
    """Explain how a pruned model departs from its dense original, on the same windows.

    Args:
        dense: The dense model (``LoadedModel`` or instrumented HF model).
        pruned: The pruned model of the same architecture and depth. Restoration patching needs equal tensor
            shapes (unstructured pruning, or structured pruning with ``mode="mask"``); otherwise it is skipped and
            ``meta["patching_note"]`` says why.
        windows: Token windows both models run on (e.g. 8 validation windows of 256 tokens).
        label: Name of the pruned model in tables and text.
        sparsity: Its sparsity, for tables and text.
        options: :class:`ExplainOptions`; keyword ``overrides`` change its fields (``patch``, ``top_layers``,
            ``components``, ``dynamics_layers``, ``drift_threshold``, ``healthy``, ``collapsed``, ``batch_size``,
            ``n_samples``, ``seed``).
        show_progress: Show a tqdm bar over the patching runs.

    Returns:
        An :class:`Explanation`; ``str(e.text)`` is the generated explanation.

    Raises:
        SpecError: If the models differ in architecture or depth, an option is out of range, or
            ``dynamics_layers`` names a layer without an SSM mixer.

    Examples:
        >>> dense = load_model(); pruned = load_model()
        >>> prune(pruned, "magnitude", sparsity=0.5)
        >>> e = explain(dense, pruned, calibration_windows(load_corpus(), dense.tokenizer, 8, 256,
        ...             split="validation"), label="magnitude", sparsity=0.5)
        >>> e.verdict, e.first_layer, e.top
    """
    options = ExplainOptions.merged(options, **overrides)
    o = options
    dense_lm, pruned_lm = as_loaded(dense, instrumented=True), as_loaded(pruned, instrumented=True)
    rd, rp = dense_lm.registry, pruned_lm.registry
    if (rd.arch, rd.n_layers) != (rp.arch, rp.n_layers):
        raise SpecError(f"dense is {rd.arch} with {rd.n_layers} layers but pruned is {rp.arch} with "
                        f"{rp.n_layers}; explain compares a model with a pruned copy of itself", "pruned")  # fmt: skip
    batch_size, seed, n_samples, drift_threshold = o.batch_size, o.seed, o.n_samples, o.drift_threshold
    healthy, collapsed, top_layers, components = o.healthy, o.collapsed, o.top_layers, o.components
    patch = o.patch
    dyn_layers = _dynamics_layers(rd, o.dynamics_layers)

    d_run, p_run = (LayerRunner(lm, windows, batch_size, piece_windows=1) for lm in (dense_lm, pruned_lm))
    d_stream, p_stream = d_run.stream(), p_run.stream()
    n_layers = rd.n_layers
    nll_d, nll_p = d_run.loss(d_stream[-1], n_layers)[0], p_run.loss(p_stream[-1], n_layers)[0]
    check_loss(dense_lm.model, nll_d, d_run.ids, "the dense model's loss")
    check_loss(pruned_lm.model, nll_p, p_run.ids, "the pruned model's loss")
    drift = _drift(d_stream, p_stream)
    over = drift[drift.rel_error > drift_threshold]
    first_layer = int(over.layer.iloc[0]) if len(over) else None

    dyn_rows, sample_rows, state_rows = [], [], []
    for layer in dyn_layers:
        per_model = {}
        acts = {"pruned": _points(p_run, p_stream[layer], layer), "dense": _points(d_run, d_stream[layer], layer)}
        live = _live(acts["pruned"])  # compare the units the pruned model keeps, in both models
        same_units = live[1].shape == _live(acts["dense"])[1].shape
        for model in ("dense", "pruned"):
            mask = live if same_units else _live(acts[model])  # shrunk: each model's own units
            stats, values, positions = _dynamics(acts[model], mask, seed)
            per_model[model] = (stats, positions)
            for q, v in values.items():
                sample_rows += [(layer, q, model, x) for x in _sample(v, n_samples, seed + layer).tolist()]
        for q, stats in per_model["dense"][0].items():
            dyn_rows += [(layer, q, s, v, per_model["pruned"][0][q][s]) for s, v in stats.items()]
        pos_d, pos_p = per_model["dense"][1], per_model["pruned"][1]
        state_rows += [(layer, t, pos_d[t].item(), pos_p[t].item()) for t in range(len(pos_d))]
    dynamics = pd.DataFrame(dyn_rows, columns=["layer", "quantity", "stat", "dense", "pruned"])
    samples = pd.DataFrame(sample_rows, columns=["layer", "quantity", "model", "value"])
    states = pd.DataFrame(state_rows, columns=["layer", "position", "dense", "pruned"])

    meta = {"windows": windows.describe(), "windows_sha256": windows.sha256(), "seed": seed,
            "scored": "every next token" if windows.labels is None else "the answer tokens only",
            "thresholds": {"healthy": healthy, "collapsed": collapsed, "drift": drift_threshold},
            "dense": dense_lm.name, "pruned": pruned_lm.name, "dynamics_layers": dyn_layers,
            "versions": versions()}  # fmt: skip
    patch_rows = []
    gap = nll_p - nll_d
    if patch:
        plans, note = _patch_plans(dense_lm, pruned_lm, components)
        if note:
            meta["patching_note"] = note
            logger.warning("%s", note)
        wholes = set(UNIT_ROWS.values())
        if top_layers is not None:  # coarse to fine: whole units first, then the components of the best layers
            done = {(layer, comp): _patched_nll(p_run, p_stream, layer, plan, nll_p)
                    for layer, comp, plan in plans if comp in wholes}  # fmt: skip
            best: dict[int, float] = {}
            for (layer, _), nll in done.items():
                best[layer] = min(best.get(layer, math.inf), nll)
            keep = set(sorted(best, key=lambda layer: (best[layer], layer))[:top_layers])
            plans = [(lyr, c, pl) for lyr, c, pl in plans if c in wholes or lyr in keep]
        else:
            done = {}
        changed = [(layer, comp) for layer, comp, plan in plans if not _unchanged(plan)]
        meta["patched"] = (f"{len(changed)} of {len(plans)} (layer, component) restorations differ from dense and "
                           f"were run" + (f" (components of the top {top_layers} layers only)" if done else ""))
        bar = tqdm(total=len(changed), desc=f"patching {label}", disable=not show_progress, leave=False)
        for layer, comp, plan in plans:
            if (layer, comp) in done:
                nll = done[(layer, comp)]
            else:
                nll = _patched_nll(p_run, p_stream, layer, plan, nll_p)
            bar.update(int((layer, comp) in changed))
            recovered = (nll_p - nll) / gap if abs(gap) > MIN_GAP else float("nan")
            patch_rows.append((layer, comp, _row_unit(rd, comp), nll, recovered))
        bar.close()
    else:
        meta["patching_note"] = "restoration patching not run (patch=False)"
    patching = pd.DataFrame(patch_rows, columns=["layer", "component", "unit", "nll", "recovered"])
    patching = patching.sort_values("recovered", ascending=False, kind="stable", na_position="last")
    patching = patching.reset_index(drop=True)
    e = Explanation(label=label, sparsity=sparsity, verdict=verdict(math.exp(gap), healthy=healthy,
                    collapsed=collapsed), nll_dense=nll_d, nll_pruned=nll_p, definition=_definition(windows),
                    first_layer=first_layer, drift_threshold=drift_threshold, drift=drift, patching=patching,
                    dynamics=dynamics, samples=samples, states=states, meta=meta)  # fmt: skip
    e.text = _text(e)
    logger.info("%s", e.text)
    return e


def _dynamics_layers(registry, asked) -> list[int]:
    """The layers whose SSM dynamics are measured: ``asked``, or every layer with an SSM mixer (the others are
    skipped, and logged).

    Raises:
        SpecError: For a layer out of range or one without an SSM mixer (naming the layers with one).
    """
    with_ssm = [i for i in range(registry.n_layers) if "ssm" in registry.units[i]]
    if asked is None:
        if skipped := [i for i in range(registry.n_layers) if i not in with_ssm]:
            logger.info("SSM dynamics skip layer(s) %s: no SSM mixer (%s)", ", ".join(map(str, skipped)),
                        ", ".join(registry.layer_kind(i) for i in skipped))  # fmt: skip
        return with_ssm
    for layer in asked:
        registry.check_layer(layer, "dynamics_layers")
        if layer not in with_ssm:
            raise SpecError(
                f"layer {layer} holds {registry.layer_kind(layer)} and no SSM mixer, so it has no SSM "
                f"dynamics; layers with one: {', '.join(map(str, with_ssm))}",
                "dynamics_layers",
            )
    return sorted(set(asked))


def _definition(windows: Windows) -> str:
    return (f"token-level perplexity exp(mean next-token NLL) over {windows.describe()}; every token after the "
            "first of each window is scored with the window's preceding tokens as context")  # fmt: skip


def explain_method(
    model: LoadedModel,
    method: str,
    sparsity: float,
    windows: Windows,
    *,
    calibration: Windows | None = None,
    label: str | None = None,
    prune_options: dict | None = None,
    **options,
) -> Explanation:
    """Prune a copy of ``model`` with ``method`` at ``sparsity`` and explain it against ``model``.

    Structured methods run with ``mode="mask"`` (unless ``prune_options`` says otherwise) so tensor shapes stay
    equal and restoration patching applies; masked units compute exactly what removed ones would.

    Args:
        model: The dense ``LoadedModel`` (left unchanged).
        method: A pruning method of :data:`sensitivity.pruning.METHODS`.
        sparsity: Its sparsity.
        windows: Windows to explain on.
        calibration: Calibration windows for the methods that need them (``METHODS[method].needs_calibration``).
        label: Name in tables (default: ``method``).
        prune_options: Extra keyword arguments of :func:`sensitivity.prune`.
        **options: Keyword arguments of :func:`explain`.
    """
    from ..pruning import METHODS, prune

    entry = METHODS.check(method, as_loaded(model).arch)
    dense = as_loaded(model, instrumented=True)
    kwargs = dict(prune_options or {})
    if "mode" in entry.options.model_fields:  # structured: masked units keep the shapes, so patching applies
        kwargs.setdefault("mode", "mask")
    needs = entry.needs_calibration(entry.validate(kwargs))
    pruned = LoadedModel(model=copy.deepcopy(dense.model), tokenizer=dense.tokenizer, registry=dense.registry,
                         name=f"{dense.name} [{method} {sparsity:g}]")  # fmt: skip
    prune(pruned, method, sparsity=sparsity, windows=calibration if needs else None,
          show_progress=options.get("show_progress", True), **kwargs)  # fmt: skip
    return explain(dense, pruned, windows, label=label or method, sparsity=sparsity, **options)

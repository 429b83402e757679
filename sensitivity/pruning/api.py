"""One entry point for every pruning method, the measured sparsity of a model, and the run's manifest."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..allocation import Schedule
from ..core.loading import LoadedModel, as_loaded
from ..core.output import versions
from ..core.registry import DEFAULT_EXCLUDE
from ..data import Windows
from .save import save_pruned
from .structured import UNITS, prune_structured
from .unstructured import METHODS as UNSTRUCTURED
from .unstructured import prune_unstructured

__all__ = ["METHODS", "PruneResult", "prune", "sparsity_report"]

logger = logging.getLogger(__name__)

METHODS = UNSTRUCTURED + UNITS
"""``magnitude``, ``wanda`` (weight-level, unstructured or N:M) and ``state``, ``head``, ``headdim`` (SSM units)."""


def sparsity_report(model: LoadedModel | nn.Module) -> pd.DataFrame:
    """Measured zeros of every mixer parameter slice.

    Returns:
        One row per (layer, component, tensor) with ``numel``, ``zeros``, ``sparsity`` and ``prunable`` (a weight
        matrix the unstructured pruners target).
    """
    lm = as_loaded(model)
    reg = lm.registry
    rows = []
    for layer in range(reg.n_layers):
        mixer = reg.mixer(lm.model, layer)
        for comp in reg.components:
            prunable = {t.describe() for t in reg.weights(comp.name)}
            for t in comp.tensors:
                w = t.get(mixer).detach()
                zeros = int((w == 0).sum())
                rows.append({"layer": layer, "component": comp.name, "tensor": t.describe(), "numel": w.numel(),
                             "zeros": zeros, "sparsity": zeros / w.numel(),
                             "prunable": t.describe() in prunable})  # fmt: skip
    return pd.DataFrame(rows)


def _param_counts(module: nn.Module) -> dict[str, int]:
    params = {id(p): p for p in module.parameters()}.values()  # tied embeddings once
    return {"params": sum(p.numel() for p in params), "nonzero": sum(int((p != 0).sum()) for p in params)}


def _windows_record(windows: Windows | None) -> dict | None:
    if windows is None:
        return None
    return {"description": windows.describe(), "n": len(windows), "seqlen": windows.seqlen, "split": windows.split,
            "source": windows.source, "seed": windows.seed, "sha256": windows.sha256()}  # fmt: skip


@dataclass
class PruneResult:
    """A pruned model and what was done to it.

    Attributes:
        model: The pruned model (the same object that was passed in, pruned in place).
        manifest: Method, options, schedule, calibration windows, seed, parameter counts before and after,
            measured sparsity per tensor and versions (what ``pruning_manifest.json`` holds).
    """

    model: LoadedModel
    manifest: dict

    def report(self) -> pd.DataFrame:
        """:func:`sparsity_report` of the pruned model."""
        return sparsity_report(self.model)

    def save(self, out, *, overwrite: bool = False) -> Path:
        """``save_pretrained`` of model and tokenizer plus ``pruning_manifest.json`` (see :func:`save_pruned`)."""
        return save_pruned(self.model, out, self.manifest, overwrite=overwrite)


def prune(
    model: LoadedModel | nn.Module,
    method: str,
    *,
    sparsity: float | list[float] | None = None,
    schedule: Schedule | None = None,
    structure: str | None = None,
    compare: str = "row",
    sequential: bool = False,
    windows: Windows | None = None,
    score: str | None = None,
    mode: str = "auto",
    bias_compensation: bool = True,
    components=None,
    exclude=DEFAULT_EXCLUDE,
    seed: int = 0,
    batch_size: int = 8,
    show_progress: bool = True,
) -> PruneResult:
    """Prune a state-space LM in place with one of :data:`METHODS`.

    ``magnitude`` and ``wanda`` zero weights of the mixers' weight matrices (:func:`prune_unstructured`);
    ``state``, ``head`` and ``headdim`` remove SSM units (:func:`prune_structured`): uniform ratios shrink the
    tensors and rewrite the config, per-layer ratios zero the units and say so (``manifest["structured"]["mode"]``).

    Args:
        model: A ``LoadedModel`` (or instrumented HF model). It is modified in place; load it again to keep the
            dense one.
        method: One of :data:`METHODS`.
        sparsity: Fraction to remove (weights for magnitude/WANDA; units per layer for structured methods, or a
            list with one value per layer).
        schedule: A :class:`~sensitivity.allocation.Schedule` instead of ``sparsity``; structured methods use its
            parameter-weighted per-layer sparsity (``Schedule.per_layer()``).
        structure: ``"n:m"`` for N:M sparsity (magnitude/WANDA only).
        compare: ``"row"`` or ``"tensor"`` (magnitude/WANDA).
        sequential: Sequential WANDA calibration.
        windows: Calibration windows (WANDA, Taylor and FLAP scores).
        score: Structured unit score (``taylor``, ``flap``, ``magnitude``, ``random``; default per unit).
        mode: Structured ``"auto"``, ``"shrink"`` or ``"mask"``.
        bias_compensation: FLAP's bias compensation for head/headdim pruning.
        components: Components to prune with a uniform ``sparsity`` (magnitude/WANDA).
        exclude: Components kept dense (magnitude/WANDA; default ``conv1d``).
        seed: Recorded in the manifest; seeds random unit scores.
        batch_size: Windows per forward.
        show_progress: Show tqdm bars.

    Returns:
        A :class:`PruneResult`; ``result.save(out)`` writes a checkpoint that ``load_model(out)`` reads.

    Raises:
        ValueError: Unknown method, or any invalid option (see the per-method functions).

    Example:
        >>> lm = load_model()
        >>> result = prune(lm, "wanda", sparsity=0.5, windows=calibration_windows(corpus, lm.tokenizer, 64, 256))
        >>> result.save("runs/wanda50")
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; allowed: {', '.join(METHODS)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed {seed!r} must be an integer")
    lm = as_loaded(model)
    before = _param_counts(lm.model)
    source_config = lm.model.config.to_dict()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method in UNSTRUCTURED:
            for name, value, default in (("score", score, None), ("mode", mode, "auto")):
                if value != default:
                    raise ValueError(f"{name} {value!r} applies to the structured methods ({', '.join(UNITS)}), "
                                     f"not {method!r}")  # fmt: skip
            if sequential and method != "wanda":
                raise ValueError("sequential calibration applies to wanda only; magnitude needs no calibration")
            if isinstance(sparsity, (list, tuple)):
                raise ValueError(f"{method} takes one sparsity; give per-layer or per-component values as a schedule")
            applied = prune_unstructured(lm, method, sparsity=sparsity, schedule=schedule, structure=structure,
                                         compare=compare, windows=windows, sequential=sequential,
                                         components=components, exclude=exclude, batch_size=batch_size,
                                         show_progress=show_progress)  # fmt: skip
            structured = None
        else:
            if schedule is not None:
                if sparsity is not None:
                    raise ValueError("give either sparsity or schedule, not both")
                schedule.validate(lm.registry)
                sparsity = schedule.per_layer()
            if structure is not None or sequential:
                what = f"structure {structure!r}" if structure is not None else "sequential calibration"
                raise ValueError(f"{what} applies to magnitude and wanda only, not {method!r}")
            if sparsity is None:
                raise ValueError(f"{method} pruning needs a sparsity (fraction of units per layer) or a schedule")
            applied = schedule
            structured = prune_structured(lm, method, sparsity, windows=windows, score=score, seed=seed, mode=mode,
                                          bias_compensation=bias_compensation, batch_size=batch_size,
                                          show_progress=show_progress).to_dict()  # fmt: skip
    seconds = time.perf_counter() - start
    report = sparsity_report(lm)
    manifest = {
        "method": method,
        "source_model": lm.name,
        "options": {"sparsity": sparsity, "structure": structure, "compare": compare, "sequential": sequential,
                    "score": score, "mode": mode, "bias_compensation": bias_compensation,
                    "components": list(components) if components else None, "exclude": list(exclude or ())},
        "schedule": applied.to_dict() if applied is not None else None,
        "structured": structured,
        "calibration": _windows_record(windows),
        "seed": seed,
        "params_before": before,
        "params_after": _param_counts(lm.model),
        "config_changed": {k: [v, lm.model.config.to_dict().get(k)] for k, v in source_config.items()
                           if lm.model.config.to_dict().get(k) != v and k != "transformers_version"},
        "sparsity": report.to_dict(orient="records"),
        "seconds": round(seconds, 3),
        "versions": versions(),
    }  # fmt: skip
    logger.info("%s: %d -> %d non-zero parameters in %.1f s", method, before["nonzero"],
                manifest["params_after"]["nonzero"], seconds)  # fmt: skip
    return PruneResult(lm, manifest)

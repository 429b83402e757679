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
from ..data import Windows

# isort: off
from . import unstructured, structured, blocks  # noqa: F401 (they register magnitude, wanda; units; blocks)
# isort: on
from .methods import METHODS, resolve
from .save import save_pruned

__all__ = ["METHODS", "PruneResult", "prune", "sparsity_report"]

logger = logging.getLogger(__name__)

def sparsity_report(model: LoadedModel | nn.Module) -> pd.DataFrame:
    """Measured zeros of every component's parameter slice (SSM mixers; attention, MLP and MoE units on hybrids).

    Returns:
        One row per (layer, component, tensor) with ``numel``, ``zeros``, ``sparsity`` and ``prunable`` (a weight
        matrix the unstructured pruners target).
    """
    lm = as_loaded(model)
    reg = lm.registry
    rows = []
    for layer in range(reg.n_layers):
        for comp in reg.components_at(layer):
            prunable = {t.describe() for t in reg.weights(comp.name)}
            owner = reg.owner(lm.model, layer, comp.name)
            for t in comp.tensors:
                w = t.get(owner).detach()
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

    def save(self, out, *, overwrite: bool = False, dtype=None) -> Path:
        """``save_pretrained`` of model and tokenizer plus ``pruning_manifest.json``, weights stored in ``dtype``
        (default: as in memory; see :func:`save_pruned`)."""
        return save_pruned(self.model, out, self.manifest, overwrite=overwrite, dtype=dtype)


def prune(
    model: LoadedModel | nn.Module,
    method: str,
    *,
    sparsity: float | list[float] | None = None,
    schedule: Schedule | None = None,
    windows: Windows | None = None,
    seed: int = 0,
    batch_size: int = 8,
    show_progress: bool = True,
    **options,
) -> PruneResult:
    """Prune a state-space LM in place with a method of :data:`METHODS`.

    ``magnitude`` and ``wanda`` zero weights of the mixers' weight matrices (:func:`prune_unstructured`);
    ``state``, ``head`` and ``headdim`` remove SSM units (:func:`prune_structured`): uniform ratios shrink the
    tensors and rewrite the config, per-layer ratios zero the units and say so (``manifest["structured"]["mode"]``);
    on hybrids they prune the SSM layers only. ``blocks`` removes whole blocks, or one unit kind from blocks, greedily
    by measured loss increase (:func:`prune_blocks`; the order and damages in ``manifest["structured"]["steps"]``).
    Methods registered from user code (``METHODS.register``) run the same way.

    Args:
        model: A ``LoadedModel`` (or instrumented HF model). It is modified in place; load it again to keep the
            dense one.
        method: A name in :data:`METHODS`.
        sparsity: Fraction to remove (weights for magnitude/WANDA; units per layer for structured methods, or a
            list with one value per layer; the candidate blocks for ``blocks``, instead of its ``n_blocks``).
        schedule: A :class:`~sensitivity.allocation.Schedule` instead of ``sparsity``; structured methods use its
            parameter-weighted per-layer sparsity (``Schedule.per_layer()``).
        windows: Calibration windows (WANDA, Taylor and FLAP scores; ``METHODS[method].needs_calibration``).
        seed: Recorded in the manifest; seeds torch's RNG and random unit scores.
        batch_size: Windows per forward.
        show_progress: Show tqdm bars.
        **options: The method's options, validated by ``METHODS[method].options``: :class:`WandaOptions`
            (``structure``, ``compare``, ``components``, ``exclude``, ``sequential``), :class:`UnstructuredOptions`
            (magnitude), :class:`StateOptions` and :class:`HeadOptions` (``score``, ``mode``, ``layers``,
            ``bias_compensation``), :class:`BlockOptions` (``n_blocks``, ``unit``, ``layers``).

    Returns:
        A :class:`PruneResult`; ``result.save(out)`` writes a checkpoint that ``load_model(out)`` reads.

    Raises:
        SpecError: An unknown method or option, or an invalid request (naming the field).

    Examples:
        >>> lm = load_model()
        >>> result = prune(lm, "wanda", sparsity=0.5, windows=calibration_windows(corpus, lm.tokenizer, 64, 256))
        >>> result.save("runs/wanda50")
    """
    lm = as_loaded(model)
    entry, opts, request = resolve(lm, method, options, sparsity=sparsity, schedule=schedule, windows=windows,
                                   seed=seed, batch_size=batch_size)  # fmt: skip
    before = _param_counts(lm.model)
    source_config = lm.model.config.to_dict()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(request.seed)
        applied, structured = entry.fn(lm, opts, sparsity=request.sparsity, schedule=schedule, windows=windows,
                                       seed=request.seed, batch_size=request.batch_size,
                                       show_progress=show_progress)  # fmt: skip
    seconds = time.perf_counter() - start
    report = sparsity_report(lm)
    sparsity = list(request.sparsity) if isinstance(request.sparsity, tuple) else request.sparsity
    manifest = {
        "method": method,
        "source_model": lm.name,
        "options": {"sparsity": sparsity, **opts.to_dict()},
        "schedule": applied.to_dict() if applied is not None else None,
        "structured": structured,
        "calibration": _windows_record(windows if entry.needs_calibration(opts) else None),
        "seed": request.seed,
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

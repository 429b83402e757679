"""Pruning a checkpoint larger than memory: one block in memory at a time, written shard by shard.

The same result as :func:`~sensitivity.pruning.prune` on the whole model:

* magnitude and WANDA: WANDA's statistics of layer ``l`` come from the residual stream entering it, the dense
  model's (one-shot: every layer's from a first pass over the blocks) or the pruned one's (``sequential``: the
  stream carried on through each pruned block); magnitude reads only the weights.
* state, head and head-dim pruning (:mod:`~sensitivity.pruning.structured`): the plan (counts, shrink or mask, the
  rewritten config) comes from the config alone; unit scores per block: ``magnitude`` and ``random`` from the
  weights, ``flap`` from the out_proj inputs of the dense model (a first pass over the blocks), ``taylor`` from
  per-window gradients back-propagated block by block
  (:func:`~sensitivity.core.streamed.streamed_window_gradients`, its residual stream cached on disk). A shrunk
  block is written with its smaller tensors, and the rewritten config with it.

Peak memory is the parts outside the blocks (embeddings, head), one block, and the calibration windows' residual
stream (and their gradients, for ``taylor``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation import uniform_schedule
from ..core.hooks import hook_name, hooks
from ..core.masks import parse_structure
from ..core.output import publish_dir, versions, write_manifest
from ..core.registry import build_registry
from ..core.runner import LayerRunner
from ..core.spec import SpecError
from ..core.stats import ChannelStats
from ..core.streamed import ShardWriter, StreamedCheckpoint, streamed_channel_stats, streamed_window_gradients
from ..data import Windows
from ._config import derived_fields, rewrite_config
from .methods import METHODS, resolve
from .save import MANIFEST, check_out
from .structured import (
    UNITS,
    StructuredResult,
    bias_flag_params,
    compensation,
    layer_scores,
    mask_layer,
    plan_structured,
    shrunk_state,
    ssm_layers,
    taylor_components,
    unit_index,
)
from .unstructured import _input_points, _prune_layer, _targets

__all__ = ["STREAMED_METHODS", "prune_streamed"]

logger = logging.getLogger(__name__)

STREAMED_METHODS = ("magnitude", "wanda", *UNITS)
"""Methods that run streamed."""


def _count(tensors: dict[str, torch.Tensor], counts: dict[str, int]) -> None:
    """Add ``tensors``' entries and non-zero entries to ``counts``."""
    for t in tensors.values():
        counts["params"] += t.numel()
        counts["nonzero"] += int(torch.count_nonzero(t))


@torch.no_grad()
def prune_streamed(
    path: str | Path | StreamedCheckpoint,
    method: str,
    out: str | Path,
    *,
    sparsity: float | None = None,
    windows: Windows | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    manifest: dict | None = None,
    show_progress: bool = True,
    seed: int = 0,
    **options,
) -> dict:
    """Prune the checkpoint at ``path`` one block at a time, writing ``out`` shard by shard.

    Args:
        path: A local safetensors checkpoint of a family in
            :data:`~sensitivity.core.streamed.STREAMED_ARCHS` (never modified), or its
            :class:`~sensitivity.core.streamed.StreamedCheckpoint`.
        method: ``"wanda"``, ``"magnitude"``, ``"state"``, ``"head"`` or ``"headdim"``.
        out: Directory for the pruned checkpoint (published whole: staged, then renamed into place).
        sparsity: Fraction of every targeted weight to remove (implied by ``structure`` when omitted); for units,
            the fraction of units, one value or one per layer as :func:`~sensitivity.pruning.prune_structured`.
        windows: Calibration windows (WANDA; the ``taylor`` and ``flap`` unit scores).
        batch_size: Windows per forward.
        overwrite: Replace a checkpoint this toolkit wrote before.
        manifest: Fields added to ``pruning_manifest.json`` (a job's spec).
        show_progress: Show a tqdm bar over the blocks.
        **options: The method's options (``structure``, ``compare``, ``components``, ``exclude``, ``sequential``;
            ``score``, ``mode``, ``layers``, ``bias_compensation``).
        seed: Seed of the ``random`` unit score (recorded).

    Returns:
        The manifest written next to the checkpoint.

    Raises:
        SpecError: For a method that does not stream, bad options, or windows missing where they are needed.
        ValueError: For a checkpoint that cannot be streamed (naming why).
    """
    if method not in STREAMED_METHODS:
        raise SpecError(f"{method!r} does not run streamed; allowed: {', '.join(STREAMED_METHODS)}", "method")
    ckpt = path if isinstance(path, StreamedCheckpoint) else StreamedCheckpoint(path)
    if method in UNITS:
        _, opts, request = resolve(ckpt.lm, method, options, sparsity=sparsity, schedule=None, windows=windows,
                                   seed=seed, batch_size=batch_size)  # fmt: skip
        out = check_out(out, str(ckpt.path), overwrite)
        return _units(ckpt, method, opts, request.sparsity, windows, seed, batch_size, out, overwrite,
                      manifest or {}, show_progress)  # fmt: skip
    entry = METHODS[method]
    opts = entry.validate(options)
    if method == "wanda" and windows is None:
        raise SpecError("wanda needs calibration windows", "windows")
    out = check_out(out, str(ckpt.path), overwrite)
    lm, registry = ckpt.lm, ckpt.lm.registry
    nm = parse_structure(opts.structure)
    s = sparsity if sparsity is not None else 1 - nm[0] / nm[1]
    schedule = uniform_schedule(lm, s, exclude=opts.exclude, components=opts.components)
    targets = _targets(registry, schedule)
    sequential = bool(getattr(opts, "sequential", False))
    start = time.perf_counter()
    oneshot = None
    if method == "wanda" and not sequential:  # every layer's statistics from the dense model first, as in memory
        points = [hook_name(layer, p) for layer, t in enumerate(targets) for p in _input_points(registry, t)]
        oneshot = streamed_channel_stats(ckpt, windows, points, batch_size=batch_size, show_progress=show_progress)
    run = LayerRunner(lm, windows, batch_size) if method == "wanda" and sequential else None
    hidden = [run.embed(b) for b in run.batches] if run is not None else []  # (B, L, D) each
    counts = {"params": 0, "nonzero": 0}
    with publish_dir(out, overwrite=overwrite, marker=MANIFEST) as tmp:
        writer = ShardWriter(tmp, ckpt.path)
        for layer in tqdm(range(registry.n_layers), desc=f"{method} (streamed)", disable=not show_progress):
            with ckpt.block(layer):
                points, stats = _input_points(registry, targets[layer]), None
                if oneshot is not None:
                    stats = {p: oneshot[hook_name(layer, p)] for p in points}
                elif run is not None:  # sequential: this layer's input comes through the pruned blocks before it
                    stats = {p: ChannelStats() for p in points}
                    with hooks(lm, {hook_name(layer, p): stats[p].add_batch for p in points}):
                        for h, b in zip(hidden, run.batches):
                            run.run(h, layer, layer + 1, rows=b)
                _prune_layer(lm.model, registry, layer, targets[layer], method, nm, opts.compare, stats,
                             len(windows) if windows is not None else 0)  # fmt: skip
                if run is not None:  # the next layer's input: through the pruned block
                    hidden = [run.run(h, layer, layer + 1, rows=b) for h, b in zip(hidden, run.batches)]
                tensors = ckpt.block_tensors(layer)
                _count(tensors, counts)
                writer.write(ckpt.to_checkpoint(tensors))
        if resident := ckpt.resident_tensors():  # shared by several blocks (Zamba2), pruned by each in turn
            _count(resident, counts)
            writer.write(ckpt.to_checkpoint(resident))
        for name in ckpt.outer_names():  # outside the blocks: unchanged, counted and copied a piece at a time
            for piece in ckpt.pieces(name):
                _count({name: piece}, counts)
        writer.copy(ckpt, ckpt.outer_names())
        writer.close()
        record = {"method": method, "source_model": str(ckpt.path), "streamed": True,
                  "options": {"sparsity": s, **opts.to_dict()}, "schedule": schedule.to_dict(),
                  "calibration": None if windows is None else windows.describe(), "params_after": counts,
                  "seconds": round(time.perf_counter() - start, 3), **(manifest or {})}  # fmt: skip
        write_manifest(tmp / MANIFEST, record)
    logger.info("%s (streamed) pruned %s to %s", method, path, out)
    return record


def _fisher(ckpt: StreamedCheckpoint, unit: str, windows: Windows, layers, show_progress: bool) -> dict:
    """Fisher sums of the unit's components, keyed as :func:`~sensitivity.attribution.weight_scores` keys them."""
    reg, names = ckpt.lm.registry, taylor_components(unit)

    def params(layer: int, block) -> dict:
        owner = reg.mixer(ckpt.lm.model, layer)
        return {(layer, t.param): owner.get_parameter(t.param) for c in names for t in reg.component(c).tensors}

    def slices(key, stats) -> dict:  # only the slices the score reads (B and C: a sliver of in_proj)
        return {(key[0], c, t.describe()): t.select(stats.sumsq).clone() for c in names
                for t in reg.component(c).tensors if t.param == key[1]}  # fmt: skip

    grads = streamed_window_gradients(ckpt, windows, params, layers, reduce=slices, show_progress=show_progress)
    return {k: v for per_param in grads.values() for k, v in per_param.items()}


@torch.no_grad()
def _units(ckpt: StreamedCheckpoint, unit: str, opts, sparsity, windows: Windows | None, seed: int, batch_size: int,
           out: Path, overwrite: bool, manifest: dict, show_progress: bool) -> dict:  # fmt: skip
    """State, head or head-dim pruning of a streamed checkpoint: :func:`~sensitivity.pruning.prune_structured`'s
    plan, scores and masks or shrunk tensors, one block at a time."""
    lm, reg = ckpt.lm, ckpt.lm.registry
    start = time.perf_counter()
    plan = plan_structured(lm, unit, opts, sparsity)
    config = rewrite_config(lm.model.config, {})
    gen = torch.Generator().manual_seed(seed) if plan.score == "random" else None
    fisher = _fisher(ckpt, unit, windows, plan.targets, show_progress) if plan.score == "taylor" and plan.targets \
        else None  # fmt: skip
    flap = None
    if plan.score == "flap" and plan.targets:  # the out_proj inputs of the dense model, as in memory
        points = {layer: hook_name(layer, "out_proj_in") for layer in plan.targets}
        got = streamed_channel_stats(ckpt, windows, points.values(), batch_size=batch_size,
                                     show_progress=show_progress)  # fmt: skip
        flap = {layer: got[name] for layer, name in points.items()}
    index_reg, added, flag = reg, {}, None
    mixer0 = reg.mixer(lm.model, plan.targets[0]) if plan.targets else None
    if plan.bias and plan.targets and mixer0.out_proj.bias is None:  # the flag that creates out_proj's bias
        flag = reg.config_fields["out_bias"]
        added = bias_flag_params(lm.model, flag)
        shared = {n.rsplit(".", 1)[0] for n in ckpt.resident_tensors()}
        if outside := [n for n in added if not n.startswith(ckpt.prefix + ".") or n.rsplit(".", 1)[0] in shared]:
            raise SpecError(f"FLAP's bias compensation switches {flag} on, which adds {outside[0]}, a tensor the "
                            "blocks share; streamed, use bias_compensation=false or prune in memory",
                            "options.bias_compensation")  # fmt: skip
        setattr(config, flag, True)
        index_reg = build_registry(config)
    index = unit_index(index_reg, unit) if plan.targets else {}
    removed: dict[int, list[int]] = {layer: [] for layer in ssm_layers(reg)}
    counts = {"params": 0, "nonzero": 0}
    with publish_dir(out, overwrite=overwrite, marker=MANIFEST) as tmp:
        writer = ShardWriter(tmp, ckpt.path)
        for layer in tqdm(range(reg.n_layers), desc=f"{unit} (streamed)", disable=not show_progress):
            with ckpt.block(layer) as block:
                names = [n for n in added if n.startswith(f"{ckpt.prefix}.{layer}.")]
                for name in names:  # zero biases wherever the flag creates them, as in memory
                    owner = block.get_submodule(name.removeprefix(f"{ckpt.prefix}.{layer}.").rpartition(".")[0])
                    owner.bias = nn.Parameter(torch.zeros(added[name], dtype=owner.weight.dtype))
                if layer in plan.targets:
                    mixer = reg.mixer(lm.model, layer)
                    stats = flap[layer] if flap else None
                    scores, mean = layer_scores(reg, mixer, layer, unit, plan.score, gen=gen, stats=stats,
                                                fisher=fisher, n_windows=len(windows) if windows else 0)  # fmt: skip
                    units = removed[layer] = plan.select(layer, scores)
                    if plan.bias:
                        b = mixer.out_proj.bias
                        b.add_(compensation(reg, mixer, unit, units, mean).to(b.dtype))
                    if plan.mode == "mask":
                        mask_layer(index_reg, mixer, unit, index, units)
                tensors = ckpt.block_tensors(layer, names)
                if plan.mode == "shrink" and removed.get(layer):
                    prefix = f"{ckpt.prefix}.{layer}.{reg.units[layer]['ssm']}."
                    state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
                    state, _ = shrunk_state(state, index, removed[layer])
                    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
                    tensors.update({prefix + k: v for k, v in state.items()})
                _count(tensors, counts)
                writer.write(ckpt.to_checkpoint(tensors))
        if resident := ckpt.resident_tensors():
            _count(resident, counts)
            writer.write(ckpt.to_checkpoint(resident))
        for name in ckpt.outer_names():
            for piece in ckpt.pieces(name):
                _count({name: piece}, counts)
        writer.copy(ckpt, ckpt.outer_names())
        changes = dict(plan.changes) if any(removed.values()) and plan.mode == "shrink" else {}
        if changes:
            fresh = rewrite_config(config, changes)
            for key in (*changes, *derived_fields(config)):
                setattr(config, key, getattr(fresh, key))
        writer.close(config if changes or flag else None)
        config_changes = {k: [getattr(lm.model.config, k), getattr(config, k)] for k in changes}
        if flag:
            config_changes[flag] = [False, True]
        result = StructuredResult(unit, plan.score, plan.mode, removed, plan.n_units, lm.n_params, counts["params"],
                                  plan.bias, flag is not None, config_changes, plan.reason)  # fmt: skip
        sparsity = list(sparsity) if isinstance(sparsity, tuple) else sparsity
        record = {"method": unit, "source_model": str(ckpt.path), "streamed": True,
                  "options": {"sparsity": sparsity, **opts.to_dict()}, "structured": result.to_dict(),
                  "calibration": None if windows is None or plan.score not in ("taylor", "flap")
                  else windows.describe(), "seed": seed, "params_after": counts,
                  "seconds": round(time.perf_counter() - start, 3), "versions": versions(),
                  **manifest}  # fmt: skip
        write_manifest(tmp / MANIFEST, record)
    logger.info("%s (streamed) pruned %s to %s", unit, ckpt.path, out)
    return record

"""Magnitude and WANDA on a checkpoint larger than memory: one block in memory at a time, written shard by shard.

The same masks as :func:`~sensitivity.pruning.prune` on the whole model: WANDA's statistics of layer ``l`` come
from the residual stream entering it, the dense one (one-shot: the stream is carried on through the dense block)
or the pruned one (``sequential``: through the pruned block); magnitude reads only the weights. Peak memory is the
parts outside the blocks (embeddings, head), one block, and the calibration windows' residual stream.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..allocation import uniform_schedule
from ..core.hooks import hook_name, hooks
from ..core.masks import parse_structure
from ..core.output import publish_dir, write_manifest
from ..core.runner import LayerRunner
from ..core.spec import SpecError
from ..core.stats import ChannelStats
from ..core.streamed import ShardWriter, StreamedCheckpoint
from ..data import Windows
from .methods import METHODS
from .save import MANIFEST, check_out
from .unstructured import _input_points, _prune_layer, _targets

__all__ = ["STREAMED_METHODS", "prune_streamed"]

logger = logging.getLogger(__name__)

STREAMED_METHODS = ("magnitude", "wanda")
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
    **options,
) -> dict:
    """Prune the checkpoint at ``path`` by magnitude or WANDA one block at a time, writing ``out`` shard by shard.

    Args:
        path: A local safetensors checkpoint of a family in
            :data:`~sensitivity.core.streamed.STREAMED_ARCHS` (never modified), or its
            :class:`~sensitivity.core.streamed.StreamedCheckpoint`.
        method: ``"wanda"`` or ``"magnitude"``.
        out: Directory for the pruned checkpoint (published whole: staged, then renamed into place).
        sparsity: Fraction of every targeted weight to remove (implied by ``structure`` when omitted).
        windows: Calibration windows (WANDA).
        batch_size: Windows per forward.
        overwrite: Replace a checkpoint this toolkit wrote before.
        manifest: Fields added to ``pruning_manifest.json`` (a job's spec).
        show_progress: Show a tqdm bar over the blocks.
        **options: The method's options (``structure``, ``compare``, ``components``, ``exclude``, ``sequential``).

    Returns:
        The manifest written next to the checkpoint.

    Raises:
        SpecError: For a method that does not stream, bad options, or WANDA without windows.
        ValueError: For a checkpoint that cannot be streamed (naming why).
    """
    if method not in STREAMED_METHODS:
        raise SpecError(f"{method!r} does not run streamed; allowed: {', '.join(STREAMED_METHODS)}", "method")
    entry = METHODS[method]
    opts = entry.validate(options)
    if method == "wanda" and windows is None:
        raise SpecError("wanda needs calibration windows", "windows")
    ckpt = path if isinstance(path, StreamedCheckpoint) else StreamedCheckpoint(path)
    out = check_out(out, str(ckpt.path), overwrite)
    lm, registry = ckpt.lm, ckpt.lm.registry
    nm = parse_structure(opts.structure)
    s = sparsity if sparsity is not None else 1 - nm[0] / nm[1]
    schedule = uniform_schedule(lm, s, exclude=opts.exclude, components=opts.components)
    targets = _targets(registry, schedule)
    sequential = bool(getattr(opts, "sequential", False))
    run = LayerRunner(lm, windows, batch_size) if windows is not None else None
    hidden = [run.embed(b) for b in run.batches] if run is not None else []  # (B, L, D) each
    counts = {"params": 0, "nonzero": 0}
    start = time.perf_counter()
    with publish_dir(out, overwrite=overwrite, marker=MANIFEST) as tmp:
        writer = ShardWriter(tmp, ckpt.path)
        for layer in tqdm(range(registry.n_layers), desc=f"{method} (streamed)", disable=not show_progress):
            with ckpt.block(layer):
                stats, dense = None, None
                if method == "wanda":
                    points = _input_points(registry, targets[layer])
                    stats = {p: ChannelStats() for p in points}
                    with hooks(lm, {hook_name(layer, p): stats[p].add_batch for p in points}):
                        dense = [run.run(h, layer, layer + 1, rows=b) for h, b in zip(hidden, run.batches)]
                _prune_layer(lm.model, registry, layer, targets[layer], method, nm, opts.compare, stats,
                             len(windows) if windows is not None else 0)  # fmt: skip
                if method == "wanda" and sequential:  # the next layer's input: through the pruned block
                    hidden = [run.run(h, layer, layer + 1, rows=b) for h, b in zip(hidden, run.batches)]
                elif method == "wanda":  # one-shot: through the dense block
                    hidden = dense
                tensors = ckpt.block_tensors(layer)
                _count(tensors, counts)
                writer.write(tensors)
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

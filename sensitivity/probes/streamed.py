"""The probe sweep of a checkpoint larger than memory: one block in memory at a time.

The numbers of the cached sweep (:mod:`~sensitivity.probes.sweep`), computed in another order. The dense pass runs
the blocks one after the other, keeping the residual stream entering each probed layer (and the ones after it) in a
memory-mapped :class:`~sensitivity.core.streamed.ResidualCache` on disk. A shard (the probes of one layer ``l``)
then loads block ``l``, runs each probe's ablated block on the cached stream, keeps the outputs in a second
memory-mapped cache, and carries all of them through blocks ``l+1 .. L-1``, each loaded once, before the head scores
them. Every batch of windows goes through the same blocks as in the cached sweep, so every probe's numbers are the
same bits. Memory: the parts outside the blocks, one block, one batch of the stream, and the dense log-probabilities
of the held-out windows (as in memory).

Estimates (``estimate=True``) stream too: :func:`~sensitivity.probes.estimate.estimate` runs its dense pass and its
layer-by-layer backward pass with one block loaded at a time and the residual stream in a memory-mapped file, the
same computation as in memory.

Shape legend: B batch (windows), L sequence length, D model width, V vocabulary.
"""

from __future__ import annotations

import math
import time

import torch

from ..core.finite import NonFiniteError
from ..core.runner import LayerRunner
from ..core.streamed import ResidualCache, StreamedCheckpoint, streamed_channel_stats
from .ablations import Probe, ablate, resample_point
from .estimate import estimate
from .sweep import ResampleSources

__all__ = ["StreamedProbeJob"]


class _Stream:
    """The cached residual stream indexed by layer, as :class:`ResampleSources` reads it."""

    def __init__(self, cache: ResidualCache, first: int) -> None:
        self.cache, self.first = cache, first

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.cache[layer - self.first]  # (n, L, D)


class StreamedProbeJob:
    """A streamed sweep's set-up (calibration statistics and the dense pass, block by block), then one shard (the
    probes of one layer) at a time -> ``(values per probe, dense NLL, set-up timings)``, as ``_ProbeJob``."""

    def __init__(self, ckpt: StreamedCheckpoint, payload) -> None:
        self.ckpt, self.lm, self.p, self.timings = ckpt, ckpt.lm, payload, {}
        o, reg = payload.options, ckpt.lm.registry
        from .sweep import _calibrate

        t0 = time.perf_counter()
        self.ctx = _calibrate(self.lm, payload.calibration, payload.todo, o, payload.show_progress,
                              stats_of=lambda lm, *args, **kw: streamed_channel_stats(ckpt, *args, **kw))  # fmt: skip
        self.timings["calibration_s"] = time.perf_counter() - t0
        self.cache = None
        if o.estimate:  # the estimates run their own dense pass, block by block
            return
        t0 = time.perf_counter()
        self.run_ = run = LayerRunner(self.lm, payload.windows, o.batch_size)
        self.first = min(p.layer for p in payload.todo)
        n, L = run.ids.shape
        self.cache = ResidualCache(None, (reg.n_layers - self.first, n, L, self.lm.model.config.hidden_size),
                                   self.lm.dtype)  # fmt: skip
        hidden = [run.embed(b) for b in run.batches]  # (B, L, D) each
        with torch.no_grad():
            for layer in range(reg.n_layers):
                with ckpt.block(layer):
                    for h, b in zip(hidden, run.batches):
                        if layer >= self.first:
                            self.cache[layer - self.first][b] = h
                    hidden = [run.run(h, layer, layer + 1, rows=b) for h, b in zip(hidden, run.batches)]
            self.logp = run.logprobs(torch.cat(hidden))  # (n, L-1, V)
        self.nll = run.mean_nll(self.logp)
        if not math.isfinite(self.nll):
            raise NonFiniteError(f"the dense loss of the held-out windows is {self.nll}")
        self.stream = _Stream(self.cache, self.first)
        self.timings["dense_s"] = time.perf_counter() - t0

    def run(self, shard: list[Probe]) -> tuple[list[dict[str, float]], float | None, dict[str, float]]:
        o = self.p.options
        if o.estimate:
            values = estimate(self.lm, shard, self.p.windows, self.ctx, estimator=o.estimator, samples=o.samples,
                              layer_kinds=o.layer_kinds or (),
                              seed=o.seed, batch_size=o.batch_size, show_progress=self.p.show_progress,
                              block=self.ckpt.block, stream=lambda shape, dtype: ResidualCache(None, shape, dtype))
            return [values[p.key] for p in shard], None, self.timings
        return self._exact(shard)

    @torch.no_grad()
    def _exact(self, shard: list[Probe]) -> tuple[list[dict[str, float]], float, dict[str, float]]:
        run, reg, model, layer = self.run_, self.lm.registry, self.lm.model, shard[0].layer
        n, L = run.ids.shape
        with ResidualCache(None, (len(shard), n, L, model.config.hidden_size), self.lm.dtype) as states:
            with self.ckpt.block(layer):
                for i, p in enumerate(shard):
                    point = resample_point(reg, p)
                    for b in run.batches:
                        if point is not None:
                            self.ctx.source = ResampleSources(run, self.stream, {layer: [point]})(layer, point, b)
                        with ablate(model, reg, p, self.ctx):
                            states[i][b] = run.run(self.stream[layer][b], layer, layer + 1, rows=b)  # (B, L, D)
            for k in range(layer + 1, reg.n_layers):
                with self.ckpt.block(k):
                    for i in range(len(shard)):
                        for b in run.batches:
                            states[i][b] = run.run(states[i][b], k, k + 1, rows=b)
            values = []
            for i, p in enumerate(shard):
                nll_sum, kl_sum, count = 0.0, 0.0, 0
                for b in run.batches:
                    for nll, kl, m in run.terms(states[i][b], b, self.logp):
                        nll_sum, kl_sum, count = nll_sum + nll, kl_sum + kl, count + m
                    if not math.isfinite(nll_sum):
                        raise NonFiniteError(f"probe {p.kind} of layer {p.layer} {p.component}"
                                             f"{'' if p.index is None else f' {p.index}'} gives a non-finite loss "
                                             f"({nll_sum / count})")  # fmt: skip
                delta = nll_sum / count - self.nll
                values.append({"delta_nll": delta, "ppl_ratio": math.exp(delta), "kl": kl_sum / count})
        return values, self.nll, self.timings

    def close(self) -> None:
        """Delete the dense stream's cache file."""
        if self.cache is not None:
            self.cache.close()

"""Probe estimates from gradients: first order (attribution patching) and second order (Fisher), every probe of a
sweep from K+1 backward passes instead of a forward per probe.

A probe changes some activations ``a -> a'`` at hook points of its layer and some parameters ``θ -> θ'`` of its
layer. What it changes is read off the ablation itself, so every kind, built in or registered, gets an estimate
without a second description of it: its hooks (:func:`~sensitivity.core.hooks.active_hooks`) are applied in order
to the dense activations, and its weight edits are diffed against the dense weights of the layer. Along that change
``d``, the directional derivative of a window's summed loss ``ℓ`` is::

    s(ℓ) = Σ_points <∂ℓ/∂a, a' - a> + Σ_params <∂ℓ/∂θ, θ' - θ>

computed per window ``w`` for the real next tokens (``s_0w``) and for K label sequences drawn from the dense model
(``s_kw``, labels sampled independently at every scored position). With N the scored positions:

* ``fisher``: ``kl ≈ (1/2N) Σ_w mean_k s_kw²``, the Fisher quadratic ``(1/2) dᵀ F d`` of the KL from the dense model
  (Martens 2020: the Fisher under the model's own labels is the KL's Hessian; the cross terms of different
  positions vanish in expectation, so each window's squared sum is unbiased). ``delta_nll ≈ (1/N) Σ_w s_0w + kl``:
  the second-order expansion of the NLL with the Fisher standing in for its Hessian (Gauss-Newton).
* ``empirical``: ``delta_nll ≈ (1/2N) Σ_w s_0w²``, the squared first-order term per window on the real labels
  (empirical Fisher; Molchanov et al. 2019, Kwon et al. 2022). No ``kl``.
* ``linear`` (AtP; Nanda 2023, Kramár et al. 2024): ``delta_nll ≈ (1/N) Σ_w s_0w``. No ``kl`` (zero to first order).
* ``local``: as ``linear``, with every probe read at its layer's output (below).

A probe that cannot be read as one such change is read at its layer's output instead (``local``):
``d = block_l'(h_l) - h_{l+1}``, the ablated layer run exactly on the dense residual stream entering it, the rest of
the model linearised. That is a probe that swaps a module or edits shared tensors only during the forward (nothing
to diff), and a probe that changes more than one activation: the state probe zeroes index ``n`` of both ``B`` and
``C``, and since ``y`` is bilinear in them each first-order term is alone the whole effect, so their sum counts it
twice (AtP*'s first correction).

The gradients come from a backward pass layer by layer: the dense residual stream entering each layer is kept
(in memory, or for a streamed checkpoint in a memory-mapped file, one block loaded at a time), the head gives the
K+1 gradients at the last hidden state, and each layer, last to first, is run again on each window's cached input
and back-propagates them (vector-Jacobian products), giving the gradients at its hook points and parameters and at
its input. The in-memory and streamed estimates are the same computation, bit for bit. Cost: one forward, then per
layer one block forward and K+1 block backward passes per window, and per probe an inner product (a block forward
for the probes read locally).

Shape legend: B batch (windows), L sequence length, D model width, V vocabulary, K label sequences drawn per
window, c windows of a chunk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.finite import NonFiniteError
from ..core.hooks import ActiveHook, active_hooks, capture, hook_name
from ..core.loading import LoadedModel
from ..core.runner import LayerRunner
from ..core.stats import grad_state
from ..data import Windows
from .ablations import Context, Probe, ablate, resample_point

__all__ = ["ESTIMATORS", "SAMPLED", "estimate"]

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 20

ESTIMATORS = ("fisher", "empirical", "linear", "local")
"""How :func:`estimate` estimates a probe's damage (see the module docstring)."""
SAMPLED = ("fisher",)
"""Estimators that draw label sequences from the dense model (``samples`` of them)."""


@dataclass
class _Plan:
    """What one probe changes: hook names it attaches, names of its layer's parameters it edits (with the change:
    first changed row and the change from there on), and whether it is read at its layer's output (``local``)."""

    points: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    deltas: dict = field(default_factory=dict)
    local: bool = False
    decided: bool = False


class _Layer:
    """A snapshot of one block's parameters and module tree, to see what an ablation changed."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.block = block
        self.params = dict(block.named_parameters())
        self.saved = {n: p.detach().clone() for n, p in self.params.items()}
        self.tree = self._tree()

    def _tree(self) -> list[int]:
        return [id(m) for m in self.block.modules()]

    def changed(self) -> tuple[str, ...]:
        return tuple(n for n, p in self.params.items() if not torch.equal(p.detach(), self.saved[n]))

    def swapped(self) -> bool:
        return self._tree() != self.tree

    def delta(self, name: str) -> tuple[int, torch.Tensor]:
        """The change of parameter ``name`` from its snapshot, from its first changed row (dim 0) to its last:
        ``(first row, change)``, float32."""
        change = self.params[name].detach().float() - self.saved[name].float()  # (rows, ...)
        if change.dim() == 0:
            return 0, change
        rows = change.reshape(change.shape[0], -1).ne(0).any(1).nonzero()[:, 0]
        if not len(rows):
            return 0, change[:0]
        return int(rows[0]), change[int(rows[0]) : int(rows[-1]) + 1].clone()


@contextmanager
def _entered(model, registry, probe: Probe, ctx: Context) -> Iterator[list[ActiveHook]]:
    """Enter ``probe``'s ablation without running a forward: yields the hooks it attached, in order (apply them by
    hand); on exit they count as fired."""
    before = {id(h.apply) for h in active_hooks(model)}
    with ablate(model, registry, probe, ctx):
        mine = [h for h in active_hooks(model) if id(h.apply) not in before]
        try:
            yield mine
        finally:
            for h in mine:
                h.mark()


def estimate(lm: LoadedModel, probes: list[Probe], windows: Windows, ctx: Context, *, estimator: str = "fisher",
             samples: int = 2, seed: int = 0, layer_kinds: Iterable[str] = (), batch_size: int = 8,
             show_progress: bool = False,
             block: Callable[[int], AbstractContextManager] | None = None,
             stream: Callable[[tuple[int, ...], torch.dtype], AbstractContextManager] | None = None,
             ) -> dict[tuple, dict[str, float]]:  # fmt: skip
    """Estimates of ``probes``' damage on ``windows``: probe key -> ``{"delta_nll", "ppl_ratio", "kl"}`` (``kl``
    NaN where the estimator does not estimate it). See the module docstring for the estimators.

    Args:
        lm: The model (instrumented).
        probes: The probes, any layers.
        windows: The held-out windows (a task's score only their labelled positions).
        ctx: The calibration statistics the probes' ablations read.
        estimator: One of :data:`ESTIMATORS`.
        samples: Label sequences drawn from the dense model per window (K), for :data:`SAMPLED` estimators.
        seed: Seed of the label draws.
        layer_kinds: Kinds whose probes are read at their layer's output (the ablated layer run exactly, one
            block forward per probe) instead of at their hook points: exact through the layer's own
            nonlinearities (a zeroed gate or norm input, which a scale-invariant norm hides from the gradient).
        batch_size: Windows per block forward of the dense pass and the locally read probes.
        show_progress: Show tqdm bars.
        block: ``block(layer)``: a context in which block ``layer`` is loaded (a streamed checkpoint's
            ``StreamedCheckpoint.block``); None: every block is in memory.
        stream: ``stream(shape, dtype)``: a context giving the (layers, n, L, D) tensor the dense residual stream
            is kept in (a memory-mapped :class:`~sensitivity.core.streamed.ResidualCache`); None: in memory.

    Raises:
        ValueError: For an unknown estimator or a sample count below 1.
        NonFiniteError: If the dense loss is not finite.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    k = samples if estimator in SAMPLED else 0
    terms = _Terms(lm, windows, ctx, estimator, k, seed, batch_size, show_progress, block, stream, set(layer_kinds))
    s = terms(probes)  # key -> (1+K, n) float64 directional derivatives
    count = terms.count
    out = {}
    for p in probes:
        real, sampled = s[p.key][0], s[p.key][1:]  # (n,), (K, n)
        kl = float("nan")
        if estimator == "fisher":
            kl = 0.5 * float(sampled.square().mean(0).sum()) / count
            delta = float(real.sum()) / count + kl
        elif estimator == "empirical":
            delta = 0.5 * float(real.square().sum()) / count
        else:
            delta = float(real.sum()) / count
        out[p.key] = {"delta_nll": delta, "ppl_ratio": math.exp(min(delta, 700.0)), "kl": kl}
    logger.info("estimated %d probes (%s%s; %d read at their layer's output)", len(probes), estimator,
                f", K={k}" if k else "", terms.local)  # fmt: skip
    return out


class _Terms:
    """The directional derivatives ``s`` of every probe: a (1+K, n) float64 tensor per probe, row 0 on the real
    labels, rows 1..K on labels drawn from the dense model, one column per window."""

    def __init__(self, lm, windows, ctx, estimator, k, seed, batch_size, show, block, stream, layer_kinds) -> None:
        self.lm, self.model, self.reg, self.ctx = lm, lm.model, lm.registry, ctx
        self.estimator, self.k, self.seed, self.show = estimator, k, seed, show
        self.layer_kinds = layer_kinds
        self.run = LayerRunner(lm, windows, batch_size)
        self.block = block or (lambda layer: nullcontext())
        self.stream = stream or (lambda shape, dtype: nullcontext(torch.empty(shape, dtype=dtype)))
        self.count = int((self.run.targets != -100).sum())
        self.local = 0

    def __call__(self, probes: list[Probe]) -> dict[tuple, torch.Tensor]:
        run, n_layers = self.run, self.reg.n_layers
        n, L = run.ids.shape
        by_layer: dict[int, list[Probe]] = {}
        for p in probes:
            by_layer.setdefault(p.layer, []).append(p)
        first = min(by_layer)
        shape = (n_layers + 1 - first, n, L, self.model.config.hidden_size)
        with self.stream(shape, self.lm.dtype) as resid:
            self._forward(resid, first)
            grads = self._head(resid[-1])  # (1+K, n, L, D)
            s = {}
            for layer in tqdm(range(n_layers - 1, first - 1, -1), desc=f"estimate ({self.estimator}, backward)",
                              disable=not self.show, unit="layer"):  # fmt: skip
                with self.block(layer):
                    grads = self._layer(layer, by_layer.get(layer, []), resid, first, grads, s)
        return s

    @torch.no_grad()
    def _forward(self, resid: torch.Tensor, first: int) -> None:
        """The dense residual stream entering layers ``first..`` and the last hidden state, into ``resid``."""
        run = self.run
        hidden = [run.embed(b) for b in run.batches]  # (B, L, D) each
        for layer in range(self.reg.n_layers):
            with self.block(layer):
                if layer >= first:
                    for h, b in zip(hidden, run.batches):
                        resid[layer - first][b] = h
                hidden = [run.run(h, layer, layer + 1, rows=b) for h, b in zip(hidden, run.batches)]
        for h, b in zip(hidden, run.batches):
            resid[-1][b] = h

    def _head(self, last: torch.Tensor) -> torch.Tensor:
        """The gradients of each window's summed loss at the last hidden state: real labels, then K draws from the
        dense model. (1+K, n, L, D)."""
        run, k = self.run, self.k
        grads = torch.zeros((1 + k, *last.shape), dtype=last.dtype)  # (1+K, n, L, D)
        gen = torch.Generator().manual_seed(self.seed)
        with grad_state(self.model):
            for w in range(last.shape[0]):
                h = last[w : w + 1].clone().requires_grad_(True)  # (1, L, D)
                logp = F.log_softmax(run.logits(h)[0, :-1], dim=-1)  # (L-1, V)
                targets = run.targets[w]  # (L-1,)
                mask = targets != -100
                labels = [targets.clamp(min=0)]
                if k:
                    draws = torch.multinomial(logp.detach().exp().cpu(), k, replacement=True, generator=gen)
                    labels += list(draws.to(targets.device).T)  # (L-1,) each
                for j, y in enumerate(labels):
                    loss = -logp.gather(-1, y[:, None])[:, 0][mask].sum()
                    if j == 0 and not torch.isfinite(loss):
                        raise NonFiniteError(f"the dense loss of the estimate's window {w} is not finite "
                                             f"({loss.item()})")  # fmt: skip
                    grads[j, w] = torch.autograd.grad(loss, h, retain_graph=j < k)[0][0]
        return grads

    def _plan(self, layer: int, group: list[Probe]) -> dict[tuple, _Plan]:
        """What each probe of ``layer`` changes (its hooks attached, not run; its weight edits made and undone)."""
        plans = {}
        snap = _Layer(self.reg.blocks(self.model)[layer])
        for p in group:
            plan = plans[p.key] = _Plan()
            with _entered(self.model, self.reg, p, self.ctx) as attached:
                plan.points = tuple(h.name for h in attached)
                plan.params = snap.changed()
                swapped = snap.swapped()
                if plan.params and not plan.points and self.estimator != "local" and p.kind not in self.layer_kinds:
                    plan.deltas = {name: snap.delta(name) for name in plan.params}
            plan.local = self.estimator == "local" or p.kind in self.layer_kinds or swapped or not (
                plan.points or plan.params) or bool(plan.points and plan.params)  # fmt: skip
        return plans

    def _layer(self, layer: int, group: list[Probe], resid, first: int, grads: torch.Tensor, s: dict) -> torch.Tensor:
        """Back-propagate ``grads`` (1+K, n, L, D) at the output of ``layer`` to its input, filling ``s`` for the
        probes of ``layer`` on the way. Returns the gradients at its input (None below ``first``)."""
        run, reg, model = self.run, self.reg, self.model
        n = run.ids.shape[0]
        plans = self._plan(layer, group)
        for p in group:
            s[p.key] = torch.zeros((1 + self.k, n), dtype=torch.float64)
        read = [p for p in group if not plans[p.key].local]
        names = sorted({h for p in read for h in plans[p.key].points})
        params = dict(reg.blocks(model)[layer].named_parameters())
        params = {name: params[name] for name in sorted({q for p in read for q in plans[p.key].params})}
        sources = self._sources(layer, group, resid[layer - first])
        below = torch.zeros_like(grads) if layer > first else None
        chunk = self._chunk(layer, names, resid[layer - first][:1]) if names else n
        with grad_state(model, params.values()):
            for start in range(0, n if read or below is not None else 0, chunk):
                rows = slice(start, min(start + chunk, n))
                acts: dict[str, list] = {name: [] for name in names}
                act_grads: dict[str, list] = {name: [] for name in names}
                for w in range(rows.start, rows.stop):
                    h = resid[layer - first][w : w + 1].clone().requires_grad_(True)  # (1, L, D)
                    with capture(self.lm, names, detach=False) as store:
                        out = run.run(h, layer, layer + 1, rows=slice(w, w + 1))  # (1, L, D)
                    inputs = {**{("act", k): v[0] for k, v in store.items()}, "in": h,
                              **{("par", k): v for k, v in params.items()}}  # fmt: skip
                    steps = []
                    for j, grad in enumerate(_vjps(out, inputs, grads[:, w : w + 1])):
                        if below is not None:
                            below[j, w] = grad["in"][0]
                        steps.append(grad)
                        for p in read:  # weight edits, window by window (parameter gradients sum the windows)
                            for name, (first_row, delta) in plans[p.key].deltas.items():
                                if (g := grad[("par", name)]) is not None:
                                    g = g if delta.dim() == 0 else g[first_row : first_row + delta.shape[0]]
                                    s[p.key][j, w] += _dot(g, delta)
                        for name in params:  # only one label's parameter gradients at a time
                            grad[("par", name)] = None
                    for name in names:
                        acts[name].append(store[name][0].detach())
                        parts = [step[("act", name)] for step in steps]
                        act_grads[name].append(None if any(g is None for g in parts) else torch.stack(parts))
                chunk_acts = {name: torch.cat(a) for name, a in acts.items()}  # (c, L, ...)
                chunk_grads = {name: None if any(g is None for g in gs) else torch.cat(gs, 1)
                               for name, gs in act_grads.items()}  # (1+K, c, L, ...)  # fmt: skip
                for p in read:
                    if plans[p.key].points and not plans[p.key].local:
                        window = torch.arange(rows.start, rows.stop)
                        self.ctx.source = {name: src[(window + 1) % n] for name, src in sources.get(p.key, {}).items()}
                        s[p.key][:, rows] += self._activation_term(p, plans[p.key], chunk_acts, chunk_grads)
        self.ctx.source = None
        for p in group:
            if plans[p.key].local:
                self.local += 1
                s[p.key] = self._local_term(p, layer, resid, first, grads, sources.get(p.key))
        return below

    def _chunk(self, layer: int, names: list[str], hidden: torch.Tensor) -> int:
        """Windows whose activations and gradients at ``names`` are kept at once (``hidden``: one window's stream
        entering ``layer``, (1, L, D)): up to ``batch_size``, as many as fit in ``CHUNK_BYTES``."""
        with torch.no_grad(), capture(self.lm, names) as store:
            self.run.run(hidden, layer, layer + 1, rows=slice(0, 1))
        per_window = sum(a[0].numel() * a[0].element_size() for a in store.values()) * (2 + self.k)
        return max(1, min(self.run.batch_size, CHUNK_BYTES // max(per_window, 1)))

    @torch.no_grad()
    def _sources(self, layer: int, group: list[Probe], hidden: torch.Tensor) -> dict[tuple, dict[str, torch.Tensor]]:
        """Per resample probe of ``layer``: hook name -> the dense activation of every window (n, ...) (window i
        takes window i+1's)."""
        points = {p.key: resample_point(self.reg, p) for p in group}
        wanted = sorted({pt for pt in points.values() if pt is not None})
        if not wanted:
            return {}
        acts = self.run.capture(layer, wanted, hidden, rows=slice(0, hidden.shape[0]))
        full = {pt: torch.cat(a) for pt, a in acts.items()}
        return {key: {hook_name(layer, pt): full[pt]} for key, pt in points.items() if pt is not None}

    @torch.no_grad()
    def _activation_term(self, p: Probe, plan: _Plan, acts: dict, grads: dict) -> torch.Tensor:
        """``s`` of probe ``p``'s activation changes on a chunk of c windows, (1+K, c). On the first chunk a probe
        that changes more than one activation is switched to the local reading (and zeros returned)."""
        c = next(iter(acts.values())).shape[0]
        total = torch.zeros((1 + self.k, c), dtype=torch.float64)
        changed = 0
        with _entered(self.model, self.reg, p, self.ctx) as attached:
            for h in attached:
                a = acts[h.name]  # (c, L, ...)
                patched = h.apply(a)
                if patched is None:  # a hook that only reads (e.g. keeps y for the gate's bypass)
                    continue
                changed += 1
                if (g := grads[h.name]) is not None:  # (1+K, c, L, ...)
                    d = (patched.to(a.dtype) - a).reshape(c, -1, 1)  # (c, M, 1)
                    total += torch.bmm(g.reshape(*g.shape[:2], -1).transpose(0, 1), d)[..., 0].T.double()
        if not plan.decided:
            plan.decided = True
            if changed > 1:
                plan.local = True
                return total.zero_()
        return total

    @torch.no_grad()
    def _local_term(self, p: Probe, layer: int, resid, first: int, grads: torch.Tensor, sources) -> torch.Tensor:
        """``s`` of probe ``p`` read at its layer's output: ``<g, block_l'(h_l) - h_{l+1}>`` per window. (1+K, n)."""
        run = self.run
        total = torch.zeros((1 + self.k, run.ids.shape[0]), dtype=torch.float64)
        for b in run.batches:
            if sources:
                rows = torch.arange(run.ids.shape[0])[b]
                self.ctx.source = {name: src[(rows + 1) % len(src)] for name, src in sources.items()}
            with ablate(self.model, self.reg, p, self.ctx):
                out = run.run(resid[layer - first][b], layer, layer + 1, rows=b)  # (B, L, D)
            d = (out - resid[layer + 1 - first][b]).double()  # (B, L, D)
            total[:, b] = torch.einsum("jbld,bld->jb", grads[:, b].double(), d)
        self.ctx.source = None
        return total


def _vjps(out: torch.Tensor, inputs: dict, cotangents: torch.Tensor) -> Iterator[dict]:
    """The vector-Jacobian products of ``out`` with each of ``cotangents`` (1+K, *out.shape), one at a time: key of
    ``inputs`` -> the product (shaped like the input), or None for an input ``out`` does not depend on."""
    keys = [k for k, v in inputs.items() if v.requires_grad]
    for j, cot in enumerate(cotangents):
        got = torch.autograd.grad(out, [inputs[k] for k in keys], grad_outputs=cot,
                                  retain_graph=j < len(cotangents) - 1, allow_unused=True)  # fmt: skip
        yield {**dict.fromkeys(inputs), **dict(zip(keys, got))}


def _dot(grad: torch.Tensor, change: torch.Tensor) -> float:
    """The inner product of a gradient with a change of the same shape, accumulated in float32."""
    return float(grad.reshape(-1) @ change.reshape(-1).to(grad.dtype))

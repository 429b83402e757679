"""First-order estimates of every probe from one forward and one backward per batch (attribution patching).

A probe changes some activations ``a -> a'`` at hook points of its layer and some parameters ``θ -> θ'`` of its
layer. Attribution patching (AtP; Nanda 2023, Kramár et al. 2024) estimates the change of the summed NLL of the
scored positions to first order around the dense model::

    ΔNLL ≈ Σ_points <∂NLL/∂a, a' - a> + Σ_params <∂NLL/∂θ, θ' - θ>

with the gradients of one dense forward and backward. What a probe changes is read off the ablation itself, so the
estimates cover every kind, built in or registered, without a second description of it: its hooks
(:func:`~sensitivity.core.hooks.active_hooks`) are applied in order to the dense activations, and its weight
edits are diffed against the dense weights of the layer.

Two estimators (``ProbeOptions.estimator``):

* ``linear`` (AtP): the formula above. A probe it cannot read as one such change is estimated as ``local`` instead:
  a probe that swaps a module or edits shared tensors only during the forward (nothing to diff), and a probe that
  changes more than one activation. The second is the SSM case of AtP*'s first correction: the state probe zeroes
  index ``n`` of both ``B`` and ``C``, and since ``y`` is bilinear in them each first-order term is alone the whole
  effect (no ``C_n`` reads nothing, no ``B_n`` writes nothing), so their sum counts it twice.
* ``local``: the ablated layer is run exactly on the dense residual stream entering it and only the rest of the
  model is linearised, ``ΔNLL ≈ <∂NLL/∂h_{l+1}, block_l'(h_l) - h_{l+1}>`` (AtP*'s recomputation of the saturated
  part, here the whole layer: Δ's softplus and ``exp(Δ·A)``, the gate's SiLU and the gated norm). One block
  forward per probe and batch.

Estimated rows give ``delta_nll`` and ``ppl_ratio = exp(delta_nll)``; ``kl`` is missing (KL to the dense model is
zero to first order). The gradients are of the same loss the exact sweep measures (mean next-token NLL over the
scored positions: every position but the last of a text window, the labelled ones of a task window).

Shape legend: B batch (windows), L sequence length, D model width.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.finite import NonFiniteError
from ..core.hooks import ActiveHook, active_hooks, capture, hook_name
from ..core.loading import LoadedModel
from ..core.runner import LayerRunner
from ..data import Windows
from .ablations import Context, Probe, ablate, resample_point

__all__ = ["ESTIMATORS", "estimate"]

logger = logging.getLogger(__name__)

ESTIMATORS = ("linear", "local")
DELTA_BYTES = 256 << 20
"""Weight changes kept from planning up to this size in all (beyond it a probe's edit is made again at the end)."""


@dataclass
class _Plan:
    """What one probe changes: hook names it attaches, names of its layer's parameters it edits, and whether it
    must be estimated by running its layer (``local``)."""

    points: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    deltas: dict | None = None  # param name -> (first changed row, its change from there on), kept from planning
    local: bool = False
    total: float = 0.0
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


def estimate(lm: LoadedModel, probes: list[Probe], windows: Windows, ctx: Context, *, estimator: str = "linear",
             batch_size: int = 8, show_progress: bool = False) -> dict[tuple, dict[str, float]]:  # fmt: skip
    """First-order estimates of ``probes`` on ``windows``: probe key -> ``{"delta_nll", "ppl_ratio", "kl"}``
    (``kl`` NaN). See the module docstring for the two estimators.

    Raises:
        ValueError: For an unknown estimator.
        NonFiniteError: If the dense loss is not finite.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    model, registry = lm.model, lm.registry
    runner = LayerRunner(lm, windows, batch_size)
    blocks = registry.blocks(model)
    plans = {p.key: _Plan() for p in probes}
    by_layer: dict[int, list[Probe]] = {}
    for p in probes:
        by_layer.setdefault(p.layer, []).append(p)

    # 1. What each probe changes (its hooks are attached, not run; its weight edits are made and undone).
    kept = 0
    for layer, group in by_layer.items():
        snap = _Layer(blocks[layer])
        for p in tqdm(group, desc=f"plan layer {layer}", disable=not show_progress, leave=False):
            plan = plans[p.key]
            with _entered(model, registry, p, ctx) as attached:
                plan.points = tuple(h.name for h in attached)
                plan.params = snap.changed()
                swapped = snap.swapped()
                if plan.params and not plan.points and estimator == "linear" and kept < DELTA_BYTES:
                    plan.deltas = {n: snap.delta(n) for n in plan.params}
                    kept += sum(d.numel() * d.element_size() for _, d in plan.deltas.values())
            plan.local = estimator == "local" or swapped or not (plan.points or plan.params) or bool(
                plan.points and plan.params)  # fmt: skip
        del snap

    points = sorted({n for p in probes if not plans[p.key].local for n in plans[p.key].points})
    weight_probes = [p for p in probes if not plans[p.key].local and plans[p.key].params]
    grad_params = {(p.layer, n): dict(blocks[p.layer].named_parameters())[n]
                   for p in weight_probes for n in plans[p.key].params}  # fmt: skip
    param_grads = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in grad_params.items()}
    resample = [p for p in probes if resample_point(registry, p) is not None]
    stream = runner.stream() if resample else None  # dense residual entering each layer, for resample sources
    by_point: dict[int, list[str]] = {}
    for p in resample:
        by_point.setdefault(p.layer, []).append(resample_point(registry, p))
    sources = ResampleSources(runner, stream, {layer: sorted(set(pts)) for layer, pts in by_point.items()})
    count = 0

    # 2. One forward and backward per batch; activation and local estimates per batch.
    flags = {k: v.requires_grad for k, v in grad_params.items()}
    try:
        for v in grad_params.values():
            v.requires_grad_(True)
        for b in tqdm(runner.batches, desc="estimate (forward+backward)", disable=not show_progress, unit="batch"):
            acts, grads, hidden, grad_out, n = _backward(runner, b, points, grad_params, param_grads)
            sources.clear()
            count += n
            for p in probes:
                plan = plans[p.key]
                if not plan.points and not plan.local:
                    continue
                if (point := resample_point(registry, p)) is not None:
                    ctx.source = sources(p.layer, point, b)
                if not plan.local:
                    plan.total += _activation_term(model, registry, p, ctx, plan, acts, grads)
                if plan.local:  # decided local up front, or by the activation term on the first batch
                    plan.total += _local_term(runner, p, ctx, b, hidden, grad_out)
    finally:
        for k, v in grad_params.items():
            v.requires_grad_(flags[k])
        ctx.source = None

    # 3. Weight edits against the accumulated parameter gradients.
    for layer, group in by_layer.items():
        snap = None
        for p in group:
            plan = plans[p.key]
            if plan.local or not plan.params:
                continue
            if plan.deltas is None:
                snap = snap or _Layer(blocks[layer])
                with _entered(model, registry, p, ctx):
                    plan.deltas = {n: snap.delta(n) for n in plan.params}
            for n, (start, delta) in plan.deltas.items():
                grad = param_grads[(layer, n)]
                grad = grad if delta.dim() == 0 else grad[start : start + delta.shape[0]]
                plan.total += float(torch.sum(grad * delta, dtype=torch.float64))
            plan.deltas = None
    out = {}
    for p in probes:
        delta = plans[p.key].total / count
        out[p.key] = {"delta_nll": delta, "ppl_ratio": math.exp(min(delta, 700.0)), "kl": float("nan")}
    local = sum(plans[p.key].local for p in probes)
    logger.info("estimated %d probes (%s; %d by their local layer)", len(probes), estimator, local)
    return out


def _backward(runner: LayerRunner, b: slice, points: list[str], grad_params: dict, param_grads: dict):
    """One dense forward and backward of batch ``b``: activations and their gradients at ``points``, the residual
    stream entering and leaving each block (detached) with the gradient at each block's output, and the parameter
    gradients added into ``param_grads``. Returns ``(acts, grads, hidden, grad_out, scored positions)``."""
    with torch.enable_grad(), capture(runner.lm, points, detach=False) as store:
        h = embeds = runner.embed(b)  # (B, L, D)
        ins, outs = [], []
        for layer in range(len(runner.blocks)):
            ins.append(h)
            h = runner.call(layer, h, embeds)  # (B, L, D)
            outs.append(h)
        logits = runner.logits(h)[:, :-1]  # (B, L-1, V)
        logp = F.log_softmax(logits, dim=-1)
        targets = runner.targets[b]  # (B, L-1)
        token = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, L-1)
        mask = targets != -100
        loss = -token[mask].sum()
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the dense loss of the estimate's windows is not finite ({loss.item()})")
        acts = {n: store[n][0] for n in points}
        params = list(grad_params.values())
        inputs = [*outs, *acts.values(), *params]
        got = torch.autograd.grad(loss, inputs, allow_unused=True)
    grad_out = list(got[: len(outs)])
    grads = dict(zip(acts, got[len(outs) : len(outs) + len(acts)]))
    for k, g in zip(grad_params, got[len(outs) + len(acts) :]):
        if g is not None:
            param_grads[k] += g.float()
    hidden = [t.detach() for t in ins] + [outs[-1].detach()]
    return ({n: a.detach() for n, a in acts.items()}, grads, hidden, grad_out, int(mask.sum()))


class ResampleSources:
    """The dense activations at a layer's resampled hook points on the windows a batch resamples from (window i
    takes window i+1's): one block forward per layer and batch for all of that layer's points, from the dense
    residual ``stream`` entering each layer. Shared by the estimates and the cached and batched sweeps."""

    def __init__(self, runner: LayerRunner, stream: list[torch.Tensor] | None, points: dict[int, list[str]]) -> None:
        self.runner, self.stream, self.points, self.cache = runner, stream, points, {}
        n = len(runner.ids)
        self.source = (torch.arange(n) + 1) % n

    def clear(self) -> None:
        self.cache.clear()

    def __call__(self, layer: int, point: str, b: slice) -> dict[str, torch.Tensor]:
        if layer not in self.cache:
            src = self.source[b].to(self.runner.ids.device)
            acts = self.runner.capture(layer, self.points[layer], self.stream[layer][src], rows=src)
            self.cache[layer] = {hook_name(layer, pt): torch.cat(a) for pt, a in acts.items()}
        name = hook_name(layer, point)
        return {name: self.cache[layer][name]}


def _activation_term(model, registry, probe: Probe, ctx: Context, plan: _Plan, acts: dict, grads: dict) -> float:
    """``Σ <∂NLL/∂a, a' - a>`` over the activations the probe's hooks change, on one batch. On the first batch, a
    probe that changes more than one activation is switched to the local estimate (and 0 returned)."""
    total, changed = 0.0, 0
    with _entered(model, registry, probe, ctx) as attached:
        for h in attached:
            a = acts[h.name]
            patched = h.apply(a)
            if patched is None:  # a hook that only reads (e.g. keeps y for the gate's bypass)
                continue
            changed += 1
            g = grads[h.name]
            if g is not None:
                total += float(torch.sum(g * (patched.to(a.dtype) - a), dtype=torch.float64))
    if not plan.decided:
        plan.decided = True
        if changed > 1:
            plan.local = True
            return 0.0
    return total


@torch.no_grad()
def _local_term(runner: LayerRunner, probe: Probe, ctx: Context, b: slice, hidden: list, grad_out: list) -> float:
    """``<∂NLL/∂h_{l+1}, block_l'(h_l) - h_{l+1}>`` on one batch: the ablated layer run exactly, the rest
    linearised."""
    layer = probe.layer
    with ablate(runner.model, runner.registry, probe, ctx):
        out = runner.run(hidden[layer], layer, layer + 1, rows=b)  # (B, L, D)
    return float(torch.sum(grad_out[layer] * (out - hidden[layer + 1]), dtype=torch.float64))

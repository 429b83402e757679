"""captum layer attributions of the LM objective to each component's hook-point activation.

The forward function maps input embeddings (B, L, D) (``model.get_input_embeddings()(ids)``) to one scalar per
window, the objective of :func:`.gradients.window_objective` with the window's own next tokens as targets, through
the instrumented forward (``use_cache=False``). Where the model's own forward scales the looked-up embeddings but
not ``inputs_embeds`` (Falcon-H1's ``embedding_multiplier``), the forward function applies
``Registry.embed_scale`` itself (:func:`forward_embed_scale`), so it computes the same logits as the model on the
token ids. Integrated gradients and conductance integrate from the baseline ``"zeros"``: all-zero input embeddings
(so the layer baseline of integrated gradients is the activation the model produces from zero embeddings, not a
zero activation). Attributions go to the hook point's output.

Components covered: those whose hook point carries a per-token activation of their own, with the batch axis first.

| component | hook point | covered | why not |
|---|---|---|---|
| x, z, B, C, dt | same name | yes | |
| conv1d | ``conv`` | yes | |
| norm (Mamba-2) | ``out_proj_in`` | yes | |
| out_proj | ``out`` | yes | |
| dt_norm (FalconMamba) | ``dt_low`` | yes | |
| A_log | ``A`` (ED, N) / (H,) | no | no batch axis: the decay is shared by every window and position |
| D | ``y`` | no | ``y`` is the whole scan output, not the D skip term's contribution |
| B_norm, C_norm (FalconMamba) | ``B``, ``C`` | no | they share the hook point with B and C |
| q, k, v (attention) | same name | yes | |
| o (attention) | ``attn_out`` | yes | |
| gate, up (MLP) | their rows of the projection's output | yes | |
| down (MLP) | ``mlp_out`` | yes | |
| router, experts, shared_experts (MoE) | ``moe_out`` | no | ``moe_out`` is the whole MoE's output, not theirs |

The MLP's ``down_in`` (``act(gate)·up``) belongs to both ``gate`` and ``up``, so they are attributed at the output
of their own rows of the up projection instead (``gate_proj`` / ``up_proj``, or their rows of the packed
``input_linear`` / ``gate_up_proj``): the pre-activation, before any µP multiplier or adapter.

Per (layer, component): ``abs_sum`` = mean over windows of the sum of ``|attribution|`` over positions and channels,
``sum`` = mean over windows of the signed sum.

Shape legend: B batch (windows), L sequence length, D model width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from captum.attr import LayerConductance, LayerGradientXActivation, LayerIntegratedGradients
from tqdm.auto import tqdm

from ..core.registry import Registry
from ..core.stats import grad_state, window_objective
from ..data import Windows
from ._common import resolve
from .options import BASELINES

__all__ = ["CAPTUM_METHODS", "captum_components", "captum_scores", "captum_target", "forward_embed_scale",
           "make_forward"]  # fmt: skip

CAPTUM_METHODS = {
    "grad_x_act": LayerGradientXActivation,
    "integrated_gradients": LayerIntegratedGradients,
    "conductance": LayerConductance,
}
_NOT_OWN_ACTIVATION = ("D",)  # its hook point y is the whole scan output
_PROJECTION_ROWS = ("gate", "up")  # MLP: attributed at their rows of the up projection's output (down_in is shared)
_SCALES_INPUTS_EMBEDS = ("granitemoehybrid",)
"""Families whose model forward multiplies ``inputs_embeds`` by the embedding multiplier too (checked in
transformers 5.24: Granite 4 scales after the lookup or on ``inputs_embeds``; Falcon-H1 scales only the lookup of
``input_ids``; the others have no multiplier)."""


def captum_components(registry: Registry) -> tuple[str, ...]:
    """Components with a per-token activation of their own (see the module table), in registry order."""
    shapes = {h.name: h.shape for h in registry.hooks}
    seen: set[str] = set()
    out = []
    for comp in registry.components:
        if comp.unit == "mlp" and comp.name in _PROJECTION_ROWS:
            out.append(comp.name)
            continue
        if comp.name in _NOT_OWN_ACTIVATION or comp.unit == "moe" or not shapes[comp.hook].startswith("(B, L"):
            continue
        if comp.hook in seen:
            continue
        seen.add(comp.hook)
        out.append(comp.name)
    return tuple(out)


def forward_embed_scale(registry: Registry) -> float:
    """The factor a forward from ``inputs_embeds`` must apply to the looked-up embeddings to compute what the
    model computes from ``input_ids``: ``Registry.embed_scale`` unless the model's forward applies it itself."""
    return 1.0 if registry.arch in _SCALES_INPUTS_EMBEDS else registry.embed_scale


def make_forward(module: torch.nn.Module, objective: str = "loss", embed_scale: float = 1.0):
    """``forward(embeds (B, L, D), ids (B, L), labels (B, L)) -> (B,)``: the objective of each window from its input
    embeddings
    (the embedding lookup of ``ids``, multiplied by ``embed_scale`` before the model's forward; see
    :func:`forward_embed_scale`)."""

    def forward(embeds: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if embed_scale != 1.0:
            embeds = embeds * embed_scale  # (B, L, D)
        logits = module(inputs_embeds=embeds, use_cache=False).logits  # (B, L, V)
        return window_objective(logits, ids, objective, labels)  # (B,)

    return forward


def captum_target(module: torch.nn.Module, registry: Registry, layer: int, name: str
                  ) -> tuple[torch.nn.Module, tuple[int, int] | None]:  # fmt: skip
    """The module whose output captum attributes to for component ``name`` of ``layer``, and the channel range of
    that output that is the component's (None: all): its hook point, or for the MLP's gate and up their projection
    module and rows."""
    comp = registry.component(name)
    if comp.unit == "mlp" and name in _PROJECTION_ROWS:
        (weight,) = registry.weights(name)
        owner = registry.owner(module, layer, name)
        return owner.get_submodule(weight.param.rsplit(".", 1)[0]), weight.rows
    return registry.hook_point(module, layer, comp.hook), None


def captum_scores(
    model,
    windows: Windows,
    method: str,
    targets: Sequence[tuple[int, str]],
    *,
    objective: str = "loss",
    n_steps: int = 16,
    internal_batch_size: int | None = None,
    batch_size: int = 8,
    baseline: str = "zeros",
    show_progress: bool = True,
) -> dict[tuple[int, str], tuple[float, float]]:
    """Attribute the objective to the hook points of ``targets`` with one captum layer method.

    ``grad_x_act`` handles every hook point in one forward/backward per batch of windows (captum's list of layers);
    ``integrated_gradients`` and ``conductance`` make one call per hook point and batch.

    Args:
        model: A ``LoadedModel`` or instrumented HF causal LM.
        windows: Calibration windows (n, L).
        method: A key of :data:`CAPTUM_METHODS`.
        targets: (layer, component) pairs, each component in :func:`captum_components`.
        objective: ``"loss"`` or ``"logprob"`` (see :func:`.gradients.window_objective`).
        n_steps: captum's interpolation steps (integrated gradients, conductance).
        internal_batch_size: captum's flag: sequences (windows x steps) per forward in integrated gradients and
            conductance; None evaluates all steps of a batch of windows at once.
        batch_size: Windows per captum call.
        baseline: ``"zeros"``: all-zero input embeddings.
        show_progress: Show a tqdm bar (captum's layer methods take no such flag themselves).

    Returns:
        (layer, component) -> (abs_sum, sum), each a mean over windows.
    """
    if method not in CAPTUM_METHODS:
        raise ValueError(f"unknown captum method {method!r}; allowed: {', '.join(CAPTUM_METHODS)}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; allowed: {', '.join(BASELINES)}")
    module, registry = resolve(model)
    covered = captum_components(registry)
    for _, name in targets:
        if name not in covered:
            raise ValueError(f"component {name!r} has no hook point to attribute to; allowed: {', '.join(covered)}")
    located = {t: captum_target(module, registry, *t) for t in targets}
    points = {t: point for t, (point, _) in located.items()}
    totals = {t: torch.zeros(2, dtype=torch.float64) for t in targets}  # (abs_sum, sum) summed over windows
    device = next(module.parameters()).device
    forward = make_forward(module, objective, forward_embed_scale(registry))
    starts = range(0, len(windows), batch_size)
    steps = len(starts) * (1 if method == "grad_x_act" else len(points))
    with grad_state(module), tqdm(total=steps, desc=method, disable=not show_progress, unit="call") as bar:
        for start in starts:
            ids = windows.ids[start : start + batch_size].to(device)  # (b, L)
            labels = ids if windows.labels is None else windows.labels[start : start + batch_size].to(device)  # (b, L)
            with torch.no_grad():
                embeds = module.get_input_embeddings()(ids)  # (b, L, D)
            if method == "grad_x_act":
                attrs = LayerGradientXActivation(forward, list(points.values())).attribute(
                    embeds, additional_forward_args=(ids, labels)
                )
                results = dict(zip(points, attrs))
                bar.update()
            else:
                results = {}
                for t, point in points.items():
                    results[t] = CAPTUM_METHODS[method](forward, point).attribute(
                        embeds,
                        baselines=torch.zeros_like(embeds),
                        additional_forward_args=(ids, labels),
                        n_steps=n_steps,
                        internal_batch_size=internal_batch_size,
                    )
                    bar.update()
            for t, attr in results.items():
                rows = located[t][1]
                if rows is not None:  # the component's channels of a packed projection's output
                    attr = attr[..., rows[0] : rows[1]]  # (b, L, F)
                flat = attr.detach().double().flatten(1)  # (b, ·)
                totals[t] += torch.stack([flat.abs().sum(), flat.sum()])
    return {t: (tot[0].item() / len(windows), tot[1].item() / len(windows)) for t, tot in totals.items()}

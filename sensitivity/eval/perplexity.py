"""Token-level perplexity and KL divergence between models, each returned with its definition."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.finite import NonFiniteError, check_loss
from ..core.instrumented import hf_forward, kernels_available
from ..core.loading import unwrap
from ..core.spec import Count, check
from ..data import Windows

__all__ = ["KLDivergence", "Perplexity", "definition", "kl_divergence", "perplexity", "streamed_perplexity"]


class _Result:
    """``to_dict`` for the result dataclasses."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Perplexity(_Result):
    """A perplexity with what it was measured on.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: Mean negative log-likelihood per scored token, in nats.
        tokens: Number of scored tokens (``windows * (seqlen - 1)``).
        windows: Number of windows.
        seqlen: Window length in tokens.
        definition: One sentence stating exactly what was computed.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    definition: str


@dataclass(frozen=True)
class KLDivergence(_Result):
    """Mean per-token ``KL(reference || model)`` of next-token distributions, in nats.

    Attributes:
        kl: Mean KL divergence per scored position, in nats.
        tokens: Number of scored positions (those :func:`perplexity` scores on the same windows).
        windows: Number of windows.
        seqlen: Window length in tokens.
        definition: One sentence stating exactly what was computed.
    """

    kl: float
    tokens: int
    windows: int
    seqlen: int
    definition: str


def _check(windows: Windows, batch_size: int) -> None:
    check(Count, batch_size, "batch_size")
    if len(windows) == 0:
        raise ValueError("no windows to evaluate")


def _batches(windows: Windows, batch_size: int, desc: str, show_progress: bool):
    ids = windows.ids  # (n, L)
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not show_progress, unit="batch"):
        yield ids[start : start + batch_size]  # (b, L)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits; on CUDA with mamba-ssm and causal-conv1d installed, through their kernels (no hooks)."""
    device = next(model.parameters()).device
    with hf_forward(model) if kernels_available(device) else contextlib.nullcontext():
        return model(input_ids=ids.to(device), use_cache=False).logits.float()  # (b, L, V)


def _scored(windows: Windows) -> str:
    L = windows.seqlen
    if windows.labels is not None:
        n = int((windows.targets() != -100).sum())
        return f"{windows.describe()}; only the labelled answer tokens are scored ({n} in total)"
    return (
        f"{windows.describe()}; within each window the first token is context only, so {L - 1} next-token "
        f"predictions are scored per window ({len(windows) * (L - 1)} in total)"
    )


def definition(windows: Windows) -> str:
    """What :func:`perplexity` measures on ``windows``, in one sentence (window length, stride, split, counts)."""
    return f"token-level perplexity exp(mean next-token NLL, nats) over {_scored(windows)}"


@torch.no_grad()
def perplexity(model, windows: Windows, *, batch_size: int = 8, show_progress: bool = True) -> Perplexity:
    """Token-level perplexity ``exp(mean NLL)`` over non-overlapping windows.

    Every token of the evaluated text is predicted at most once: windows do not overlap (stride = window length),
    and the first token of each window is only context, so ``seqlen - 1`` tokens are scored per window.

    Args:
        model: A ``LoadedModel`` or a HF causal LM.
        windows: Evaluation windows ``(n, L)``, e.g. from :func:`sensitivity.data.eval_windows`.
        batch_size: Windows per forward pass.
        show_progress: Show a tqdm bar.

    Returns:
        A :class:`Perplexity` whose ``definition`` states window length, stride, split and source.

    Examples:
        >>> ppl = perplexity(lm, eval_windows(load_corpus("sample"), lm.tokenizer, seqlen=256))
        >>> ppl.perplexity, ppl.definition
    """
    _check(windows, batch_size)
    module = unwrap(model)
    total, count = 0.0, 0
    targets = windows.targets()  # (n, L-1), -100 where not scored
    for start, ids in enumerate(_batches(windows, batch_size, "perplexity", show_progress)):
        logits = _logits(module, ids)[:, :-1]  # (b, L-1, V)
        target = targets[start * batch_size : start * batch_size + len(ids)].to(logits.device)  # (b, L-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum",
                               ignore_index=-100).item()  # fmt: skip
        check_loss(module, loss, ids.to(logits.device), "the loss")
        total += loss
        count += int((target != -100).sum())
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(windows), windows.seqlen, definition(windows))


@torch.no_grad()
def streamed_perplexity(path, windows: Windows, *, batch_size: int = 8, show_progress: bool = True) -> Perplexity:
    """:func:`perplexity` of a checkpoint larger than memory, read one block at a time.

    The residual stream of every window is kept (``n x L x D`` floats: 8 MB for 8 windows of 128 tokens at width
    2048) while the blocks pass through memory one after the other; the numbers are :func:`perplexity`'s on the
    loaded model (to float32 round-off: the model's forward and the block-by-block one sum alike).

    Args:
        path: A local safetensors checkpoint, or a :class:`~sensitivity.core.streamed.StreamedCheckpoint` of one.
        windows: Evaluation windows ``(n, L)``.
        batch_size: Windows per forward.
        show_progress: Show a tqdm bar over the blocks.

    Returns:
        A :class:`Perplexity`.
    """
    from ..core.runner import LayerRunner
    from ..core.streamed import StreamedCheckpoint

    _check(windows, batch_size)
    ckpt = path if isinstance(path, StreamedCheckpoint) else StreamedCheckpoint(path)
    run = LayerRunner(ckpt.lm, windows, batch_size)
    hidden = [run.embed(b) for b in run.batches]  # (B, L, D) each
    for layer in tqdm(range(ckpt.lm.registry.n_layers), desc="perplexity (streamed)", disable=not show_progress):
        with ckpt.block(layer):
            hidden = [run.run(h, layer, layer + 1, rows=b) for h, b in zip(hidden, run.batches)]
    total, count = 0.0, 0
    for h, b in zip(hidden, run.batches):
        for nll, _, n in run.terms(h, b):
            total, count = total + nll, count + n
    if not math.isfinite(total):
        raise NonFiniteError(f"the loss of {ckpt.path} is {total} (streamed: load the model to find where it "
                             "first went non-finite)")  # fmt: skip
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(windows), windows.seqlen, definition(windows))


@torch.no_grad()
def kl_divergence(
    model, reference, windows: Windows, *, batch_size: int = 8, show_progress: bool = True
) -> KLDivergence:
    """Mean per-token ``KL(reference || model)`` of next-token distributions on the same windows.

    The positions are those scored by :func:`perplexity` (all but the last of each window).

    Args:
        model: The model under test (e.g. pruned); ``LoadedModel`` or HF causal LM.
        reference: The reference (e.g. dense) model with the same vocabulary.
        windows: Evaluation windows ``(n, L)``.
        batch_size: Windows per forward pass.
        show_progress: Show a tqdm bar.

    Returns:
        A :class:`KLDivergence` in nats per token.
    """
    _check(windows, batch_size)
    mod, ref = unwrap(model), unwrap(reference)
    total, count = 0.0, 0
    targets = windows.targets()  # (n, L-1)
    for start, ids in enumerate(_batches(windows, batch_size, "kl", show_progress)):
        logp = F.log_softmax(_logits(mod, ids)[:, :-1], dim=-1)  # (b, L-1, V)
        logq = F.log_softmax(_logits(ref, ids)[:, :-1], dim=-1).to(logp.device)  # (b, L-1, V)
        if logp.shape != logq.shape:
            raise ValueError(f"vocabularies differ: model gives {logp.shape[-1]} logits, reference {logq.shape[-1]}")
        mask = targets[start * batch_size : start * batch_size + len(ids)].to(logp.device) != -100  # (b, L-1)
        total += F.kl_div(logp[mask], logq[mask], log_target=True, reduction="sum").item()
        count += int(mask.sum())
    definition = f"mean per-token KL(reference || model) of next-token distributions, nats, over {_scored(windows)}"
    return KLDivergence(total / count, count, len(windows), windows.seqlen, definition)

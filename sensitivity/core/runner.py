"""The layer runner: a causal LM run block by block on fixed windows.

Probe sweeps, the explainer and sequential WANDA all need the same things: the residual stream entering every
layer, the rest of the model run from a cached residual, the next-token loss (and KL to a reference) at the end,
and the activations at hook points of one layer. :class:`LayerRunner` is that, once.

Losses are over the positions :func:`sensitivity.eval.perplexity` scores (every position but the last of each
window predicts the next token). Log-probabilities are computed in pieces of ``piece_windows`` windows so the
(b, L, V) float32 buffers stay small (by default as many windows as fit in 16 MB, below glibc's mmap threshold, so
the buffers are reused instead of page-faulted in afresh).

Shape legend: B batch (windows), L sequence length, D model width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..data import Windows
from .hooks import capture, hook_name
from .loading import LoadedModel

__all__ = ["LayerRunner"]

PIECE_BYTES = 16 << 20


class LayerRunner:
    """Block-by-block forwards of one model on fixed windows.

    Args:
        lm: The model (instrumented when :meth:`capture` is used).
        windows: The token windows (n, L) everything runs on.
        batch_size: Windows per forward.
        piece_windows: Windows per log-softmax piece; None = as many as fit in 16 MB of float32 log-probs.

    Example:
        >>> run = LayerRunner(lm, windows)
        >>> stream = run.stream()                   # n_layers + 1 tensors (n, L, D)
        >>> nll, _ = run.loss(stream[3], start=3)  # the dense loss again, from layer 3 on
    """

    def __init__(self, lm: LoadedModel, windows: Windows, batch_size: int = 8, piece_windows: int | None = None):
        self.lm, self.model, self.registry = lm, lm.model, lm.registry
        self.blocks = self.registry.blocks(self.model)
        self.batch_size = batch_size
        self.ids = windows.ids.to(lm.device)  # (n, L)
        self.targets = self.ids[:, 1:]  # (n, L-1)
        self.batches = [slice(i, i + batch_size) for i in range(0, len(windows), batch_size)]
        per_window = self.ids.shape[1] * self.model.config.vocab_size * 4
        self.piece_windows = piece_windows or max(1, PIECE_BYTES // per_window)

    def embed(self, b: slice) -> torch.Tensor:
        """Input embeddings of the windows of batch ``b``. (B, L, D)."""
        return self.model.get_input_embeddings()(self.ids[b])

    def run(self, hidden: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """Blocks ``start..stop-1`` (default: to the last) on the residual stream entering ``start``.
        (B, L, D) -> (B, L, D)."""
        for block in self.blocks[start:stop]:
            hidden = block(hidden, cache=None, attention_mask=None)  # (B, L, D)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the last hidden state, in float32. (B, L, D) -> (B, L, V)."""
        head = self.model.get_output_embeddings()
        hidden = self.registry.final_norm(self.model)(hidden)  # (B, L, D)
        return head(hidden.to(head.weight.dtype)).float()

    def pieces(self, hidden: torch.Tensor, b: slice) -> Iterator[tuple[torch.Tensor, slice]]:
        """Split batch ``b``'s hidden states into pieces of ``piece_windows`` windows: (piece, window rows)."""
        step = self.piece_windows
        for i in range(0, hidden.shape[0], step):
            piece = hidden[i : i + step]
            yield piece, slice(b.start + i, b.start + i + piece.shape[0])

    @torch.no_grad()
    def stream(self) -> list[torch.Tensor]:
        """The residual stream entering each layer, then the last hidden state: ``n_layers + 1`` of (n, L, D)."""
        resid = [[] for _ in range(len(self.blocks) + 1)]
        for b in self.batches:
            hidden = self.embed(b)  # (B, L, D)
            for layer, block in enumerate(self.blocks):
                resid[layer].append(hidden)
                hidden = block(hidden, cache=None, attention_mask=None)
            resid[-1].append(hidden)
        return [torch.cat(r) for r in resid]

    @torch.no_grad()
    def logprobs(self, last: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities from the last hidden state (n, L, D). (n, L-1, V)."""
        return torch.cat([F.log_softmax(self.logits(piece)[:, :-1], dim=-1)
                          for b in self.batches for piece, _ in self.pieces(last[b], b)])  # fmt: skip

    @torch.no_grad()
    def loss(self, hidden: torch.Tensor, start: int, reference: torch.Tensor | None = None) -> tuple[float, float]:
        """Mean next-token NLL (nats/token) from the residual stream (n, L, D) entering layer ``start``
        (``n_layers``: the last hidden state), and the mean per-token ``KL(reference || model)`` against
        ``reference`` log-probabilities (n, L-1, V) (NaN without one)."""
        nll_sum, kl_sum, count = 0.0, 0.0, 0
        for b in self.batches:
            for nll, kl, n in self.terms(self.run(hidden[b], start), b, reference):
                nll_sum, kl_sum, count = nll_sum + nll, kl_sum + kl, count + n
        return nll_sum / count, (kl_sum / count if reference is not None else float("nan"))

    def terms(self, out: torch.Tensor, b: slice, reference: torch.Tensor | None = None,
              logits: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[tuple[float, float, int]]:
        """Per piece of batch ``b``: ``(NLL sum, KL sum, positions)`` from its last hidden states ``out`` (B, L, D),
        or, with ``logits``, from whatever ``logits`` turns into (B, L, V) logits (``torch.Tensor.float`` for the
        logits of a full forward)."""
        to_logits = logits or self.logits
        for piece, rows in self.pieces(out, b):
            logp = F.log_softmax(to_logits(piece)[:, :-1], dim=-1)  # (b, L-1, V)
            nll = -logp.gather(-1, self.targets[rows][..., None]).sum().item()
            kl = 0.0 if reference is None else F.kl_div(logp, reference[rows], log_target=True, reduction="sum").item()
            yield nll, kl, self.targets[rows].numel()

    @torch.no_grad()
    def capture(self, layer: int, points: Iterable[str], hidden: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Run block ``layer`` on the residual stream ``hidden`` (m, L, D) entering it, ``batch_size`` windows at a
        time, and record the activations at its hook ``points``: point -> one tensor per batch."""
        names = {p: hook_name(layer, p) for p in points}
        with capture(self.lm, names.values()) as acts:
            for i in range(0, hidden.shape[0], self.batch_size):
                self.blocks[layer](hidden[i : i + self.batch_size], cache=None, attention_mask=None)
        return {p: acts[n] for p, n in names.items()}

"""The layer runner: a causal LM run block by block on fixed windows.

Probe sweeps, the explainer and sequential WANDA all need the same things: the residual stream entering every
layer, the rest of the model run from a cached residual, the next-token loss (and KL to a reference) at the end,
and the activations at hook points of one layer. :class:`LayerRunner` is that, once.

Losses are over the positions :func:`sensitivity.eval.perplexity` scores (every position but the last of each
window predicts the next token; windows with ``labels``, a task's, score only their labelled positions).
Log-probabilities are computed in pieces of ``piece_windows`` windows so the (b, L, V) float32 buffers stay small
(by default as many windows as fit in 16 MB, below glibc's mmap threshold, so the buffers are reused instead of
page-faulted in afresh).

Shape legend: B batch (windows), L sequence length, D model width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from ..data import Windows
from .hooks import capture, hook_name
from .loading import LoadedModel

__all__ = ["BlockCaller", "LayerRunner"]

PIECE_BYTES = 16 << 20


class BlockCaller:
    """Calls one block of a model on the residual stream entering it, as the model's own forward would (no cache,
    no padding): pure SSM blocks take only the hidden states; hybrid blocks also get the positions, the causal mask
    of their attention (None under SDPA, which masks causally itself) and the rotary ``(cos, sin)``, under the
    keyword names of ``registry.block_args``; the blocks of ``registry.embeds_layers`` (Zamba2's hybrid layers) also
    read the model's input embeddings, which the caller passes as ``embeds``.

    Examples:
        >>> call = BlockCaller(lm.model, lm.registry)
        >>> embeds = lm.model.get_input_embeddings()(ids) * lm.registry.embed_scale  # (B, L, D)
        >>> hidden = call(0, embeds, embeds)  # (B, L, D)
    """

    def __init__(self, model: nn.Module, registry) -> None:
        self.model, self.registry = model, registry
        self.blocks = registry.blocks(model)
        self.rotary = registry.rotary(model)
        self._extras: tuple | None = None

    def extras(self, hidden: torch.Tensor) -> dict:
        """The keyword arguments of the attention blocks for hidden states shaped like ``hidden`` (cached)."""
        key = (hidden.shape[0], hidden.shape[1], hidden.dtype, hidden.device)
        if self._extras is None or self._extras[0] != key:
            pos = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, L)
            mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                      position_ids=pos)  # fmt: skip
            kwargs = {"position_ids": pos, "attention_mask": mask}
            if self.rotary is not None:
                kwargs["position_embeddings"] = self.rotary(hidden, pos)
            self._extras = (key, kwargs)
        return self._extras[1]

    def __call__(self, layer: int, hidden: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``layer`` on ``hidden`` (B, L, D) -> (B, L, D). ``embeds`` (B, L, D): the input embeddings of the
        same windows (what enters the first block), needed by the layers of ``registry.embeds_layers`` only.

        Raises:
            ValueError: If ``layer`` reads the input embeddings and ``embeds`` is None.
        """
        block = self.blocks[layer]
        if not self.registry.is_hybrid:
            return block(hidden, cache=None, attention_mask=None)
        kwargs, names = dict(self.extras(hidden)), self.registry.block_args
        mask = kwargs.pop("attention_mask")
        kwargs[names.get("mask", "attention_mask")] = mask if "attention" in self.registry.units[layer] else None
        if "layer" in names:
            kwargs[names["layer"]] = layer
        if layer in self.registry.embeds_layers:
            if embeds is None:
                raise ValueError(f"layer {layer} of this {self.registry.arch} model reads the input embeddings as "
                                 "well as the residual stream: pass them (embeds=, or rows= to LayerRunner.run and "
                                 "LayerRunner.capture)")  # fmt: skip
            kwargs[names["embeds"]] = embeds
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class LayerRunner:
    """Block-by-block forwards of one model on fixed windows.

    Args:
        lm: The model (instrumented when :meth:`capture` is used).
        windows: The token windows (n, L) everything runs on.
        batch_size: Windows per forward.
        piece_windows: Windows per log-softmax piece; None = as many as fit in 16 MB of float32 log-probs.

    Attributes:
        lm: The model, as given.
        model: Its HF causal LM (``lm.model``).
        registry: Its registry (``lm.registry``).
        blocks: The model's blocks, in order.
        call: The :class:`BlockCaller` that runs one block.
        batch_size: Windows per forward.
        ids: The windows' token ids on the model's device, (n, L).
        targets: Next-token targets, (n, L-1); -100 at positions not scored (a task's context).
        scored: Mask of the scored positions, (n, L-1), for windows with ``labels``; None when every position is.
        batches: Slices of ``batch_size`` windows covering all windows, in order.
        piece_windows: Windows per log-softmax piece (resolved from the argument).

    Examples:
        >>> run = LayerRunner(lm, windows)
        >>> stream = run.stream()                   # n_layers + 1 tensors (n, L, D)
        >>> nll, _ = run.loss(stream[3], start=3)  # the dense loss again, from layer 3 on
    """

    def __init__(self, lm: LoadedModel, windows: Windows, batch_size: int = 8, piece_windows: int | None = None):
        self.lm, self.model, self.registry = lm, lm.model, lm.registry
        self.blocks = self.registry.blocks(self.model)
        self.call = BlockCaller(self.model, self.registry)
        self.batch_size = batch_size
        self.ids = windows.ids.to(lm.device)  # (n, L)
        self.targets = windows.targets().to(lm.device)  # (n, L-1), -100 where not scored (a task's context)
        self.scored = None if windows.labels is None else self.targets != -100  # (n, L-1)
        self.batches = [slice(i, i + batch_size) for i in range(0, len(windows), batch_size)]
        per_window = self.ids.shape[1] * self.model.config.vocab_size * 4
        self.piece_windows = piece_windows or max(1, PIECE_BYTES // per_window)

    def embed(self, b: slice | torch.Tensor) -> torch.Tensor:
        """Input embeddings of the windows of batch ``b`` (a slice or window indices). (B, L, D)."""
        embeds = self.model.get_input_embeddings()(self.ids[b])  # (B, L, D)
        return embeds * self.registry.embed_scale if self.registry.embed_scale != 1.0 else embeds

    def run(
        self, hidden: torch.Tensor, start: int, stop: int | None = None, rows: slice | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Blocks ``start..stop-1`` (default: to the last) on the residual stream entering ``start``.
        (B, L, D) -> (B, L, D). ``rows``: the windows ``hidden`` holds (a batch slice or window indices), needed
        only when one of those blocks reads the input embeddings (Zamba2's hybrid layers)."""
        layers = range(start, len(self.blocks) if stop is None else stop)
        embeds = self._embeds(rows, layers)
        for layer in layers:
            hidden = self.call(layer, hidden, embeds)  # (B, L, D)
        return hidden

    def _embeds(self, rows: slice | torch.Tensor | None, layers: Iterable[int]) -> torch.Tensor | None:
        """The input embeddings of windows ``rows`` if one of ``layers`` reads them, else None. (B, L, D)."""
        if rows is None or not set(layers) & set(self.registry.embeds_layers):
            return None
        return self.embed(rows)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the last hidden state, in float32. (B, L, D) -> (B, L, V)."""
        head = self.model.get_output_embeddings()
        hidden = self.registry.final_norm(self.model)(hidden)  # (B, L, D)
        logits = head(hidden.to(head.weight.dtype)).float()  # (B, L, V)
        return logits * self.registry.logit_scale if self.registry.logit_scale != 1.0 else logits

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
            hidden = embeds = self.embed(b)  # (B, L, D)
            for layer in range(len(self.blocks)):
                resid[layer].append(hidden)
                hidden = self.call(layer, hidden, embeds)
            resid[-1].append(hidden)
        return [torch.cat(r) for r in resid]

    @torch.no_grad()
    def logprobs(self, last: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities from the last hidden state (n, L, D). (n, L-1, V)."""
        return torch.cat([F.log_softmax(self.logits(piece)[:, :-1], dim=-1)
                          for b in self.batches for piece, _ in self.pieces(last[b], b)])  # fmt: skip

    def mean_nll(self, logp: torch.Tensor) -> float:
        """Mean NLL (nats/token) over the scored positions of log-probabilities ``logp`` (n, L-1, V)."""
        token = logp.gather(-1, self.targets.clamp(min=0)[..., None])[..., 0]  # (n, L-1)
        return -(token.mean() if self.scored is None else token[self.scored].mean()).item()

    @torch.no_grad()
    def loss(self, hidden: torch.Tensor, start: int, reference: torch.Tensor | None = None) -> tuple[float, float]:
        """Mean next-token NLL (nats/token) from the residual stream (n, L, D) entering layer ``start``
        (``n_layers``: the last hidden state), and the mean per-token ``KL(reference || model)`` against
        ``reference`` log-probabilities (n, L-1, V) (NaN without one)."""
        nll_sum, kl_sum, count = 0.0, 0.0, 0
        for b in self.batches:
            for nll, kl, n in self.terms(self.run(hidden[b], start, rows=b), b, reference):
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
            if self.scored is None:  # every next token
                nll = -logp.gather(-1, self.targets[rows][..., None]).sum().item()
                kl = 0.0 if reference is None else F.kl_div(logp, reference[rows], log_target=True,
                                                            reduction="sum").item()  # fmt: skip
                yield nll, kl, self.targets[rows].numel()
                continue
            mask = self.scored[rows]  # (b, L-1)
            nll = -logp.gather(-1, self.targets[rows].clamp(min=0)[..., None])[..., 0][mask].sum().item()
            kl = 0.0 if reference is None else F.kl_div(logp[mask], reference[rows][mask], log_target=True,
                                                        reduction="sum").item()  # fmt: skip
            yield nll, kl, int(mask.sum())

    @torch.no_grad()
    def capture(
        self, layer: int, points: Iterable[str], hidden: torch.Tensor, rows: slice | torch.Tensor | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """Run block ``layer`` on the residual stream ``hidden`` (m, L, D) entering it, ``batch_size`` windows at a
        time, and record the activations at its hook ``points``: point -> one tensor per batch. ``rows``: the
        windows ``hidden`` holds, as for :meth:`run`."""
        names = {p: hook_name(layer, p) for p in points}
        index = None if rows is None else torch.arange(len(self.ids), device=self.ids.device)[rows]  # (m,)
        with capture(self.lm, names.values()) as acts:
            for i in range(0, hidden.shape[0], self.batch_size):
                part = slice(i, i + self.batch_size)
                self.call(layer, hidden[part], self._embeds(None if index is None else index[part], (layer,)))
        return {p: acts[n] for p, n in names.items()}

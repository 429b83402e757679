"""Token streams and fixed-length token windows for evaluation and calibration."""

from __future__ import annotations

import hashlib
import logging
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from sensitivity.core.spec import MAX_COUNT
from sensitivity.data.corpus import Corpus

logger = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 16
"""Documents longer than this many characters are tokenized in pieces."""

_CACHE_SIZE = 8
_cache: OrderedDict[tuple[Any, ...], tuple[weakref.ref[Any], torch.Tensor]] = OrderedDict()
# A piece ends at a non-space character followed by a paragraph break, else by
# any whitespace: byte-level BPE pre-tokenizers always split there.
_PIECE_ENDS = (re.compile(r"\S(?=\n[ \t]*\n)"), re.compile(r"\S(?=\s)"))


@dataclass(frozen=True, eq=False)
class Windows:
    """A batch of equal-length token windows.

    Attributes:
        ids: Token ids, shape (n, seqlen), dtype int64.
        seqlen: Tokens per window.
        split: Corpus split the windows come from.
        source: Name of the corpus the windows come from.
        kind: ``"eval"`` (consecutive, non-overlapping) or ``"calibration"``
            (random offsets).
        seed: Random seed for calibration windows, ``None`` for eval windows.
        stride: Distance between window starts (``seqlen`` for eval windows,
            ``0`` for calibration windows, whose starts are random).
        labels: Optional (n, seqlen) int64 targets in Hugging Face's convention: the logits at position ``t - 1``
            are scored on ``labels[:, t]``, and positions labelled ``-100`` are not scored. ``None`` scores every
            next token (``labels == ids``). Task and recall objectives score only their answer tokens.
        note: What the windows hold when they are not plain text (a task's items); shown by :meth:`describe`.
    """

    ids: torch.Tensor
    seqlen: int
    split: str
    source: str
    kind: str
    seed: int | None
    stride: int
    labels: torch.Tensor | None = None
    note: str = ""

    def __post_init__(self) -> None:
        """Check that ``ids`` is an int64 (n, seqlen) tensor and ``kind`` is known."""
        if self.ids.dim() != 2 or self.ids.shape[1] != self.seqlen or self.ids.dtype != torch.long:
            raise ValueError(
                f"ids must be an int64 tensor of shape (n, {self.seqlen}), got {self.ids.dtype} {tuple(self.ids.shape)}"
            )
        if self.kind not in ("eval", "calibration"):
            raise ValueError(f"kind={self.kind!r} is invalid; allowed: 'eval', 'calibration'")
        if self.ids.shape[0] == 0:
            raise ValueError("no windows: need at least 1")
        if self.seqlen < 2:
            raise ValueError(f"windows of {self.seqlen} token(s) have no next token to predict; need seqlen >= 2")
        if self.labels is not None:
            if self.labels.shape != self.ids.shape or self.labels.dtype != torch.long:
                raise ValueError(f"labels must be an int64 tensor shaped like ids {tuple(self.ids.shape)}, got "
                                 f"{self.labels.dtype} {tuple(self.labels.shape)}")  # fmt: skip
            if not bool((self.labels[:, 1:] != -100).any()):
                raise ValueError("labels score no position: every label after the first is -100")

    def targets(self) -> torch.Tensor:
        """The scored next tokens, (n, seqlen - 1): ``labels[:, 1:]`` (or ``ids[:, 1:]``), -100 where not scored."""
        return (self.ids if self.labels is None else self.labels)[:, 1:]

    def __len__(self) -> int:
        """Number of windows ``n``."""
        return self.ids.shape[0]

    def sha256(self) -> str:
        """Hex SHA-256 of the token ids, and of the labels when there are some (identifies the windows)."""
        digest = hashlib.sha256(self.ids.numpy().tobytes())
        if self.labels is not None:
            digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        """One-line human description of the windows."""
        if self.note:
            return f"{self.note} ({self.seqlen} tokens each, from split {self.split!r} of {self.source})"
        n = len(self)
        plural = "s" if n != 1 else ""
        if self.kind == "eval":
            what = f"{n} non-overlapping window{plural} of {self.seqlen} tokens (stride {self.stride})"
        else:
            what = f"{n} random calibration window{plural} of {self.seqlen} tokens (seed {self.seed})"
        return f"{what} from split {self.split!r} of {self.source}"


def tokenize_split(corpus: Corpus, tokenizer: Any, split: str) -> torch.Tensor:
    """Encode all documents of a split into one token stream.

    Documents are encoded without special tokens and joined with the
    tokenizer's eos token id (if it has one). Long documents are encoded in
    pieces cut between a non-space and a space character, which gives the
    same ids as encoding them whole for byte-level BPE tokenizers (GPT-2 /
    GPT-NeoX pre-tokenization always splits there). Results are cached per
    process, keyed on the documents' content and the tokenizer object.

    Args:
        corpus: Corpus to read.
        tokenizer: A Hugging Face tokenizer.
        split: Split name.

    Returns:
        Token ids, shape (T,), dtype int64 (a fresh tensor the caller may modify).

    Raises:
        ValueError: If the split does not exist.
    """
    docs = corpus.documents(split)
    key = (_fingerprint(docs), id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    hit = _cache.get(key)
    if hit is not None and hit[0]() is tokenizer:
        _cache.move_to_end(key)
        return hit[1].clone()  # (T,)
    stream = _encode_documents(docs, tokenizer)  # (T,)
    _cache[key] = (weakref.ref(tokenizer), stream)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    logger.info("tokenized split %r of %s: %d documents -> %d tokens", split, corpus.name, len(docs), stream.numel())
    return stream.clone()  # (T,)


def eval_windows(
    corpus: Corpus,
    tokenizer: Any,
    seqlen: int,
    *,
    split: str | None = None,
    max_windows: int | None = None,
) -> Windows:
    """Cut the held-out token stream into consecutive non-overlapping windows.

    Window ``k`` is ``stream[k * seqlen : (k + 1) * seqlen]``; the incomplete
    tail is dropped.

    Args:
        corpus: Corpus to read.
        tokenizer: A Hugging Face tokenizer.
        seqlen: Tokens per window, >= 2.
        split: Split to use; defaults to ``corpus.heldout_split``.
        max_windows: Keep only the first K windows (K >= 1); all if ``None``.

    Returns:
        Eval windows with ``ids`` of shape (n, seqlen).

    Raises:
        ValueError: For invalid arguments or a split shorter than one window.
    """
    _check(seqlen=seqlen, max_windows=max_windows)
    split = corpus.heldout_split if split is None else split
    stream = tokenize_split(corpus, tokenizer, split)  # (T,)
    _check_length(stream, seqlen, split, corpus)
    n = stream.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    ids = stream[: n * seqlen].reshape(n, seqlen).clone()  # (n, seqlen)
    windows = Windows(ids=ids, seqlen=seqlen, split=split, source=corpus.name, kind="eval", seed=None, stride=seqlen)
    logger.info("%s", windows.describe())
    return windows


MAX_CALIBRATION_TOKENS = MAX_COUNT
"""The most tokens of calibration windows drawn (67M: 512 MB of int64 ids; WANDA and SparseGPT calibrate on 128 x
2048 = 262,144)."""


def calibration_windows(
    corpus: Corpus,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    *,
    seed: int = 0,
    split: str = "train",
) -> Windows:
    """Draw calibration windows at random offsets of a split's token stream.

    Start offsets are drawn uniformly from ``[0, T - seqlen]`` with
    ``torch.Generator().manual_seed(seed)`` (as in WANDA's C4 loader), so the
    same seed gives the same windows.

    Args:
        corpus: Corpus to read.
        tokenizer: A Hugging Face tokenizer.
        nsamples: Number of windows, >= 1.
        seqlen: Tokens per window, >= 2.
        seed: Random seed.
        split: Split to draw from.

    Returns:
        Calibration windows with ``ids`` of shape (nsamples, seqlen).

    Raises:
        ValueError: For invalid arguments, more than :data:`MAX_CALIBRATION_TOKENS` tokens asked for, or a split
            shorter than one window.
    """
    _check(seqlen=seqlen, nsamples=nsamples, seed=seed)
    if nsamples * seqlen > MAX_CALIBRATION_TOKENS:  # before the corpus is tokenized: the ids alone would not fit
        raise ValueError(f"{nsamples} calibration windows of {seqlen} tokens are {nsamples * seqlen:,} tokens; at most "
                         f"{MAX_CALIBRATION_TOKENS:,} tokens of calibration windows (windows x seqlen) are drawn")
    stream = tokenize_split(corpus, tokenizer, split)  # (T,)
    _check_length(stream, seqlen, split, corpus)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=generator)  # (nsamples,)
    offsets = starts[:, None] + torch.arange(seqlen)[None, :]  # (nsamples, seqlen)
    ids = stream[offsets]  # (nsamples, seqlen)
    windows = Windows(ids=ids, seqlen=seqlen, split=split, source=corpus.name, kind="calibration", seed=seed, stride=0)
    logger.info("%s", windows.describe())
    return windows


def _check(**values) -> None:
    """The arguments against the shared field types (one rule each, in :mod:`sensitivity.core.spec`, which imports
    nothing of the package: imported here when called, as ``core`` itself imports ``data``)."""
    from ..core.spec import Count, Int, Seqlen, check

    kinds = {"seqlen": Seqlen, "nsamples": Count, "max_windows": Count | None, "seed": Int}
    for name, value in values.items():
        check(kinds[name], value, name, strict=True)


def _check_length(stream: torch.Tensor, seqlen: int, split: str, corpus: Corpus) -> None:
    """Raise ValueError if ``stream`` (T,) is shorter than one window."""
    if stream.numel() < seqlen:
        raise ValueError(
            f"split {split!r} of {corpus.name} has {stream.numel()} tokens, fewer than one window of "
            f"{seqlen}; use a smaller seqlen or more text"
        )


def _fingerprint(docs: tuple[str, ...]) -> str:
    """Content hash of a tuple of documents."""
    digest = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _pieces(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters, each ending before whitespace."""
    pieces = []
    start = 0
    while len(text) - start > size:
        # Prefer a paragraph break within the next `size` characters, else any whitespace.
        match = _PIECE_ENDS[0].search(text, start + size - 1, start + 2 * size) or _PIECE_ENDS[1].search(
            text, start + size - 1
        )
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


def _encode_documents(docs: tuple[str, ...], tokenizer: Any) -> torch.Tensor:
    """Encode documents (in pieces) and join them with eos; returns shape (T,)."""
    eos = tokenizer.eos_token_id
    parts: list[torch.Tensor] = []
    for i, doc in enumerate(docs):
        if i and eos is not None:
            parts.append(torch.tensor([eos], dtype=torch.long))  # (1,)
        pieces = _pieces(doc, CHUNK_CHARS)
        encoded = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
        parts.extend(torch.tensor(ids, dtype=torch.long) for ids in encoded)  # (t_i,)
    if not parts:
        return torch.zeros(0, dtype=torch.long)  # (0,)
    return torch.cat(parts)  # (T,)

"""Multi-query associative recall (MQAR) in a model's own vocabulary.

An item is ``eos k1 v1 k2 v2 ... kP vP [gap] q1 a1 q2 a2 ... qP aP``: ``P`` key-value pairs of single tokens, an
optional gap of real text from the corpus, then every key once more in a random order, each followed by its value
(teacher-forced, as in Zoology's MQAR, Arora et al. 2023). The model is scored at each query key on the value that
follows it; the query distance is the number of tokens from the pair's value in the context to the query key.

Keys and values are whole-word tokens of the tokenizer (a space then 3+ lowercase letters; for a vocabulary with
fewer than 64 of those, a byte-level one, its single ASCII letters and digits), drawn by a seeded permutation
into two disjoint pools of :data:`POOL_SIZE` tokens, so a key never doubles as a value. Everything is a
deterministic function of ``(tokenizer, n_pairs, gap, n_items, seed, split)``. Chance level is
``1 / len(values pool)`` for a model that knows the answer is a value, and ``1 / vocab`` for one that does not.

Shape legend: N items, L tokens per item, P pairs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from .objective import check_recall_size
from .windows import Windows

__all__ = ["POOL_SIZE", "RecallItems", "recall_items", "recall_pools"]

_WORD = re.compile(r"^ [a-z]{3,}$")
POOL_SIZE = 256
"""Tokens in each of the key and value pools (fewer when the vocabulary has fewer candidates)."""
IGNORE = -100
"""Label of positions that are not scored (HF convention)."""


@dataclass(frozen=True, eq=False)
class RecallItems:
    """A batch of recall items, all of the same length.

    Attributes:
        ids: Token ids (N, L).
        labels: (N, L): the value token at each answer position, :data:`IGNORE` elsewhere (HF's labels: the logits
            at position ``t - 1`` predict ``labels[:, t]``).
        query_pos: (N, P) position of each query key (its logits predict the answer).
        answers: (N, P) the value token each query asks for.
        distance: (N, P) tokens from the pair's value in the context to the query key.
        n_pairs: Pairs per item.
        gap: Tokens of filler text between the context and the queries.
        seed: Seed of the items.
        split: Corpus split the filler text comes from.
        n_values: Size of the value pool (chance level is ``1 / n_values``).
    """

    ids: torch.Tensor
    labels: torch.Tensor
    query_pos: torch.Tensor
    answers: torch.Tensor
    distance: torch.Tensor
    n_pairs: int
    gap: int
    seed: int
    split: str
    n_values: int

    def windows(self, source: str = "recall") -> Windows:
        """The items as :class:`Windows` whose labels score the answers only."""
        return Windows(ids=self.ids, seqlen=self.ids.shape[1], split=self.split, source=source, kind="eval",
                       seed=self.seed, stride=0, labels=self.labels,
                       note=f"{len(self.ids)} recall items of {self.n_pairs} pairs, gap {self.gap}")  # fmt: skip

    def sha256(self) -> str:
        """Hex SHA-256 of ids and labels (identifies the items in manifests)."""
        digest = hashlib.sha256(self.ids.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()


@lru_cache(maxsize=8)
def _pools_cached(vocab: tuple[str, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    words = [i for i, text in enumerate(vocab) if _WORD.match(text)]
    if len(words) < 64:  # a byte-level or character vocabulary: its letters and digits
        words = [i for i, text in enumerate(vocab) if len(text) == 1 and text.isalnum() and text.isascii()]
    if len(words) < 8:
        raise ValueError(f"the tokenizer has {len(words)} whole-word or alphanumeric tokens; recall items need at "
                         "least 8")  # fmt: skip
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))
    words_t = torch.tensor(words)[order]  # (W,)
    half = min(POOL_SIZE, len(words) // 2)
    return words_t[:half].sort().values, words_t[half : 2 * half].sort().values


def recall_pools(tokenizer: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value token pools of ``tokenizer``: two disjoint sorted int64 tensors of equal size."""
    vocab = tuple(tokenizer.decode([i]) for i in range(len(tokenizer)))
    return _pools_cached(vocab, seed)


def recall_items(
    tokenizer: Any,
    n_pairs: int,
    n_items: int,
    *,
    gap: int = 0,
    seed: int = 0,
    filler: torch.Tensor | None = None,
    split: str = "test",
    pool_seed: int = 0,
) -> RecallItems:
    """Build ``n_items`` MQAR items of ``n_pairs`` pairs (see the module docstring).

    Args:
        tokenizer: The model's tokenizer (keys and values are its whole-word tokens).
        n_pairs: Key-value pairs per item, >= 1 and at most the pool size.
        n_items: Items, >= 1.
        gap: Filler tokens between the context and the queries, >= 0 (needs ``filler``).
        seed: Seed of keys, values, query order and filler offsets.
        filler: A token stream (T,) to cut the gaps from (the corpus split ``split``).
        split: Name of the split ``filler`` comes from (recorded).
        pool_seed: Seed of the key / value pools (the same for training and evaluation).

    Returns:
        The items; every item is ``1 + 4 * n_pairs + gap`` tokens long.

    Raises:
        ValueError: For counts out of range or a gap without filler.
    """
    keys, values = recall_pools(tokenizer, pool_seed)
    if not 1 <= n_pairs <= len(keys):
        raise ValueError(f"n_pairs={n_pairs} is invalid; allowed: 1..{len(keys)} (the key pool of this tokenizer)")
    if n_items < 1:
        raise ValueError(f"n_items={n_items} is invalid; need at least 1")
    check_recall_size(n_pairs, n_items, gap)
    if gap < 0 or (gap and (filler is None or filler.numel() <= gap)):
        raise ValueError(f"gap={gap} is invalid; allowed: 0, or up to the filler stream's length when one is given")
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    P, N = n_pairs, n_items
    k = keys[torch.stack([torch.randperm(len(keys), generator=gen)[:P] for _ in range(N)])]  # (N, P)
    v = values[torch.randint(0, len(values), (N, P), generator=gen)]  # (N, P)
    order = torch.stack([torch.randperm(P, generator=gen) for _ in range(N)])  # (N, P)
    context = torch.stack([k, v], dim=-1).reshape(N, 2 * P)  # (N, 2P) k1 v1 k2 v2 ...
    qk, qv = k.gather(1, order), v.gather(1, order)  # (N, P)
    queries = torch.stack([qk, qv], dim=-1).reshape(N, 2 * P)  # (N, 2P)
    parts = [torch.full((N, 1), eos), context]
    if gap:
        starts = torch.randint(0, filler.numel() - gap, (N,), generator=gen)  # (N,)
        parts.append(filler[starts[:, None] + torch.arange(gap)])  # (N, gap)
    parts.append(queries)
    ids = torch.cat(parts, dim=1)  # (N, L)
    query_pos = 1 + 2 * P + gap + 2 * torch.arange(P).expand(N, P)  # (N, P)
    value_pos = 2 + 2 * order  # (N, P) position of the queried pair's value in the context
    labels = torch.full_like(ids, IGNORE)  # (N, L)
    labels.scatter_(1, query_pos + 1, qv)
    return RecallItems(ids=ids, labels=labels, query_pos=query_pos.clone(), answers=qv, distance=query_pos - value_pos,
                       n_pairs=P, gap=gap, seed=seed, split=split, n_values=len(values))  # fmt: skip

"""Associative recall accuracy and per-position NLL on long windows: what a model remembers, and how far.

:func:`recall_accuracy` scores multi-query associative recall items (:mod:`sensitivity.data.recall`) at several
numbers of pairs and gaps: at each query key, is the value that followed it in the context the argmax of the
next-token logits over the whole vocabulary? :func:`position_nll` gives the mean next-token NLL at every position
of long text windows, so "what does pruning do to late positions" is one curve per model.

Shape legend: N items, L tokens, P pairs (queries per item), V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.loading import unwrap
from ..data import Corpus, load_corpus, tokenize_split
from ..data.recall import recall_items

__all__ = ["DISTANCE_BINS", "position_nll", "recall_accuracy", "recall_definition", "recall_rows"]

DISTANCE_BINS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 1 << 30)
"""Edges of the query-distance bins (tokens from the value in the context to the query key)."""


def recall_definition(n_items: int, seed: int, n_values: int) -> str:
    """One sentence saying what recall accuracy is (items, scoring, chance level)."""
    return (f"multi-query associative recall: {n_items} items per (pairs, gap), seed {seed}; each item lists P "
            "key-value pairs of single word tokens, an optional gap of test-split text, then every key again in a "
            "random order followed by its value; accuracy = share of queries whose value is the argmax of the "
            f"next-token logits over the whole vocabulary at the query key (chance 1/{n_values} for a model that "
            "knows the answer is a value token)")  # fmt: skip


@torch.no_grad()
def recall_accuracy(
    model,
    tokenizer,
    *,
    pairs: Iterable[int] = (4, 8, 16, 32, 64),
    gaps: Iterable[int] = (0,),
    items: int = 64,
    seed: int = 0,
    corpus: Corpus | None = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Score recall at every (pairs, gap), one row per query.

    Args:
        model: A ``LoadedModel`` or HF causal LM.
        tokenizer: Its tokenizer.
        pairs: Numbers of key-value pairs.
        gaps: Tokens of test-split filler between the context and the queries.
        items: Items per (pairs, gap).
        seed: Seed of the items (the same seed gives the same items for every model).
        corpus: Corpus the filler comes from (default: the built-in corpus; only read when a gap is > 0).
        batch_size: Items per forward.
        show_progress: Show a tqdm bar.

    Returns:
        A frame with one row per query: ``pairs, gap, item, query_index, distance, correct, nll`` (the answer's NLL).
    """
    module = unwrap(model)
    device = next(module.parameters()).device
    gaps = tuple(gaps)
    filler = None
    if any(gaps):
        filler = tokenize_split(corpus if corpus is not None else load_corpus(), tokenizer, "test")  # (T,)
    frames = []
    cells = [(p, g) for p in pairs for g in gaps]
    for p, g in tqdm(cells, desc="recall", disable=not show_progress, unit="cell"):
        batch = recall_items(tokenizer, p, items, gap=g, seed=seed, filler=filler, split="test")
        correct, nll = [], []
        for start in range(0, items, batch_size):
            ids = batch.ids[start : start + batch_size].to(device)  # (N, L)
            logits = module(input_ids=ids, use_cache=False).logits.float()  # (N, L, V)
            pos = batch.query_pos[start : start + batch_size].to(device)  # (N, P)
            at = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # (N, P, V)
            answers = batch.answers[start : start + batch_size].to(device)  # (N, P)
            correct.append((at.argmax(-1) == answers).cpu())  # (N, P)
            nll.append(-F.log_softmax(at, -1).gather(-1, answers[..., None])[..., 0].cpu())  # (N, P)
        n = batch.answers.shape
        frames.append(pd.DataFrame({
            "pairs": p, "gap": g, "item": torch.arange(n[0]).repeat_interleave(n[1]).numpy(),
            "query_index": torch.arange(n[1]).repeat(n[0]).numpy(), "distance": batch.distance.flatten().numpy(),
            "correct": torch.cat(correct).flatten().numpy(), "nll": torch.cat(nll).flatten().double().numpy(),
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def recall_rows(df: pd.DataFrame, *, task: str = "recall", by: str = "pairs") -> list[dict]:
    """Tidy ``(task, metric, value, stderr, n)`` rows of :func:`recall_accuracy`'s frame: accuracy per ``by``
    value (``pairs``, or ``distance`` binned by :data:`DISTANCE_BINS`), with the binomial standard error."""
    rows = []
    key = df[by] if by != "distance" else pd.cut(df.distance, DISTANCE_BINS, right=False).astype(str)
    for value, part in df.groupby(key, sort=True, observed=True):
        acc, n = float(part.correct.mean()), len(part)
        rows.append({"task": task, "metric": f"acc@{by}={value}", "value": acc,
                     "stderr": math.sqrt(acc * (1 - acc) / max(1, n - 1)), "n": n})  # fmt: skip
    return rows


@torch.no_grad()
def position_nll(
    model,
    tokenizer,
    *,
    seqlen: int = 4096,
    windows: int = 8,
    corpus: Corpus | None = None,
    split: str = "test",
    bins: int = 32,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Mean next-token NLL by position on long non-overlapping text windows.

    Args:
        model: A ``LoadedModel`` or HF causal LM.
        tokenizer: Its tokenizer.
        seqlen: Window length (positions 1..seqlen-1 are scored).
        windows: The first K windows of the split (fewer if the split is shorter).
        corpus: Corpus (default: the built-in corpus).
        split: Split to read.
        bins: Positions are averaged in this many bins of equal width.
        show_progress: Show a tqdm bar.

    Returns:
        A frame with one row per bin: ``start, stop`` (positions of the predicted tokens), ``nll`` (mean over the
        windows and positions of the bin), ``windows``, ``seqlen``.

    Raises:
        ValueError: If the split holds less than one window.
    """
    module = unwrap(model)
    device = next(module.parameters()).device
    stream = tokenize_split(corpus if corpus is not None else load_corpus(), tokenizer, split)  # (T,)
    n = min(windows, stream.numel() // seqlen)
    if n < 1:
        raise ValueError(f"split {split!r} has {stream.numel()} tokens, fewer than one window of {seqlen}")
    total = torch.zeros(seqlen - 1, dtype=torch.float64)  # (L-1,)
    for k in tqdm(range(n), desc="position nll", disable=not show_progress, unit="window"):
        ids = stream[k * seqlen : (k + 1) * seqlen][None].to(device)  # (1, L)
        logits = module(input_ids=ids, use_cache=False).logits.float()[0, :-1]  # (L-1, V)
        total += F.cross_entropy(logits, ids[0, 1:], reduction="none").double().cpu()  # (L-1,)
    per_pos = total / n  # (L-1,)
    edges = torch.linspace(0, seqlen - 1, bins + 1).round().long().tolist()
    rows = [{"start": a + 1, "stop": b + 1, "nll": float(per_pos[a:b].mean()), "windows": n, "seqlen": seqlen}
            for a, b in zip(edges[:-1], edges[1:]) if b > a]  # fmt: skip
    return pd.DataFrame(rows)

"""The built-in zero-shot tasks as data: their items, the token pairs lm-eval scores, and windows of gold answers.

Each built-in task (``cloze``, ``choice``; built by :mod:`sensitivity.data.build_tasks`, shipped in
``sensitivity/tasks/``) is a list of items. An item asks for the log-likelihood of one or more continuations given a
context, exactly as lm-eval's task YAML states it: ``cloze`` scores ``context`` then ``" " + target``; ``choice``
scores ``context`` then ``" " + choice`` for each of its four choices (lm-eval's default ``target_delimiter``).

:func:`encode_pair` tokenizes a (context, continuation) pair as lm-eval's ``HFLM`` does, so that the toolkit's
scores (:mod:`sensitivity.eval.tasks`) equal lm-eval's, and :func:`task_windows` packs the gold pairs as
:class:`~sensitivity.data.windows.Windows` whose labels are the gold answer's tokens: the task's loss for probes
and attribution ("NLL of the gold answer tokens").

Shape legend: N items, L tokens (the longest item).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from ..tasks import TASKS_DIR
from .windows import Windows

__all__ = ["BUILTIN_TASKS", "TASK_ABOUT", "encode_pair", "task_items", "task_pairs", "task_path", "task_texts",
           "task_windows"]  # fmt: skip

logger = logging.getLogger(__name__)

BUILTIN_TASKS = ("cloze", "choice")
"""Names of the tasks shipped with the package."""

TASK_ABOUT = {
    "cloze": "LAMBADA-style items: the final word of a 60-150 word passage from the test split of austen-kjv, a word "
             "that occurs earlier in the passage; chance about 0 (open vocabulary)",
    "choice": "4-way items: the true next 10-25 words after a 40-80 word context from the test split of austen-kjv, "
              "against 3 spans of as many words from other chapters of the split; chance 25%",
}  # fmt: skip
"""What each built-in task's items are, and its chance level (one clause each)."""

IGNORE = -100
"""Label of positions that are not scored (Hugging Face's convention)."""

_SOURCE = "austen-kjv"
_SPLIT = "test"
_TARGET_DELIMITER = " "  # lm-eval's default target_delimiter (multiple_choice); cloze's doc_to_target adds it too


def _check_name(name: str) -> None:
    if name not in BUILTIN_TASKS:
        raise ValueError(f"{name!r} is not a built-in task; allowed: {', '.join(BUILTIN_TASKS)}")


def task_path(name: str, suffix: str = ".jsonl"):
    """The shipped file of built-in task ``name``: its items (``.jsonl``) or its lm-eval task (``.yaml``)."""
    _check_name(name)
    return TASKS_DIR / name / f"{name}{suffix}"


def task_items(name: str) -> list[dict]:
    """The items of built-in task ``name``, as shipped (one dict per JSONL line, in file order).

    Args:
        name: ``"cloze"`` (keys ``id, doc, start, context, target``) or ``"choice"`` (keys ``id, doc, start,
            context, choices, gold``).

    Raises:
        ValueError: For a name that is not a built-in task (naming the allowed ones).
    """
    path = task_path(name)
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def task_texts(name: str, item: dict) -> tuple[str, list[str], int]:
    """The strings lm-eval scores for one item: ``(context, continuations, gold index)``.

    ``cloze``: one continuation ``" " + target`` (gold 0); ``choice``: ``" " + choice`` for each choice.
    """
    _check_name(name)
    if name == "cloze":
        return item["context"], [_TARGET_DELIMITER + item["target"]], 0
    return item["context"], [_TARGET_DELIMITER + c for c in item["choices"]], int(item["gold"])


def _prefix_token(tokenizer: Any) -> int:
    """The token lm-eval's HFLM conditions an empty context on: bos, else eos."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer: Any, text: str) -> list[int]:
    """HFLM's ``tok_encode``: the tokenizer's own special-token default, except that a text already starting with
    the prefix token's text gets none added."""
    prefix = _prefix_token(tokenizer)
    if prefix is not None and text.startswith(tokenizer.decode(prefix)):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize a (context, continuation) pair exactly as lm-eval's ``HFLM.loglikelihood`` does (lm-eval 0.4.13).

    Trailing whitespace of the context moves to the continuation; the context and ``context + continuation`` are
    encoded whole (with the tokenizer's default special tokens) and the continuation's tokens are the whole's
    tokens after the context's, so a token spanning the boundary counts as continuation. An empty context becomes
    the bos token (eos when there is none), unless the continuation starts with it.

    Args:
        tokenizer: A Hugging Face tokenizer.
        context: The conditioning text.
        continuation: The scored text.

    Returns:
        ``(context_ids, continuation_ids)``.

    Examples:
        >>> encode_pair(byte_tokenizer(), "In the beginning ", "God")
        ([73, 110, 32, 116, 104, 101, 32, 98, 101, 103, 105, 110, 110, 105, 110, 103], [32, 71, 111, 100])
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token(tokenizer)
        return ([prefix], cont) if not cont or prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            raise ValueError("a context of only whitespace cannot be scored (lm-eval refuses it too)")
    whole = _tok_encode(tokenizer, context + continuation)
    ctx = _tok_encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def task_pairs(name: str, tokenizer: Any, *, max_items: int | None = None
               ) -> list[tuple[list[tuple[list[int], list[int]]], int]]:  # fmt: skip
    """Every item's token pairs: ``[(pairs, gold)]`` with ``pairs`` one ``(context_ids, continuation_ids)`` per
    continuation (:func:`encode_pair`), in the item's order, and ``gold`` the index of the gold continuation.

    Args:
        name: A built-in task.
        tokenizer: The model's tokenizer.
        max_items: Keep only the first K items (lm-eval's ``limit``); all if ``None``.
    """
    items = task_items(name)
    if max_items is not None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items: {max_items!r} is invalid; allowed: an integer >= 1 or None")
        items = items[:max_items]
    out = []
    for item in items:
        context, continuations, gold = task_texts(name, item)
        pairs = [encode_pair(tokenizer, context, c) for c in continuations]
        for (ctx, cont), text in zip(pairs, continuations):
            if not ctx or not cont:
                raise ValueError(f"{name} item {item['id']}: {text!r} encodes to no continuation token")
        out.append((pairs, gold))
    return out


def task_windows(name: str, tokenizer: Any, *, max_items: int | None = None) -> Windows:
    """The items' gold ``context + continuation`` as one batch whose labels score the gold answer's tokens only.

    Row ``i`` holds item ``i``'s context tokens then its gold continuation's (exactly the tokens lm-eval scores,
    :func:`encode_pair`), right-padded with eos to the longest item; ``labels`` holds the continuation tokens at
    their positions and -100 elsewhere (HF's convention: the logits at ``t - 1`` are scored on ``labels[:, t]``).
    The mean NLL over labelled positions is the task's loss (NLL of the gold answer tokens).

    Args:
        name: A built-in task (``cloze``, ``choice``).
        tokenizer: The model's tokenizer.
        max_items: Keep only the first K items; all if ``None``.

    Returns:
        Windows with ``ids`` and ``labels`` of shape (N, L), ``kind="eval"``, ``stride=0``, ``seed=None``.

    Examples:
        >>> w = task_windows("cloze", lm.tokenizer, max_items=64)
        >>> w.labels.ne(-100).sum(1)  # target tokens per item
    """
    gold = [pairs[g] for pairs, g in task_pairs(name, tokenizer, max_items=max_items)]
    L = max(2, max(len(c) + len(t) for c, t in gold))
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (tokenizer.pad_token_id or 0)
    ids = torch.full((len(gold), L), pad, dtype=torch.long)  # (N, L)
    labels = torch.full((len(gold), L), IGNORE, dtype=torch.long)  # (N, L)
    for i, (ctx, cont) in enumerate(gold):
        n = len(ctx) + len(cont)
        ids[i, :n] = torch.tensor(ctx + cont)
        labels[i, len(ctx) : n] = torch.tensor(cont)
    scored = int((labels != IGNORE).sum())
    note = f"{len(gold)} {name} items, gold answers' {scored} tokens scored"
    windows = Windows(ids=ids, seqlen=L, split=_SPLIT, source=_SOURCE, kind="eval", seed=None, stride=0,
                      labels=labels, note=note)  # fmt: skip
    logger.info("%s", windows.describe())
    return windows

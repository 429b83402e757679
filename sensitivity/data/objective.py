"""Objectives: what a stage's loss is measured on.

Every stage that measures a loss (probes, attribution, the explainer, schedules derived from probes) takes a
``task``: ``"text"`` (the default: next-token NLL on text windows of the corpus), a built-in task (``"cloze"``,
``"choice"``: the NLL of the gold answer's tokens given the item's context, the tokens lm-eval scores), or
``"recall"`` / ``"recall:P"`` (the NLL of the values at the query keys of multi-query associative recall items with
``P`` pairs, default :data:`RECALL_PAIRS`). A task's windows carry ``labels`` so that only the answer tokens count;
everything downstream (:class:`~sensitivity.core.runner.LayerRunner`, :func:`~sensitivity.eval.perplexity`, the
gradient objectives) scores exactly those.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator

from ..core.spec import MAX_COUNT

if TYPE_CHECKING:
    from .windows import Windows

__all__ = ["OBJECTIVES", "RECALL_PAIRS", "Task", "check_recall_size", "check_task", "parse_task", "task_windows"]

RECALL_PAIRS = 16
"""Pairs of the ``recall`` objective when none are given."""
OBJECTIVES = ("text", "cloze", "choice", "recall")
"""Objective names (``recall`` also as ``recall:P``)."""
_RECALL = re.compile(r"^recall(?::(\d+))?$")


def parse_task(task: str) -> tuple[str, int | None]:
    """``(kind, pairs)`` of an objective name: ``("recall", 16)`` for ``"recall:16"``, ``("cloze", None)``...

    Raises:
        ValueError: For an unknown name, naming the allowed ones.
    """
    if (m := _RECALL.match(task)) is not None:
        pairs = int(m.group(1)) if m.group(1) else RECALL_PAIRS
        if pairs < 1:
            raise ValueError(f"{task!r} has {pairs} pairs; need at least 1 (recall:P)")
        return "recall", pairs
    if task in OBJECTIVES:
        return task, None
    raise ValueError(f"unknown task {task!r}; allowed: {', '.join(OBJECTIVES)} or recall:P (P pairs)")


def check_task(task: str) -> str:
    """``task`` if it names an objective (pydantic validator of :data:`Task`)."""
    parse_task(task)
    return task


Task = Annotated[str, AfterValidator(check_task)]
"""A spec field naming an objective (see the module docstring)."""


def check_recall_size(n_pairs: int, n_items: int, gap: int = 0) -> None:
    """Refuse recall items that would hold more than :data:`~sensitivity.core.spec.MAX_COUNT` tokens in all (the
    bound of every drawn set of windows), before any is drawn.

    Raises:
        ValueError: Naming the items, their length and the bound.
    """
    length = 1 + 4 * n_pairs + gap
    if n_items * length > MAX_COUNT:
        raise ValueError(f"{n_items:,} recall items of {length:,} tokens ({n_pairs} pairs) are {n_items * length:,} "
                         f"tokens; at most {MAX_COUNT:,} tokens of task items (items x item length) are "
                         "built")  # fmt: skip


def task_windows(task: str, tokenizer: Any, *, items: int, seed: int = 0) -> Windows:
    """The windows of a non-text objective, labelled on its answer tokens.

    Args:
        task: ``"cloze"``, ``"choice"``, ``"recall"`` or ``"recall:P"``.
        tokenizer: The model's tokenizer.
        items: How many items (the first ``items`` of a built-in task; ``items`` recall items drawn with ``seed``).
        seed: Seed of the recall items (no gap between context and queries).

    Returns:
        :class:`Windows` with ``labels`` on the answers.

    Raises:
        ValueError: For ``"text"`` (the stage's own text windows) or an unknown task.
    """
    kind, pairs = parse_task(task)
    if kind == "text":
        raise ValueError("task 'text' uses the stage's text windows, not task windows")
    if kind == "recall":
        from .recall import recall_items

        return recall_items(tokenizer, pairs, items, seed=seed, split="synthetic").windows()
    from .tasks import task_windows as builtin_windows

    return builtin_windows(kind, tokenizer, max_items=items)

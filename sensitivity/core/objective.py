"""The objective options every loss-measuring stage shares (probes, attribution, the explainer, schedules)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator, model_validator

from ..data.objective import Task, check_recall_size, parse_task, task_windows

if TYPE_CHECKING:
    from ..data import Windows
from .spec import Count, Spec, SpecError, _none_or_names

__all__ = ["TaskOptions", "Tasks", "check_recall_pairs", "objective_windows"]

Tasks = Annotated[tuple[Task, ...], BeforeValidator(_none_or_names)]
"""Objectives scored besides perplexity: a list, a comma-separated string, or ``"none"``."""


class TaskOptions(Spec):
    """Which objective a stage's loss is measured on (see :mod:`sensitivity.data.objective`)."""

    task: Task = "text"
    """Objective: text (next-token NLL on text windows), cloze, choice (NLL of the gold answer's tokens), recall or
    recall:P (NLL of the values at the query keys of associative recall items with P pairs; default 16)."""
    task_items: Count = 64
    """Items of a task objective (the first K of a built-in task; K recall items drawn with the seed)."""

    @model_validator(mode="after")
    def _bounded(self) -> TaskOptions:
        kind, pairs = parse_task(self.task)
        if kind == "recall":
            try:
                check_recall_size(pairs, self.task_items)
            except ValueError as e:
                raise SpecError(str(e), "task_items") from None
        return self


def objective_windows(options: Any, tokenizer: Any, text: Windows | None = None) -> Windows | None:
    """The windows ``options.task`` measures on: ``text`` (the stage's own text windows) for ``task == "text"``,
    else the task's labelled windows (``options.task_items`` items, recall drawn with ``options.seed``)."""
    kind, pairs = parse_task(options.task)
    if kind == "text":
        return text
    if kind == "recall":
        check_recall_pairs(pairs, tokenizer, "task")
    return task_windows(options.task, tokenizer, items=options.task_items, seed=getattr(options, "seed", 0))


def check_recall_pairs(pairs: int, tokenizer: Any, field: str) -> None:
    """Refuse recall items of more pairs than the tokenizer's key pool holds (a key appears once per item).

    Raises:
        SpecError: Naming ``field``, the pairs and the pool size.
    """
    from ..data.recall import recall_pools

    pool = len(recall_pools(tokenizer)[0])
    if pairs > pool:
        raise SpecError(f"recall with {pairs} pairs needs {pairs} distinct keys; allowed: 1 to {pool} pairs (the "
                        "whole-word tokens of this model's tokenizer)", field)  # fmt: skip

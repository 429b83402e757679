"""The objective options every loss-measuring stage shares (probes, attribution, the explainer, schedules)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator

from ..data import Windows
from ..data.objective import Task, parse_task, task_windows
from .spec import Count, Spec, _none_or_names

__all__ = ["TaskOptions", "Tasks", "objective_windows"]

Tasks = Annotated[tuple[Task, ...], BeforeValidator(_none_or_names)]
"""Objectives scored besides perplexity: a list, a comma-separated string, or ``"none"``."""


class TaskOptions(Spec):
    """Which objective a stage's loss is measured on (see :mod:`sensitivity.data.objective`)."""

    task: Task = "text"
    """Objective: text (next-token NLL on text windows), cloze, choice (NLL of the gold answer's tokens), recall or
    recall:P (NLL of the values at the query keys of associative recall items with P pairs; default 16)."""
    task_items: Count = 64
    """Items of a task objective (the first K of a built-in task; K recall items drawn with the seed)."""


def objective_windows(options: Any, tokenizer: Any, text: Windows | None = None) -> Windows | None:
    """The windows ``options.task`` measures on: ``text`` (the stage's own text windows) for ``task == "text"``,
    else the task's labelled windows (``options.task_items`` items, recall drawn with ``options.seed``)."""
    if parse_task(options.task)[0] == "text":
        return text
    return task_windows(options.task, tokenizer, items=options.task_items, seed=getattr(options, "seed", 0))

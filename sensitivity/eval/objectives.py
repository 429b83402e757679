"""One score per objective, for tables with a column per objective (the pruning grid, the report).

``cloze`` and ``choice`` give their accuracy on the first ``items`` items (the toolkit's scoring, equal to
lm-eval's); ``recall`` / ``recall:P`` the recall accuracy on ``items`` items of P pairs (default 16) without a gap.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data.objective import parse_task

__all__ = ["objective_column", "objective_definition", "objective_scores"]


def objective_column(task: str) -> str:
    """The table column of ``task``'s score: ``cloze_acc``, ``choice_acc``, ``recall_acc``, ``recall8_acc``."""
    return task.replace(":", "") + "_acc"


def objective_definition(task: str, items: int, seed: int = 0) -> str:
    """One sentence saying what the column of ``task`` holds (items, scoring, chance level)."""
    kind, pairs = parse_task(task)
    if kind == "recall":
        return (f"{objective_column(task)}: recall accuracy on {items} items of {pairs} key-value pairs (seed {seed},"
                " no gap): share of queries whose value is the argmax over the vocabulary at the query key")
    chance = "0 (open vocabulary)" if kind == "cloze" else "0.25"
    how = ("every token of the final word is the greedy argmax" if kind == "cloze"
           else "the gold continuation has the highest summed log-likelihood of the four")  # fmt: skip
    return (f"{objective_column(task)}: accuracy on the first {items} items of the built-in {kind} task ({how}; "
            f"chance {chance})")


def objective_scores(model, tokenizer, tasks: Sequence[str], *, items: int = 200, seed: int = 0,
                     batch_size: int = 16) -> dict[str, float]:  # fmt: skip
    """``{column: accuracy}`` of ``model`` on every non-text objective of ``tasks``.

    Args:
        model: A ``LoadedModel`` or HF causal LM.
        tokenizer: Its tokenizer.
        tasks: Objective names (``text`` is skipped: perplexity has its own columns).
        items: Items per objective.
        seed: Seed of the recall items.
        batch_size: Items per forward.
    """
    from .recall import recall_accuracy

    scores: dict[str, float] = {}
    for task in tasks:
        kind, pairs = parse_task(task)
        if kind == "text":
            continue
        if kind == "recall":
            df = recall_accuracy(model, tokenizer, pairs=(pairs,), items=items, seed=seed, batch_size=batch_size,
                                 show_progress=False)  # fmt: skip
            scores[objective_column(task)] = float(df.correct.mean())
        else:
            from .tasks import score_builtin

            rows = score_builtin(model, kind, max_items=items, batch_size=batch_size, show_progress=False)
            scores[objective_column(task)] = next(float(r["value"]) for r in rows if r["metric"] == "acc")
    return scores

"""Evaluation: token-level perplexity and KL divergence, each with its definition; zero-shot task scores (the
built-in tasks scored as lm-eval scores them, and any lm-eval task on the in-memory model); associative recall
accuracy and NLL by position on long windows; one score per objective for tables."""

from .objectives import objective_column, objective_definition, objective_scores
from .perplexity import KLDivergence, Perplexity, definition, kl_divergence, perplexity
from .recall import position_nll, recall_accuracy, recall_definition, recall_rows
from .tasks import SCORERS, evaluate_tasks, lm_eval_rows, score_builtin

__all__ = ["SCORERS", "KLDivergence", "Perplexity", "definition", "evaluate_tasks", "kl_divergence", "lm_eval_rows",
           "objective_column", "objective_definition", "objective_scores", "perplexity", "position_nll",
           "recall_accuracy", "recall_definition", "recall_rows", "score_builtin"]

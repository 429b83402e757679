"""Evaluation: token-level perplexity and KL divergence, each with its definition; zero-shot task scores (the
built-in tasks scored as lm-eval scores them, and any lm-eval task on the in-memory model); associative recall
accuracy and NLL by position on long windows; one score per objective for tables."""

from .._lazy import exports

__all__ = ["SCORERS", "KLDivergence", "Perplexity", "definition", "evaluate_tasks", "kl_divergence", "lm_eval_rows",
           "objective_column", "objective_definition", "objective_scores", "perplexity", "position_nll",
           "recall_accuracy", "recall_definition", "recall_rows", "score_builtin"]

_EXPORTS = {
    "objective_column": ".objectives",
    "objective_definition": ".objectives",
    "objective_scores": ".objectives",
    "KLDivergence": ".perplexity",
    "Perplexity": ".perplexity",
    "definition": ".perplexity",
    "kl_divergence": ".perplexity",
    "perplexity": ".perplexity",
    "position_nll": ".recall",
    "recall_accuracy": ".recall",
    "recall_definition": ".recall",
    "recall_rows": ".recall",
    "SCORERS": ".tasks",
    "evaluate_tasks": ".tasks",
    "lm_eval_rows": ".tasks",
    "score_builtin": ".tasks",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)

"""Evaluation: token-level perplexity and KL divergence, each with its definition."""

from .perplexity import KLDivergence, Perplexity, definition, kl_divergence, perplexity

__all__ = ["KLDivergence", "Perplexity", "definition", "kl_divergence", "perplexity"]

"""Corpora, tokenizers and token windows for pruning-sensitivity analysis."""

from __future__ import annotations

from .._lazy import exports

__all__ = [
    "BYTE_VOCAB_SIZE",
    "Corpus",
    "Windows",
    "byte_tokenizer",
    "calibration_windows",
    "eval_windows",
    "load_corpus",
    "split_documents",
    "tokenize_split",
]

_EXPORTS = {
    "Corpus": ".corpus",
    "load_corpus": ".corpus",
    "split_documents": ".corpus",
    "BYTE_VOCAB_SIZE": ".tokenizer",
    "byte_tokenizer": ".tokenizer",
    "Windows": ".windows",
    "calibration_windows": ".windows",
    "eval_windows": ".windows",
    "tokenize_split": ".windows",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)

"""Corpora, tokenizers and token windows for pruning-sensitivity analysis."""

from __future__ import annotations

from sensitivity.data.corpus import Corpus, load_corpus, split_documents
from sensitivity.data.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from sensitivity.data.windows import Windows, calibration_windows, eval_windows, tokenize_split

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

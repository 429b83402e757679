"""Tests for token streams, eval windows and calibration windows."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sensitivity.data import (
    Corpus,
    Windows,
    byte_tokenizer,
    calibration_windows,
    eval_windows,
    load_corpus,
    tokenize_split,
)
from sensitivity.data import windows as windows_module

TOK = byte_tokenizer()
TEXT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 ASCII chars -> 135 tokens
CORPUS = Corpus(name="toy", source="memory", splits={"train": (TEXT, "xyz"), "test": (TEXT,)})


def _ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# --- tokenize_split ---------------------------------------------------------


def test_tokenize_split_joins_documents_with_eos() -> None:
    stream = tokenize_split(CORPUS, TOK, "train")
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == _ids(TEXT) + [256] + _ids("xyz")
    assert tokenize_split(CORPUS, TOK, "test").tolist() == _ids(TEXT)


def test_tokenize_split_without_eos_token() -> None:
    class NoEos:
        eos_token_id = None
        name_or_path = "no-eos"

        def __len__(self) -> int:
            return 256

        def __call__(self, texts: list[str], **kwargs: object) -> dict[str, list[list[int]]]:
            assert kwargs["add_special_tokens"] is False
            return {"input_ids": [_ids(t) for t in texts]}

    assert tokenize_split(CORPUS, NoEos(), "train").tolist() == _ids(TEXT) + _ids("xyz")


def test_tokenize_split_unknown_split() -> None:
    with pytest.raises(ValueError, match=r"unknown split 'dev'"):
        tokenize_split(CORPUS, TOK, "dev")


def test_cached_stream_is_not_shared_with_caller() -> None:
    first = tokenize_split(CORPUS, TOK, "test")
    first.zero_()
    assert tokenize_split(CORPUS, TOK, "test").tolist() == _ids(TEXT)


def test_long_documents_are_chunked_but_equal_whole_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows_module, "CHUNK_CHARS", 50)
    monkeypatch.setattr(windows_module, "_cache", OrderedDict())
    doc = "Chapter 1\nIn the beginning  was the word.\n\nÄnd then 😀 came\tmore text, " * 20
    pieces = windows_module._pieces(doc, 50)
    assert len(pieces) > 10 and "".join(pieces) == doc
    assert all(not prev[-1].isspace() and p[0].isspace() for prev, p in zip(pieces, pieces[1:], strict=False))
    corpus = Corpus("long", "memory", {"train": (doc, doc)})
    whole = TOK.encode(doc, add_special_tokens=False)
    assert tokenize_split(corpus, TOK, "train").tolist() == whole + [256] + whole

    # A merge-based byte-level BPE (as GPT-NeoX) must also give the same ids as whole encoding.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(
        [doc], trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend)
    merged = bpe.encode(doc, add_special_tokens=False)
    assert len(merged) < len(doc) // 2  # merges are really used
    assert tokenize_split(corpus, bpe, "train").tolist() == merged + merged  # no eos token


# --- eval windows -----------------------------------------------------------


def test_eval_windows_exact_contents() -> None:
    stream = torch.tensor(_ids(TEXT))  # (135,)
    windows = eval_windows(CORPUS, TOK, 16)
    assert isinstance(windows, Windows)
    assert windows.ids.shape == (8, 16) and windows.ids.dtype == torch.long  # 135 // 16 == 8, tail dropped
    for k in range(8):
        assert torch.equal(windows.ids[k], stream[k * 16 : (k + 1) * 16])
    assert (windows.seqlen, windows.split, windows.source, windows.kind) == (16, "test", "toy", "eval")
    assert windows.seed is None and windows.stride == 16 and len(windows) == 8
    assert windows.describe() == "8 non-overlapping windows of 16 tokens (stride 16) from split 'test' of toy"


def test_eval_windows_max_windows_and_split() -> None:
    windows = eval_windows(CORPUS, TOK, 16, max_windows=3)
    assert torch.equal(windows.ids, eval_windows(CORPUS, TOK, 16).ids[:3])
    assert len(eval_windows(CORPUS, TOK, 16, max_windows=100)) == 8
    train = eval_windows(CORPUS, TOK, 139, split="train")  # 135 + eos + 3 == 139 tokens
    assert train.ids.tolist() == [_ids(TEXT) + [256] + _ids("xyz")]
    assert train.describe() == "1 non-overlapping window of 139 tokens (stride 139) from split 'train' of toy"


@pytest.mark.parametrize("seqlen", [1, 0, -3, 2.0, True, "8"])
def test_eval_windows_bad_seqlen(seqlen: object) -> None:
    bound = "2 <= value <= 67,108,864"
    with pytest.raises(ValueError, match=rf"^seqlen: {seqlen!r} is .*; allowed: ({bound}|a number|an integer)$"):
        eval_windows(CORPUS, TOK, seqlen)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_windows", [0, -1, 1.5])
def test_eval_windows_bad_max_windows(max_windows: object) -> None:
    bound = "1 <= value <= 67,108,864"
    with pytest.raises(ValueError, match=rf"^max_windows: {max_windows!r} is .*; allowed: ({bound}|an integer)$"):
        eval_windows(CORPUS, TOK, 16, max_windows=max_windows)  # type: ignore[arg-type]


def test_eval_windows_text_too_short() -> None:
    expected = r"split 'test' of toy has 135 tokens, fewer than one window of 136; use a smaller seqlen or more text"
    with pytest.raises(ValueError, match=expected):
        eval_windows(CORPUS, TOK, 136)
    assert len(eval_windows(CORPUS, TOK, 135)) == 1


def test_eval_windows_without_heldout_split() -> None:
    with pytest.raises(ValueError, match=r"corpus only-train has no 'test' or 'validation' split"):
        eval_windows(Corpus("only-train", "m", {"train": (TEXT,)}), TOK, 8)


def test_sample_eval_windows_are_non_trivial() -> None:
    corpus = load_corpus("sample")
    windows = eval_windows(corpus, TOK, 128)
    assert len(windows) > 200  # ~36k characters held out
    assert windows.describe().endswith("from split 'test' of sample")
    assert TOK.decode(windows.ids[0]).startswith("Chapter ")


# --- calibration windows ----------------------------------------------------


def test_calibration_windows_are_slices_of_the_train_stream() -> None:
    stream = tokenize_split(CORPUS, TOK, "train")  # (139,)
    windows = calibration_windows(CORPUS, TOK, 32, 20, seed=3)
    assert windows.ids.shape == (32, 20) and windows.ids.dtype == torch.long
    starts = torch.randint(0, 139 - 20 + 1, (32,), generator=torch.Generator().manual_seed(3))
    for row, start in zip(windows.ids, starts.tolist(), strict=True):
        assert torch.equal(row, stream[start : start + 20])
    assert (windows.split, windows.kind, windows.seed, windows.stride, windows.source) == (
        "train",
        "calibration",
        3,
        0,
        "toy",
    )
    assert windows.describe() == "32 random calibration windows of 20 tokens (seed 3) from split 'train' of toy"


def test_calibration_windows_determinism_and_bounds() -> None:
    corpus = load_corpus("sample")
    a = calibration_windows(corpus, TOK, 64, 64, seed=0)
    b = calibration_windows(corpus, TOK, 64, 64, seed=0)
    c = calibration_windows(corpus, TOK, 64, 64, seed=1)
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)
    assert int(a.ids.min()) >= 0 and int(a.ids.max()) <= 256


def test_calibration_exact_length_gives_whole_stream() -> None:
    windows = calibration_windows(CORPUS, TOK, 3, 139)
    assert windows.ids.tolist() == [_ids(TEXT) + [256] + _ids("xyz")] * 3


@pytest.mark.parametrize("nsamples", [0, -2, 1.0])
def test_calibration_bad_nsamples(nsamples: object) -> None:
    bound = "1 <= value <= 67,108,864"
    with pytest.raises(ValueError, match=rf"^nsamples: {nsamples!r} is .*; allowed: ({bound}|an integer|a number)$"):
        calibration_windows(CORPUS, TOK, nsamples, 8)  # type: ignore[arg-type]


def test_calibration_bad_seqlen_seed_and_short_text() -> None:
    with pytest.raises(ValueError, match=r"^seqlen: 1 is out of range; allowed: 2 <= value <= 67,108,864$"):
        calibration_windows(CORPUS, TOK, 4, 1)
    with pytest.raises(ValueError, match=r"^seed: None is invalid; allowed: an integer$"):
        calibration_windows(CORPUS, TOK, 4, 8, seed=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"split 'train' of toy has 139 tokens, fewer than one window of 140"):
        calibration_windows(CORPUS, TOK, 4, 140)


def test_windows_validates_shape() -> None:
    with pytest.raises(ValueError, match=r"ids must be an int64 tensor of shape \(n, 4\), got torch.int64 \(2, 3\)"):
        Windows(torch.zeros(2, 3, dtype=torch.long), 4, "test", "toy", "eval", None, 4)
    with pytest.raises(ValueError, match=r"kind='train' is invalid"):
        Windows(torch.zeros(2, 4, dtype=torch.long), 4, "test", "toy", "train", None, 4)


def test_calibration_windows_that_would_not_fit_are_refused_before_tokenizing(monkeypatch):
    import sensitivity.data.windows as module
    from sensitivity.data import byte_tokenizer, calibration_windows, load_corpus

    def never(*args, **kwargs):
        raise AssertionError("tokenized")

    monkeypatch.setattr(module, "tokenize_split", never)
    with pytest.raises(ValueError, match=r"^1000000 calibration windows of 512 tokens are 512,000,000 tokens; "
                                         r"at most 67,108,864 tokens of calibration windows \(windows x seqlen\) are "
                                         r"drawn$"):  # fmt: skip
        calibration_windows(load_corpus("sample"), byte_tokenizer(), 1_000_000, 512)

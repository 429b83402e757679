"""Tests for the offline byte-level tokenizer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sensitivity.data import BYTE_VOCAB_SIZE, byte_tokenizer
from sensitivity.data.tokenizer import bytes_to_unicode

TOKENIZER = byte_tokenizer()


def test_vocab_size_and_special_token() -> None:
    assert BYTE_VOCAB_SIZE == 257
    assert len(TOKENIZER) == BYTE_VOCAB_SIZE
    assert TOKENIZER.eos_token == "<|endoftext|>"
    assert TOKENIZER.eos_token_id == 256
    assert TOKENIZER.bos_token_id == TOKENIZER.unk_token_id == TOKENIZER.pad_token_id == 256
    assert sorted(TOKENIZER.get_vocab().values()) == list(range(257))


def test_id_equals_byte_value_for_every_byte() -> None:
    mapping = bytes_to_unicode()
    vocab = TOKENIZER.get_vocab()
    assert [vocab[mapping[b]] for b in range(256)] == list(range(256))
    text = bytes(range(256)).decode("latin-1")  # every code point 0..255
    assert TOKENIZER.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))


def test_no_special_tokens_added_by_default() -> None:
    assert TOKENIZER.encode("ab") == [97, 98]
    assert TOKENIZER("ab")["input_ids"] == [97, 98]


def test_deterministic_across_instances() -> None:
    other = byte_tokenizer()
    assert other.get_vocab() == TOKENIZER.get_vocab()
    assert other.encode("Grüße\n\tdu 😀") == TOKENIZER.encode("Grüße\n\tdu 😀")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text())
def test_round_trip_and_ids_are_utf8_bytes(text: str) -> None:
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    if "<|endoftext|>" not in text:
        assert ids == list(text.encode("utf-8"))
    assert TOKENIZER.decode(ids) == text


def test_eos_text_maps_to_special_id_and_round_trips() -> None:
    ids = TOKENIZER.encode("a<|endoftext|>b", add_special_tokens=False)
    assert ids == [97, 256, 98]
    assert TOKENIZER.decode(ids) == "a<|endoftext|>b"
    assert TOKENIZER.decode(ids, skip_special_tokens=True) == "ab"

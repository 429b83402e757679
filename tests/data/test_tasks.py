"""The built-in zero-shot tasks as data: the builder rebuilds the shipped files, item structure, the lm-eval encoder
and the gold-answer windows."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sensitivity.data import byte_tokenizer, load_corpus
from sensitivity.data.build_tasks import CHOICE_CONTEXT_WORDS, CHOICE_SPAN_WORDS, CLOZE_WORDS, build
from sensitivity.data.tasks import (
    BUILTIN_TASKS,
    encode_pair,
    task_items,
    task_pairs,
    task_path,
    task_texts,
    task_windows,
)
from sensitivity.tasks import TASKS_DIR

SHIPPED = ("README.md", "cloze/cloze.yaml", "cloze/cloze.jsonl", "choice/choice.yaml", "choice/choice.jsonl")


@pytest.fixture(scope="module")
def test_docs():
    return load_corpus("austen-kjv").documents("test")


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer whose merges cross word boundaries' spaces (' the', ' Lord')."""
    text = [" ".join(it["context"] for it in task_items("cloze")[:50])]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=alphabet))  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_builder_rebuilds_the_shipped_files_byte_for_byte(tmp_path, test_docs):
    written = build(tmp_path, documents=test_docs)
    assert sorted(written) == sorted(SHIPPED)
    for name in SHIPPED:
        assert (tmp_path / name).read_bytes() == (TASKS_DIR / name).read_bytes(), name
    assert sum((TASKS_DIR / n).stat().st_size for n in SHIPPED) < 1_000_000  # small enough to ship


def test_cloze_items_hold_their_target_earlier_and_come_from_the_test_split(test_docs):
    items = task_items("cloze")
    assert len(items) == 500 and len({it["id"] for it in items}) == 500
    for it in items:
        context, target = it["context"], it["target"]
        assert re.fullmatch(r"[A-Za-z]{3,}", target)
        assert re.search(rf"\b{target}\b", context), it["id"]  # the LAMBADA-like filter
        assert context == context.strip()
        assert CLOZE_WORDS[0] <= len(context.split()) + 1 <= CLOZE_WORDS[1]
        doc = test_docs[it["doc"]]
        passage = doc[it["start"] : it["start"] + len(context) + 1 + len(target)]
        assert passage == f"{context} {target}"
        assert re.match(r"[.!?]", doc[it["start"] + len(passage) :])  # the target ends a sentence
    # every sentence end is used at most once
    assert len({(it["doc"], it["start"] + len(it["context"])) for it in items}) == 500


def test_choice_items_have_four_choices_of_equal_length_and_the_true_continuation(test_docs):
    items = task_items("choice")
    assert len(items) == 500
    golds = [it["gold"] for it in items]
    assert set(golds) == {0, 1, 2, 3} and max(golds.count(g) for g in range(4)) < 0.35 * 500
    spans = {}
    for it in items:
        choices, gold = it["choices"], it["gold"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= gold < 4
        n = len(choices[0].split())
        assert CHOICE_SPAN_WORDS[0] <= n <= CHOICE_SPAN_WORDS[1]
        assert all(len(c.split()) == n for c in choices)
        assert CHOICE_CONTEXT_WORDS[0] <= len(it["context"].split()) <= CHOICE_CONTEXT_WORDS[1]
        doc = test_docs[it["doc"]]
        end = it["start"] + len(it["context"])
        assert doc[it["start"] : end] == it["context"] and re.search(r"[.!?][\"')\]]*$", it["context"])
        assert " ".join(doc[end:].split()[:n]) == choices[gold]  # the words that follow the context
        spans.setdefault(it["doc"], []).append((it["start"], end))
    for ranges in spans.values():  # contexts never overlap
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


def test_shipped_yamls_name_their_data():
    for name in BUILTIN_TASKS:
        text = task_path(name, ".yaml").read_text()
        assert f"task: sensitivity_{name}\n" in text and f"test: {name}.jsonl\n" in text
        assert json.loads(task_path(name).read_text().splitlines()[0])["id"] == f"{name}-0000"


@pytest.mark.parametrize("bad", ["lambada", "Cloze", "", "../cloze"])
def test_unknown_task_names_are_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=r"is not a built-in task; allowed: cloze, choice$"):
        task_items(bad)
    with pytest.raises(ValueError, match="allowed: cloze, choice"):
        task_windows(bad, byte_tokenizer())


def test_task_texts_follow_the_yamls():
    cloze, choice = task_items("cloze")[0], task_items("choice")[0]
    assert task_texts("cloze", cloze) == (cloze["context"], [" " + cloze["target"]], 0)
    assert task_texts("choice", choice) == (choice["context"], [" " + c for c in choice["choices"]], choice["gold"])


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding(bpe):
    tok = byte_tokenizer()
    assert encode_pair(tok, "ab ", "c") == ([97, 98], [32, 99])
    assert encode_pair(tok, "ab", " c") == ([97, 98], [32, 99])
    assert encode_pair(tok, "", "c") == ([tok.eos_token_id], [99])  # empty context: the eos (no bos) prefix
    with pytest.raises(ValueError, match="only whitespace"):
        encode_pair(tok, "  ", "c")
    # BPE: the continuation is the whole encoding after the context's tokens, even when a merge spans the boundary
    context, continuation = "and the", " Lord"
    ctx, cont = encode_pair(bpe, context, continuation)
    whole = bpe.encode(context + continuation)
    assert ctx == bpe.encode(context) and ctx + cont == whole


def test_task_windows_hold_each_item_and_label_only_the_gold_answer(bpe):
    for tok in (byte_tokenizer(), bpe):
        for name in BUILTIN_TASKS:
            w = task_windows(name, tok, max_items=6)
            pairs = task_pairs(name, tok, max_items=6)
            assert (w.kind, w.stride, w.seed, w.split, w.source, len(w)) == ("eval", 0, None, "test", "austen-kjv", 6)
            assert w.seqlen == max(len(p[g][0]) + len(p[g][1]) for p, g in pairs)
            for i, (item_pairs, gold) in enumerate(pairs):
                ctx, cont = item_pairs[gold]
                n = len(ctx) + len(cont)
                assert w.ids[i, :n].tolist() == ctx + cont
                assert (w.ids[i, n:] == tok.eos_token_id).all()
                assert w.labels[i, len(ctx) : n].tolist() == cont
                assert (w.labels[i, : len(ctx)] == -100).all() and (w.labels[i, n:] == -100).all()
            assert f"6 {name} items" in w.describe()
    byte = byte_tokenizer()
    w = task_windows("cloze", byte, max_items=1)
    target = " " + task_items("cloze")[0]["target"]
    assert bytes(w.targets()[w.targets() != -100].tolist()).decode() == target
    assert torch.equal(task_windows("cloze", byte, max_items=3).ids, task_windows("cloze", byte, max_items=3).ids)


def test_max_items_is_checked():
    with pytest.raises(ValueError, match="max_items: 0 is invalid"):
        task_pairs("cloze", byte_tokenizer(), max_items=0)

"""Recall items: the stated structure, determinism, pools and errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from sensitivity.core.zoo import zoo_path
from sensitivity.data import byte_tokenizer
from sensitivity.data.recall import IGNORE, POOL_SIZE, recall_items, recall_pools


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(zoo_path("default")))


def test_items_have_the_stated_structure(tok):
    keys, values = recall_pools(tok)
    items = recall_items(tok, 6, 5, seed=3)
    P = 6
    assert items.ids.shape == (5, 1 + 4 * P)
    for n in range(5):
        ids = items.ids[n]
        assert ids[0] == tok.eos_token_id
        ctx_k, ctx_v = ids[1 : 1 + 2 * P : 2], ids[2 : 2 + 2 * P : 2]
        assert len(set(ctx_k.tolist())) == P  # distinct keys
        assert torch.isin(ctx_k, keys).all() and torch.isin(ctx_v, values).all()
        pair = dict(zip(ctx_k.tolist(), ctx_v.tolist()))
        q_k, q_v = ids[1 + 2 * P :: 2], ids[2 + 2 * P :: 2]
        assert sorted(q_k.tolist()) == sorted(ctx_k.tolist())  # every key queried once
        assert [pair[k] for k in q_k.tolist()] == q_v.tolist()  # each followed by its value
        for j in range(P):
            pos = int(items.query_pos[n, j])
            assert ids[pos] == q_k[j] and items.answers[n, j] == q_v[j]
            assert items.labels[n, pos + 1] == q_v[j]
            value_pos = 2 + 2 * ctx_k.tolist().index(int(q_k[j]))
            assert items.distance[n, j] == pos - value_pos
        assert int((items.labels[n] != IGNORE).sum()) == P


def test_items_are_deterministic_and_seeded(tok):
    a, b, c = (recall_items(tok, 8, 4, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.ids, b.ids) and a.sha256() == b.sha256()
    assert not torch.equal(a.ids, c.ids)


def test_pools_are_disjoint_word_tokens(tok):
    keys, values = recall_pools(tok)
    assert len(keys) == len(values) == POOL_SIZE
    assert not set(keys.tolist()) & set(values.tolist())
    assert all(tok.decode([k]).startswith(" ") and tok.decode([k])[1:].isalpha() for k in keys.tolist())


def test_byte_vocabularies_use_letters_and_digits():
    keys, values = recall_pools(byte_tokenizer())
    assert len(keys) == len(values) == 31  # 62 ASCII letters and digits, split in two
    assert all(chr(k).isalnum() for k in keys.tolist())


def test_gap_is_filler_text_and_moves_the_queries(tok):
    filler = torch.arange(1000, 1500)
    items = recall_items(tok, 3, 2, gap=10, filler=filler, seed=0)
    gap = items.ids[:, 7:17]  # (N, 10): after eos and 3 pairs
    assert ((gap[:, 1:] - gap[:, :-1]) == 1).all() and (gap >= 1000).all()
    assert (items.query_pos[:, 0] == 17).all()
    assert items.windows().describe().startswith("2 recall items of 3 pairs, gap 10")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_pairs": 0}, "n_pairs=0 is invalid; allowed: 1..256"),
    ({"n_pairs": 257}, "n_pairs=257 is invalid"),
    ({"n_items": 0}, "n_items=0 is invalid"),
    ({"gap": 5}, "gap=5 is invalid"),
])  # fmt: skip
def test_bad_arguments_name_the_value(tok, kwargs, message):
    args = {"n_pairs": 4, "n_items": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        recall_items(tok, **args)

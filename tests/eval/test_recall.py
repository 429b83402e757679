"""Recall accuracy and per-position NLL against plain HF forwards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sensitivity.core import load_model
from sensitivity.data import load_corpus, tokenize_split
from sensitivity.data.recall import recall_items
from sensitivity.eval.recall import position_nll, recall_accuracy, recall_rows


@pytest.fixture(scope="module")
def lm(one_thread):
    return load_model("tiny:mamba2")


def test_recall_accuracy_is_the_argmax_at_each_query_key(lm):
    df = recall_accuracy(lm, lm.tokenizer, pairs=(3, 5), items=6, seed=2, batch_size=4, show_progress=False)
    assert len(df) == 6 * 3 + 6 * 5 and set(df.pairs) == {3, 5}
    for p in (3, 5):
        items = recall_items(lm.tokenizer, p, 6, seed=2)
        with torch.no_grad():
            logits = lm.model(input_ids=items.ids, use_cache=False).logits.float()  # (N, L, V)
        part = df[df.pairs == p]
        for n in range(6):
            for j in range(p):
                at = logits[n, items.query_pos[n, j]]
                row = part[(part["item"] == n) & (part["query_index"] == j)].iloc[0]
                assert bool(row.correct) == (int(at.argmax()) == int(items.answers[n, j]))
                assert row.nll == pytest.approx(-float(F.log_softmax(at, -1)[items.answers[n, j]]), rel=1e-5)
                assert row.distance == int(items.distance[n, j])


def test_recall_accuracy_can_be_perfect_for_a_copying_model(lm):
    """A stand-in model whose logits put each answer on top at its query key scores 1.0, with stderr 0."""

    class Oracle(torch.nn.Module):
        def __init__(self, items):
            super().__init__()
            self.items, self.w = items, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            V = 300
            logits = torch.zeros(*input_ids.shape, V)
            for n in range(input_ids.shape[0]):
                row = [i for i in range(len(self.items.ids)) if torch.equal(self.items.ids[i], input_ids[n])][0]
                for j, pos in enumerate(self.items.query_pos[row].tolist()):
                    logits[n, pos, self.items.answers[row, j]] = 5.0
            return type("Out", (), {"logits": logits})()

    items = recall_items(lm.tokenizer, 4, 3, seed=0)
    df = recall_accuracy(Oracle(items), lm.tokenizer, pairs=(4,), items=3, seed=0, show_progress=False)
    assert df.correct.all()
    rows = recall_rows(df)
    assert rows == [{"task": "recall", "metric": "acc@pairs=4", "value": 1.0, "stderr": 0.0, "n": 12}]


def test_recall_rows_by_distance_bins(lm):
    df = recall_accuracy(lm, lm.tokenizer, pairs=(8,), items=4, seed=0, show_progress=False)
    rows = recall_rows(df, by="distance")
    assert sum(r["n"] for r in rows) == 32
    for r in rows:
        assert r["stderr"] == pytest.approx(math.sqrt(r["value"] * (1 - r["value"]) / (r["n"] - 1)))


def test_position_nll_is_the_mean_over_windows_per_position(lm):
    corpus = load_corpus("sample")
    df = position_nll(lm, lm.tokenizer, seqlen=64, windows=3, corpus=corpus, bins=7, show_progress=False)
    stream = tokenize_split(corpus, lm.tokenizer, "test")
    with torch.no_grad():
        ids = stream[: 3 * 64].view(3, 64)
        logits = lm.model(input_ids=ids, use_cache=False).logits.float()[:, :-1]
    per_pos = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(0)  # (63,)
    assert df.start.iloc[0] == 1 and df.stop.iloc[-1] == 64 and (df.windows == 3).all()
    for r in df.itertuples():
        assert r.nll == pytest.approx(float(per_pos[r.start - 1 : r.stop - 1].mean()), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window of 1000000"):
        position_nll(lm, lm.tokenizer, seqlen=1_000_000, corpus=corpus, show_progress=False)

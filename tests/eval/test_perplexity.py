"""Perplexity and KL against hand computations on a model with known next-token distributions."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sensitivity.data import Windows
from sensitivity.eval import kl_divergence, perplexity


class Unigram(nn.Module):
    """Predicts the same distribution ``probs`` at every position, whatever the input."""

    def __init__(self, probs):
        super().__init__()
        self.logits = nn.Parameter(torch.log(torch.tensor(probs, dtype=torch.float32)))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def _windows(rows):
    ids = torch.tensor(rows)
    return Windows(
        ids=ids, seqlen=ids.shape[1], split="test", source="hand", kind="eval", seed=None, stride=ids.shape[1]
    )


def test_perplexity_matches_hand_computation():
    probs = [0.5, 0.25, 0.125, 0.125]
    windows = _windows([[0, 1, 2, 3], [3, 3, 0, 1], [2, 0, 0, 0]])
    # Scored targets are every token but the first of each window.
    targets = [1, 2, 3, 3, 0, 1, 0, 0, 0]
    nll = -sum(math.log(probs[t]) for t in targets) / len(targets)
    for batch_size in (1, 2, 8):
        result = perplexity(Unigram(probs), windows, batch_size=batch_size, show_progress=False)
        assert result.tokens == 9 and result.windows == 3 and result.seqlen == 4
        assert result.nll == pytest.approx(nll, rel=1e-6)
        assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    assert "3 non-overlapping windows of 4 tokens (stride 4) from split 'test' of hand" in result.definition
    assert "3 next-token predictions are scored per window (9 in total)" in result.definition


def test_kl_matches_hand_computation_and_is_zero_for_itself():
    p, q = [0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]
    windows = _windows([[0, 1, 2], [3, 2, 1]])
    expected = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))  # KL(reference=q || model=p)
    result = kl_divergence(Unigram(p), Unigram(q), windows, show_progress=False)
    assert result.kl == pytest.approx(expected, rel=1e-6)
    assert result.tokens == 4
    assert kl_divergence(Unigram(p), Unigram(p), windows, show_progress=False).kl == pytest.approx(0.0, abs=1e-7)


def test_perplexity_of_a_real_model_is_batch_invariant():
    from sensitivity import eval_windows, load_corpus, load_model

    lm = load_model("tiny:mamba")
    windows = eval_windows(load_corpus("sample"), lm.tokenizer, 64, max_windows=5)
    a = perplexity(lm, windows, batch_size=1, show_progress=False)
    b = perplexity(lm, windows, batch_size=5, show_progress=False)
    assert a.nll == pytest.approx(b.nll, rel=1e-5)
    assert 100 < a.perplexity < 1000  # an untrained model over 257 symbols is near uniform


def test_errors():
    windows = _windows([[0, 1]])
    with pytest.raises(ValueError, match="^batch_size: 0 is out of range; allowed: 1 <= value <= 67,108,864$"):
        perplexity(Unigram([0.5, 0.5]), windows, batch_size=0)
    with pytest.raises(ValueError, match="vocabularies differ: model gives 2 logits, reference 3"):
        kl_divergence(Unigram([0.5, 0.5]), Unigram([0.2, 0.3, 0.5]), windows, show_progress=False)

"""The shipped models: files, cards, loading paths and their measured test perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sensitivity import load_model
from sensitivity.data import eval_windows, load_corpus, tokenize_split
from sensitivity.eval import perplexity
from sensitivity.zoo import ZOO_MODELS, list_models, zoo_path

SHIPPED = ("default", "default-mamba1", "default-hybrid", "recall")


def test_zoo_lists_the_models_within_the_size_budget():
    models = list_models()
    assert [m.name for m in models] == list(SHIPPED)
    assert [m.card["arch"] for m in models] == ["mamba2", "mamba", "bamba", "mamba2"]
    assert sum(m.size_mb for m in models) <= 55.0
    assert next(m for m in models if m.name == "default-hybrid").size_mb <= 15.0
    for m in models:
        assert 5e6 <= m.card["parameters"] <= 10e6
        if "init" not in m.card:  # trained from scratch: more than one epoch
            assert m.card["tokens_seen"] > m.card["train_tokens_in_split"]
        log = [json.loads(line) for line in (m.path / "training_log.jsonl").read_text().splitlines()]
        # the shipped checkpoint is the best by validation loss (plus the recall loss for a recall model)
        best = min(log, key=lambda r: r["val_loss"] + r.get("recall_nll", 0.0))
        assert (best["step"], best["tokens"]) == (m.card["best_step"], m.card["tokens_seen"])
        assert log[-1]["tokens"] == m.card["tokens_total"]
        readme = (m.path / "README.md").read_text()
        assert f"**{m.card['test_perplexity']:.2f}**" in readme and m.card["command"] in readme


def test_quality_bar_recorded_in_the_cards():
    cards = {m.name: m.card for m in list_models()}
    assert cards["default"]["test_perplexity"] <= 65.0
    assert cards["default-mamba1"]["test_perplexity"] <= 85.0
    assert cards["default-hybrid"]["test_perplexity"] <= 62.0  # within 5% of the Mamba-2 default's 59.01
    assert "windows of 512 tokens (stride 512) from split 'test' of austen-kjv" in cards["default"]["test_definition"]
    # the recall model: text within 10% of default's, and it recalls at numbers of pairs its state holds
    assert cards["recall"]["test_perplexity"] <= 1.1 * cards["default"]["test_perplexity"]
    assert all(cards["recall"]["recall_accuracy"][p] >= 0.9 for p in ("4", "8", "16", "32"))


def test_names_and_errors():
    assert zoo_path("default-mamba2") == zoo_path("default")
    assert set(ZOO_MODELS) >= set(SHIPPED)
    with pytest.raises(ValueError, match=r"unknown zoo model 'nope'; allowed: default, default-mamba2"):
        zoo_path("nope")


def test_plain_transformers_loads_the_shipped_checkpoint_in_float32():
    path = zoo_path("default")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size == 8192
    assert tokenizer.decode(tokenizer("It is a truth universally acknowledged")["input_ids"]) == (
        "It is a truth universally acknowledged"
    )
    lm = load_model()  # no argument: the default
    assert lm.name == "default" and lm.arch == "mamba2"
    ids = torch.tensor([tokenizer("My dear Mr. Bennet, said his lady to him one day")["input_ids"]])
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        ours = lm.model(ids, use_cache=False).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_corpus_has_two_million_tokens_with_the_zoo_tokenizer():
    corpus = load_corpus("default")
    tokenizer = AutoTokenizer.from_pretrained(zoo_path("default"))
    total = sum(tokenize_split(corpus, tokenizer, split).numel() for split in ("train", "validation", "test"))
    assert total >= 2_000_000


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_test_perplexity_matches_the_card(name):
    lm = load_model(name)
    card = json.loads((zoo_path(name) / "card.json").read_text())
    windows = eval_windows(load_corpus("default"), lm.tokenizer, 512, split="test")
    result = perplexity(lm, windows, show_progress=False)
    assert result.perplexity == pytest.approx(card["test_perplexity"], rel=0.01)
    assert result.definition == card["test_definition"]

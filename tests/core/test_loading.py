"""load_model: built-in tiny models, local checkpoints, and clear errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sensitivity.core import load_model


def test_tiny_models_are_deterministic_and_have_a_tokenizer(ids):
    a, b = load_model("tiny:mamba2"), load_model("tiny:mamba2")
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), n
    assert a.tokenizer.decode(a.tokenizer("In the beginning")["input_ids"]) == "In the beginning"
    assert a.model.config.vocab_size == len(a.tokenizer)
    assert not a.model.training


def test_local_checkpoint_round_trip(tmp_path, ids, monkeypatch):
    lm = load_model("tiny:falcon-mamba")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    assert again.arch == "falcon_mamba" and again.tokenizer is not None
    monkeypatch.chdir(tmp_path.parent)
    relative = load_model(tmp_path.name)  # loads again from another directory (a Ray worker's): absolute source
    assert relative.name == tmp_path.name and relative.source["name"] == str(tmp_path)
    assert load_model("tiny:mamba").source["name"] == "tiny:mamba"
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids, use_cache=False).logits, lm.model(ids, use_cache=False).logits)


def test_bfloat16_and_uninstrumented():
    lm = load_model("tiny:mamba", dtype="bfloat16", instrument=False)
    assert lm.dtype == torch.bfloat16
    assert "hook_points" not in dict(lm.model.backbone.layers[0].mixer.named_children())


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown built-in model 'tiny:gpt'; allowed: tiny:mamba, tiny:mamba2"):
        load_model("tiny:gpt")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; allowed: float32, bfloat16, float16"):
        load_model("tiny:mamba", dtype="fp8")
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="does not exist; allowed: a checkpoint directory"):
        load_model(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load model 'state-spaces/nothing-here'.*HF_HUB_OFFLINE"):
        load_model("state-spaces/nothing-here")
    llama = tmp_path / "llama"
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(llama)
    with pytest.raises(ValueError, match="config.json has model_type 'llama'; allowed model types: mamba, mamba2"):
        load_model(llama)

"""What the package's extras promise to install."""

import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _extra(name: str) -> list[str]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"][name]


def test_eval_extra_brings_what_lm_eval_hf_model_needs():
    # lm-eval's HFLM imports accelerate, which lm-eval itself declares only under its own [hf] extra
    spec = " ".join(_extra("eval"))
    assert "lm-eval[hf]" in spec or "accelerate" in spec


def test_lm_eval_hf_model_scores_a_tiny_model_like_our_forward():
    pytest.importorskip("lm_eval")
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from sensitivity import load_model

    lm = load_model("tiny:mamba2")
    model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, max_length=64, batch_size=1)
    context, continuation = "In the beginning", " God"
    request = Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    ((logprob, _),) = model.loglikelihood([request], disable_tqdm=True)
    ids = torch.tensor([lm.tokenizer.encode(context + continuation)])
    n = len(lm.tokenizer.encode(continuation))
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids, use_cache=False).logits[0, :-1].float(), -1)
    expected = logp[-n:].gather(-1, ids[0, -n:, None]).sum().item()
    assert logprob == pytest.approx(expected, abs=1e-4)

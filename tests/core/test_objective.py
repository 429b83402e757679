"""Task objectives: labelled windows are scored on their answers only, by every path that computes a loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sensitivity.core import load_model
from sensitivity.core.objective import TaskOptions, objective_windows
from sensitivity.core.runner import LayerRunner
from sensitivity.core.spec import SpecError
from sensitivity.core.stats import window_gradients, window_objective
from sensitivity.data import Windows
from sensitivity.data.objective import parse_task, task_windows
from sensitivity.eval import kl_divergence, perplexity


@pytest.fixture(scope="module", params=["tiny:mamba2", "tiny:mamba", "tiny:bamba"])
def lm(request, one_thread):
    return load_model(request.param)


def _answer_nll(model, windows: Windows) -> float:
    """Mean NLL of the labelled tokens from a plain HF forward (independent of the package's loss code)."""
    total, count = 0.0, 0
    for n in range(len(windows)):
        logp = F.log_softmax(model(input_ids=windows.ids[n : n + 1], use_cache=False).logits.float()[0], -1)
        for t in range(1, windows.seqlen):
            label = int(windows.labels[n, t])
            if label != -100:
                total, count = total - float(logp[t - 1, label]), count + 1
    return total / count


def test_task_windows_score_only_the_answers(lm):
    w = task_windows("recall:3", lm.tokenizer, items=4, seed=1)
    assert w.labels is not None and int((w.targets() != -100).sum()) == 12
    with torch.no_grad():
        expected = _answer_nll(lm.model, w)
        ppl = perplexity(lm, w, batch_size=3, show_progress=False)
        run = LayerRunner(lm, w, batch_size=3)
        stream = run.stream()
        from_start, _ = run.loss(stream[0], 0)
        from_mid, _ = run.loss(stream[1], 1)
    assert ppl.tokens == 12 and "answer tokens" in ppl.definition
    assert ppl.nll == pytest.approx(expected, rel=1e-5)
    assert from_start == pytest.approx(expected, rel=1e-5) and from_mid == pytest.approx(expected, rel=1e-5)
    assert run.mean_nll(run.logprobs(stream[-1])) == pytest.approx(expected, rel=1e-5)


def test_kl_is_over_the_answers(lm):
    w = task_windows("recall:2", lm.tokenizer, items=3, seed=0)
    other = load_model(lm.name, dtype="float32")
    with torch.no_grad():
        other.model.get_input_embeddings().weight.mul_(1.1)
        kl = kl_divergence(other, lm, w, show_progress=False)
        p = F.log_softmax(other.model(input_ids=w.ids, use_cache=False).logits.float()[:, :-1], -1)
        q = F.log_softmax(lm.model(input_ids=w.ids, use_cache=False).logits.float()[:, :-1], -1)
    mask = w.targets() != -100
    expected = (q.exp() * (q - p)).sum(-1)[mask].mean().item()
    assert kl.tokens == int(mask.sum()) and kl.kl == pytest.approx(expected, rel=1e-4)


def test_window_objective_and_gradients_use_the_labels():
    lm = load_model("tiny:mamba2")
    w = task_windows("recall:3", lm.tokenizer, items=2, seed=4)
    logits = lm.model(input_ids=w.ids, use_cache=False).logits  # (B, L, V)
    logp = F.log_softmax(logits.float()[:, :-1], -1)
    mask = w.targets() != -100
    token = logp.gather(-1, w.targets().clamp(min=0)[..., None])[..., 0] * mask  # (B, L-1)
    torch.testing.assert_close(window_objective(logits, w.ids, "logprob", w.labels), token.sum(1))
    torch.testing.assert_close(window_objective(logits, w.ids, "loss", w.labels), -token.sum(1) / mask.sum(1))
    param = lm.model.get_output_embeddings().weight
    stats = window_gradients(lm, w, {"head": param}, objective="loss", show_progress=False)["head"]
    lm.model.zero_grad()
    manual = torch.zeros_like(param)
    for n in range(2):
        out = lm.model(input_ids=w.ids[n : n + 1], use_cache=False).logits
        (g,) = torch.autograd.grad(window_objective(out, w.ids[n : n + 1], "loss", w.labels[n : n + 1]).sum(), param)
        manual += g
    torch.testing.assert_close(stats.sum, manual, rtol=1e-4, atol=1e-6)


def test_text_objective_keeps_the_stage_windows():
    lm = load_model("tiny:mamba2")
    text = Windows(ids=torch.zeros(1, 4, dtype=torch.long), seqlen=4, split="t", source="s", kind="eval", seed=None,
                   stride=4)  # fmt: skip
    assert objective_windows(TaskOptions(), lm.tokenizer, text) is text
    got = objective_windows(TaskOptions(task="recall:2", task_items=3), lm.tokenizer, text)
    assert got.labels is not None and len(got) == 3


@pytest.mark.parametrize(("task", "message"), [
    ("recal", "unknown task 'recal'; allowed: text, cloze, choice, recall or recall:P"),
    ("recall:0", "'recall:0' has 0 pairs; need at least 1"),
    ("recall:x", "unknown task 'recall:x'"),
])  # fmt: skip
def test_bad_task_names_are_one_line_errors(task, message):
    with pytest.raises(ValueError, match=message):
        parse_task(task)
    with pytest.raises(SpecError, match="task: " + message.split(";")[0].replace("(", r"\(")):
        TaskOptions(task=task)


def test_labels_are_checked():
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must be an int64 tensor shaped like ids"):
        Windows(ids=ids, seqlen=5, split="t", source="s", kind="eval", seed=None, stride=0, labels=ids[:, :4])
    with pytest.raises(ValueError, match="labels score no position"):
        Windows(ids=ids, seqlen=5, split="t", source="s", kind="eval", seed=None, stride=0,
                labels=torch.full_like(ids, -100))  # fmt: skip

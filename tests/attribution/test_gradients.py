"""Per-window gradients against closed forms (a bigram model) and plain autograd (tiny Mambas)."""

from functools import reduce
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.attribution import attribute
from sensitivity.core import load_model
from sensitivity.core.scores import gblm_score, input_norm, taylor_score
from sensitivity.core.stats import grad_state, window_gradients, window_objective

V = 5


class Bigram(nn.Module):
    """``logits[b, t] = W[:, ids[b, t]]``: a linear layer on the one-hot current token."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(3)))  # (out, in)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.weight.t()[input_ids])  # (B, L, V)


def _closed_form_grad(W: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d(mean next-token CE)/dW for one window: mean_t (softmax(W[:, x_t]) - e_{y_t}) e_{x_t}^T."""
    g = torch.zeros(V, V, dtype=torch.float64)
    W = W.detach().double()
    for x, y in zip(ids[:-1].tolist(), ids[1:].tolist()):
        p = torch.softmax(W[:, x], 0)
        p[y] -= 1.0
        g[:, x] += p
    return g / (len(ids) - 1)


def test_bigram_gradients_and_scores_match_closed_form(make_windows):
    model = Bigram()
    windows = make_windows(4, 9, seed=1, vocab=V)
    stats = window_gradients(model, windows, {"W": model.weight}, show_progress=False)["W"]
    per_window = [_closed_form_grad(model.weight, ids) for ids in windows.ids]  # g_k, (V, V) each
    g_mean = sum(per_window) / 4
    g_sq = sum(g * g for g in per_window)
    assert stats.count == 4
    torch.testing.assert_close(stats.mean.double(), g_mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.sumsq.double(), g_sq, rtol=1e-5, atol=1e-7)

    W = model.weight.detach().double()
    torch.testing.assert_close(taylor_score(model.weight, stats.mean).double(), (W * g_mean).abs(), rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    # Input of the linear map is the one-hot current token: ||X_j||^2 = (times token j is an input) / windows.
    counts = torch.bincount(windows.ids.flatten(), minlength=V).double()
    x_norm = (counts / 4).sqrt()
    expected = W.abs() * x_norm[None, :] + 100.0 * W.abs() * g_sq.sqrt()
    got = gblm_score(model.weight, input_norm(counts, 4), stats.l2, alpha=100.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_logprob_objective_flips_sign_and_scales(make_windows):
    model = Bigram()
    windows = make_windows(2, 7, seed=2, vocab=V)
    loss = window_gradients(model, windows, {"W": model.weight}, show_progress=False)["W"]
    logprob = window_gradients(model, windows, {"W": model.weight}, objective="logprob", show_progress=False)["W"]
    torch.testing.assert_close(logprob.sum, -6.0 * loss.sum)  # L - 1 = 6 scored positions
    torch.testing.assert_close(logprob.sumsq, 36.0 * loss.sumsq)


def test_window_objective_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))  # (1, 3, 3)
    ids = torch.tensor([[2, 1, 0]])  # targets 1 (p=0.25) then 0 (p=0.1)
    lp = torch.log(torch.tensor(0.25)) + torch.log(torch.tensor(0.1))
    torch.testing.assert_close(window_objective(logits, ids, "logprob"), lp.view(1))
    torch.testing.assert_close(window_objective(logits, ids, "loss"), -lp.view(1) / 2)
    with pytest.raises(ValueError, match="unknown objective 'nll'; allowed: loss, logprob"):
        window_objective(logits, ids, "nll")


def test_grad_state_restores_everything_even_on_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 2))
    model.train()
    model[1].eval()
    model[0].bias.requires_grad_(False)
    old_grad = torch.full_like(model[2].weight, 7.0)
    model[2].weight.grad = old_grad
    with pytest.raises(ZeroDivisionError):
        with grad_state(model, [model[0].weight]):
            assert not model.training and torch.is_grad_enabled()
            assert [p.requires_grad for p in model.parameters()] == [True, False, False, False]
            assert all(p.grad is None for p in model.parameters())
            model(torch.ones(1, 3)).sum().backward()
            raise ZeroDivisionError
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
    assert model[2].weight.grad is old_grad and torch.equal(old_grad, torch.full_like(old_grad, 7.0))
    assert model[0].weight.grad is None
    assert model.training and model[0].training and not model[1].training


def _autograd_taylor_fisher(lm, windows, layer, name):
    """Independent: HF's own loss (labels=ids), torch.autograd.grad per window, sliced by hand."""
    mixer = lm.registry.mixer(lm.model, layer)
    slices = lm.registry.component(name).tensors
    params = [reduce(getattr, t.param.split("."), mixer) for t in slices]
    grads = []
    for ids in windows.ids:
        loss = lm.model(input_ids=ids[None], labels=ids[None], use_cache=False).loss
        grads.append(torch.autograd.grad(loss, params))
    taylor, fisher = 0.0, 0.0
    for i, (t, p) in enumerate(zip(slices, params)):
        rows = slice(*t.rows) if t.rows else slice(None)
        g_mean = sum(g[i] for g in grads)[rows] / len(grads)
        taylor += (p.detach()[rows] * g_mean).abs().sum().item()
        fisher += sum(g[i][rows] ** 2 for g in grads).sum().item()
    return taylor, fisher


@pytest.mark.parametrize("name,layer,component", [("tiny:mamba2", 1, "x"), ("tiny:mamba2", 0, "dt"),
                                                  ("tiny:mamba", 1, "dt"), ("tiny:mamba", 0, "A_log")])  # fmt: skip
def test_taylor_and_fisher_sums_match_autograd(name, layer, component, make_windows):
    lm = load_model(name)
    windows = make_windows(3, 20, seed=4)
    df = attribute(lm, windows, methods=["taylor", "fisher"], layers=[layer], components=[component],
                   show_progress=False)  # fmt: skip
    got = df.set_index(["kind", "metric"])["value"]
    taylor, fisher = _autograd_taylor_fisher(lm, windows, layer, component)
    assert taylor > 0 and fisher > 0
    assert got["taylor", "sum"] == pytest.approx(taylor, rel=1e-4)
    assert got["fisher", "sum"] == pytest.approx(fisher, rel=1e-4)
    n = sum(t.get(lm.registry.mixer(lm.model, layer)).numel() for t in lm.registry.component(component).tensors)
    assert got["taylor", "mean"] == pytest.approx(taylor / n, rel=1e-4)


def test_attribute_restores_requires_grad_grads_and_removes_hooks(make_windows):
    lm = load_model("tiny:mamba")
    params = list(lm.model.parameters())
    params[3].requires_grad_(False)
    sentinel = torch.ones_like(params[5])
    params[5].grad = sentinel
    before = [p.requires_grad for p in params]
    values = [p.detach().clone() for p in params]
    attribute(lm, make_windows(2, 12), methods=["taylor", "gblm", "grad_x_act"], show_progress=False)
    assert [p.requires_grad for p in params] == before
    assert params[5].grad is sentinel and torch.equal(sentinel, torch.ones_like(sentinel))
    assert all(p.grad is None for i, p in enumerate(params) if i != 5)
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert not lm.model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_failure_inside_captum_restores_state(monkeypatch, make_windows):
    import sensitivity.attribution.captum_methods as cm

    lm = load_model("tiny:mamba2")

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cm, "window_objective", boom)
    with pytest.raises(RuntimeError, match="boom"):
        attribute(lm, make_windows(2, 12), methods=["grad_x_act"], show_progress=False)
    assert all(p.requires_grad and p.grad is None for p in lm.model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_hf_loss_is_our_loss_objective(make_windows):
    lm = load_model("tiny:mamba2")
    ids = make_windows(2, 10).ids
    with torch.no_grad():
        logits = lm.model(input_ids=ids, use_cache=False).logits
        ours = window_objective(logits, ids, "loss")
        ref = torch.stack([F.cross_entropy(logits[b, :-1], ids[b, 1:]) for b in range(2)])
    torch.testing.assert_close(ours, ref)

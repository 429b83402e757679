"""Pure dynamics functions: hand-made tensors, and the state recurrence against the model's own scan."""

from __future__ import annotations

import math

import pytest
import torch

from sensitivity.core import capture, load_model
from sensitivity.explain.dynamics import (
    decay,
    gate_closed_share,
    memory_length,
    outlier_share,
    ssm_states,
    summary_stats,
)


def test_decay_and_memory_length_by_hand():
    dt = torch.tensor([[[0.5, 0.25]]])  # (B=1, L=1, H=2)
    A = torch.tensor([-2.0, -4.0])  # (H,)
    d = decay(dt, A)
    assert torch.allclose(d, torch.full((1, 1, 2), math.exp(-1.0)))
    assert torch.allclose(memory_length(d), torch.ones(1, 1, 2))
    # Mamba-1: A (ED, N) broadcasts over the state
    d1 = decay(torch.tensor([[[1.0]]]), torch.tensor([[-1.0, -2.0]]))
    assert d1.shape == (1, 1, 1, 2) and torch.allclose(d1[0, 0, 0], torch.tensor([math.exp(-1), math.exp(-2)]))
    assert torch.isinf(memory_length(torch.ones(1))).all()


def test_gate_and_outlier_shares_by_hand():
    z = torch.tensor([-10.0, -3.0, -2.0, 0.0, 5.0])  # sigmoid < 0.05 only for -10 and -3
    assert gate_closed_share(z) == pytest.approx(2 / 5)
    a = torch.tensor([1.0] * 19 + [100.0])  # mean |a| = 5.95; only 100 exceeds 5x that
    assert outlier_share(a) == pytest.approx(1 / 20)


def test_summary_stats_ignores_non_finite_and_matches_torch():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, float("inf")])
    s = summary_stats(x)
    assert s["mean"] == pytest.approx(2.5) and s["median"] == pytest.approx(2.5)
    assert s["p10"] == pytest.approx(torch.quantile(x[:4], 0.1).item())
    assert math.isnan(summary_stats(torch.tensor([float("nan")]))["mean"])


@pytest.mark.parametrize("name", ["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba"])
def test_state_recurrence_reproduces_the_scan_output(name, ids):
    """y_t = C_t·h_t + D·u_t from ssm_states equals the instrumented forward's y hook (an independent path)."""
    lm = load_model(name)
    points = ["u", "dt", "A", "B", "C", "y"]
    with capture(lm, [f"layers.1.{p}" for p in points]) as acts:
        lm.model(ids, use_cache=False)
    a = {p: acts[f"layers.1.{p}"][0] for p in points}
    norms, y = ssm_states(a["u"], a["dt"], a["A"], a["B"], a["C"])
    D = lm.registry.mixer(lm.model, 1).D.detach().float()
    skip = a["u"] * (D.repeat_interleave(a["u"].shape[-1] // D.numel()) if D.dim() == 1 else D)
    assert torch.allclose(y + skip, a["y"], atol=1e-4, rtol=1e-4)
    assert norms.shape[:2] == ids.shape and (norms >= 0).all()
    assert norms[:, 0].gt(0).any()  # the first step already writes the state


def test_state_norm_of_a_single_impulse_decays_geometrically():
    """Mamba-2 with one input at t=0: ||h_t|| = exp(Δ A)^t ||Δ x0 B0||."""
    L, H, P, N = 5, 1, 2, 3
    u = torch.zeros(1, L, H * P)
    u[0, 0] = torch.tensor([1.0, 2.0])
    dt = torch.full((1, L, H), 0.5)
    A = torch.tensor([-1.0])
    B = torch.ones(1, L, 1, N)
    norms, _ = ssm_states(u, dt, A, B)
    first = 0.5 * math.sqrt(5.0) * math.sqrt(3.0)
    expected = torch.tensor([first * math.exp(-0.5) ** t for t in range(L)])
    assert torch.allclose(norms[0, :, 0], expected, rtol=1e-5)

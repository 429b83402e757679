"""The fast scans against the sequential reference: values and gradients."""

import pytest
import torch

from sensitivity.core.scan import selective_scan_chunked, selective_scan_ref, ssd_scan


def _mamba1_inputs(dtype, L=37, E=6, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, L, E, generator=g, dtype=dtype)
    dt = torch.rand(2, L, E, generator=g, dtype=dtype) * 2
    A = -torch.rand(E, N, generator=g, dtype=dtype) * 5
    B = torch.randn(2, L, N, generator=g, dtype=dtype)
    C = torch.randn(2, L, N, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [None, 1, 5, 37, 64])
def test_chunked_scan_matches_reference_values_and_grads(dtype, tol, chunk):
    inputs = _mamba1_inputs(dtype)
    w = torch.randn(2, 37, 6, dtype=dtype)
    y_ref = selective_scan_ref(*inputs)
    y = selective_scan_chunked(*inputs, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    g_ref = torch.autograd.grad((y_ref * w).sum(), inputs)
    g = torch.autograd.grad((y * w).sum(), inputs)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


def test_reference_scan_matches_hand_recurrence():
    # one channel, one state: h_t = exp(dt*a) h_{t-1} + dt*b*x, y = c*h
    x, dt, b, c, a = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 1.0, 0.25]), 2.0, 3.0, -1.0
    h, ys = 0.0, []
    for t in range(3):
        h = torch.exp(dt[t] * a) * h + dt[t] * b * x[t]
        ys.append(c * h)
    y = selective_scan_ref(x.view(1, 3, 1), dt.view(1, 3, 1), torch.tensor([[a]]),
                           torch.full((1, 3, 1), b), torch.full((1, 3, 1), c))
    torch.testing.assert_close(y.view(3), torch.stack(ys))


def test_chunked_scan_is_stable_for_strong_decay():
    x, dt, A, B, C = (t.detach() for t in _mamba1_inputs(torch.float32, L=200))
    y = selective_scan_chunked(x, dt * 50, A * 10, B, C)  # decays down to exp(-2500) per step
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, selective_scan_ref(x, dt * 50, A * 10, B, C), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("G,chunk", [(1, 8), (2, 5), (4, 64)])
def test_ssd_scan_matches_reference(dtype, tol, G, chunk):
    g = torch.Generator().manual_seed(3)
    Bsz, L, H, P, N = 2, 29, 4, 3, 5
    x = torch.randn(Bsz, L, H, P, generator=g, dtype=dtype, requires_grad=True)
    dt = (torch.rand(Bsz, L, H, generator=g, dtype=dtype) * 2).requires_grad_()
    A = (-torch.rand(H, generator=g, dtype=dtype) * 3).requires_grad_()
    Bm = torch.randn(Bsz, L, G, N, generator=g, dtype=dtype, requires_grad=True)
    Cm = torch.randn(Bsz, L, G, N, generator=g, dtype=dtype, requires_grad=True)
    inputs = (x, dt, A, Bm, Cm)
    y = ssd_scan(*inputs, chunk_size=chunk)
    # Independent path: expand heads and groups to channels and run the per-channel sequential scan.
    per_ch = lambda t: t.repeat_interleave(H // G, dim=2).repeat_interleave(P, dim=2)  # (B, L, H*P, N)
    y_ref = selective_scan_ref(x.reshape(Bsz, L, H * P), dt.repeat_interleave(P, dim=2),
                               A.repeat_interleave(P)[:, None].expand(H * P, N), per_ch(Bm), per_ch(Cm))
    torch.testing.assert_close(y.reshape(Bsz, L, H * P), y_ref, rtol=tol, atol=tol)
    w = torch.randn(Bsz, L, H * P, dtype=dtype)
    for a, b in zip(torch.autograd.grad((y.reshape(Bsz, L, -1) * w).sum(), inputs),
                    torch.autograd.grad((y_ref * w).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))

"""Selective scans for the instrumented forwards: a plain sequential reference and two fast, exact scans.

The selective state-space recurrence (Mamba, Gu & Dao 2023, eq. 2a-2b with zero-order-hold discretisation)::

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t        y_t = C_t · h_t (+ D x_t, added by the caller)

* :func:`selective_scan_ref` runs it one step at a time: slow, obviously right, the yardstick of the tests.
* :func:`selective_scan_chunked` (Mamba-1, per-channel decay): the sequence is cut into chunks of ``T`` steps;
  the recurrence runs over the ``T`` positions of all chunks at once (zero initial state), then over the ``L / T``
  chunk boundaries, then the carried-in states decay through their chunks. ``2T + L/T`` Python steps instead of
  ``L``; it only ever multiplies decays ``<= 1`` (no division, no overflow).
* :func:`ssd_scan` (Mamba-2, one scalar decay per head): the chunked state-space-duality form of Mamba-2
  (Dao & Gu 2024, section 6), where the in-chunk part is a masked ``(T, T)`` matrix product.

Shape legend: B batch, L sequence length, ED inner channels, N state size, H heads, P head dim (ED = H·P),
G B/C groups, T chunk length, c number of chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "selective_scan_chunked", "ssd_scan"]


def _at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """Accumulate in float32, or in float64 when given float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def selective_scan_ref(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Sequential selective scan, one time step per iteration (reference implementation).

    Args:
        x: Input ``(B, L, ED)``.
        dt: Step sizes Δ after softplus ``(B, L, ED)``.
        A: Continuous decay rates, negative ``(ED, N)``.
        B: Input matrix ``(B, L, N)`` shared by all channels, or per channel ``(B, L, ED, N)``.
        C: Output matrix, same shape rules as ``B``.

    Returns:
        ``y`` of shape ``(B, L, ED)`` in float32 (float64 for float64 inputs), without the ``D`` skip term.
    """
    x, dt, A, B, C = (_at_least_f32(t) for t in (x, dt, A, B, C))
    if B.dim() == 3:  # (B, L, N): one B and C shared by all channels
        B, C = B[:, :, None, :], C[:, :, None, :]  # (B, L, 1, N)
    dA = torch.exp(dt[..., None] * A)  # (B, L, ED, N)
    dBx = (dt * x)[..., None] * B  # (B, L, ED, N)
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[-1])  # (B, ED, N)
    states = []
    # unbind rather than indexing in the loop: an indexed slice costs a full-size zero tensor in the backward.
    for a_t, b_t in zip(dA.unbind(1), dBx.unbind(1)):
        h = torch.addcmul(b_t, a_t, h)  # (B, ED, N)
        states.append(h)
    states = torch.stack(states, dim=1)  # (B, L, ED, N)
    if C.shape[2] == 1:  # shared C: one batched matrix product, no (B, L, ED, N) temporary
        return (states @ C.transpose(-1, -2)).squeeze(-1)  # (B, L, ED)
    return (states * C).sum(-1)  # (B, L, ED)


def selective_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact chunked selective scan for per-channel decays (Mamba-1, FalconMamba).

    Same arguments and result as :func:`selective_scan_ref` (``B`` and ``C`` of shape ``(B, L, N)``), with
    ``chunk_size`` defaulting to ``ceil(sqrt(L))``. Gradients flow through plain autograd ops.

    Examples:
        >>> y = selective_scan_chunked(x, dt, -torch.exp(A_log), B, C)  # (B, L, ED)
    """
    x, dt, A, B, C = (_at_least_f32(t) for t in (x, dt, A, B, C))
    bsz, L, ED = x.shape
    T = chunk_size or max(1, math.isqrt(L - 1) + 1)
    pad = (-L) % T
    if pad:  # padded steps have Δ = 0: decay 1, input 0, and come after every real step
        x, dt, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (x, dt, B, C))
    c = x.shape[1] // T
    decay = torch.exp(dt[..., None] * A).view(bsz, c, T, ED, -1)  # (B, c, T, ED, N)
    dBx = ((dt * x)[..., None] * B[:, :, None, :]).view(bsz, c, T, ED, -1)  # (B, c, T, ED, N)
    C = C.view(bsz, c, T, 1, -1)  # (B, c, T, 1, N)
    steps = list(zip(decay.unbind(2), dBx.unbind(2), C.unbind(2)))  # unbind: no per-step indexing in the backward

    # 1. In-chunk recurrence from a zero state, all chunks at once: T steps.
    h = torch.zeros_like(dBx[:, :, 0])  # (B, c, ED, N)
    y_local = []
    for a_t, b_t, c_t in steps:
        h = a_t * h + b_t  # (B, c, ED, N)
        y_local.append((h * c_t).sum(-1))  # (B, c, ED)
    chunk_decay = torch.prod(decay, dim=2)  # (B, c, ED, N), decay across each whole chunk

    # 2. Recurrence over chunk boundaries: c steps. carry[k] = state entering chunk k.
    carry = [torch.zeros_like(h[:, 0])]  # (B, ED, N)
    for end_h, end_decay in zip(h[:, :-1].unbind(1), chunk_decay[:, :-1].unbind(1)):
        carry.append(end_h + end_decay * carry[-1])  # (B, ED, N)
    g = torch.stack(carry, dim=1)  # (B, c, ED, N)

    # 3. The carried-in state decays through each chunk and adds C_t . g_t to the output: T steps.
    y = []
    for (a_t, _, c_t), y_t in zip(steps, y_local):
        g = a_t * g  # (B, c, ED, N)
        y.append(y_t + (g * c_t).sum(-1))  # (B, c, ED)
    y = torch.stack(y, dim=2).reshape(bsz, c * T, ED)  # (B, L', ED)
    return y[:, :L]


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: ``out[..., t, s] = sum(a[..., s+1 : t+1])`` for ``s <= t``, ``-inf`` above.

    Args:
        a: ``(..., T)``.

    Returns:
        ``(..., T, T)``.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # (..., T, T): [t, s] = a[t]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = torch.cumsum(a.masked_fill(~strict, 0), dim=-2)  # (..., T, T): [t, s] = sum(a[s+1 : t+1])
    incl = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return seg.masked_fill(~incl, -torch.inf)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Exact chunked scan for one scalar decay per head (Mamba-2's state-space duality form).

    Args:
        x: Input ``(B, L, H, P)``.
        dt: Step sizes Δ after softplus and clamping ``(B, L, H)``.
        A: Decay rates, negative ``(H,)``.
        B: ``(B, L, G, N)`` with ``H`` divisible by ``G``.
        C: ``(B, L, G, N)``.
        chunk_size: Chunk length ``T``.

    Returns:
        ``y`` of shape ``(B, L, H, P)`` in float32 (float64 for float64 inputs), without the ``D`` skip term.
    """
    x, dt, A, B, C = (_at_least_f32(t) for t in (x, dt, A, B, C))
    bsz, L, H, P = x.shape
    G = B.shape[2]
    T = chunk_size
    pad = (-L) % T
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = x.shape[1] // T
    B = B.repeat_interleave(H // G, dim=2).view(bsz, c, T, H, -1)  # (B, c, T, H, N)
    C = C.repeat_interleave(H // G, dim=2).view(bsz, c, T, H, -1)  # (B, c, T, H, N)
    xdt = (x * dt[..., None]).view(bsz, c, T, H, P)  # (B, c, T, H, P)
    a = (dt * A).view(bsz, c, T, H).permute(0, 3, 1, 2)  # (B, H, c, T) log decay per step
    a_cum = torch.cumsum(a, dim=-1)  # (B, H, c, T)

    # 1. In-chunk (diagonal blocks): y_t = sum_{s<=t} (C_t . B_s) exp(a_{s+1..t}) x_s Δ_s.
    decay = torch.exp(_segsum(a))  # (B, H, c, T, T)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay  # (B, H, c, T, T)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)  # (B, c, T, H, P)

    # 2. State at the end of each chunk from its own inputs.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, H, c, T)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)  # (B, c, H, P, N)

    # 3. States entering each chunk: a (c+1, c+1) decay matrix over chunk boundaries.
    chunk_states = torch.cat([torch.zeros_like(chunk_states[:, :1]), chunk_states], dim=1)  # (B, c+1, H, P, N)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (B, H, c+1, c+1)
    entering = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)[:, :-1]  # (B, c, H, P, N)

    # 4. Contribution of the entering state to every position of its chunk.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cum))  # (B, c, T, H, P)
    y = (y_diag + y_off).reshape(bsz, c * T, H, P)  # (B, L', H, P)
    return y[:, :L]

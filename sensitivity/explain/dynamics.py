"""SSM dynamics of one mixer layer, computed from its hook-point activations (pure functions).

The per-step decay of the state is ``exp(Δ·A)`` (Gu & Dao 2023, eq. 4 with ZOH: ``Ā = exp(ΔA)``); its time
constant ``-1 / log(exp(ΔA)) = 1 / (Δ·|A|)`` tokens is the *memory length*: the number of steps over which a
state entry decays by a factor e. The state itself is rebuilt by the same recurrence the scan computes,
``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t``, so its norm over time can be compared between a dense and a pruned
model (the scan kernels never materialise it).

Shape legend: B batch, L sequence length, ED inner channels, N state size, H heads, P head dim, G B/C groups.
"""

from __future__ import annotations

import torch

__all__ = [
    "GATE_CLOSED_BELOW",
    "OUTLIER_M",
    "QUANTITIES",
    "decay",
    "gate_closed_share",
    "memory_length",
    "outlier_share",
    "ssm_states",
    "summary_stats",
]

QUANTITIES = ("delta", "decay", "memory", "state_norm", "gate_closed", "outlier_x", "outlier_z", "outlier_y",
              "live_units")
"""The per-layer quantities of an explanation's ``dynamics`` table: Δ, the decay ``exp(ΔA)``, the memory length,
the state norm, the share of closed gates, the shares of outliers in x, z and y, and the share of live units."""
# SiLU(z) = z·σ(z); below σ(z) = 0.05 (z < -2.944) the gate passes under 5% of what an open gate would.
GATE_CLOSED_BELOW = 0.05
# An activation entry is an outlier when its magnitude exceeds M times the layer's mean magnitude (OWL's M).
OUTLIER_M = 5.0
_QUANTILE_MAX = 1 << 20  # torch.quantile refuses very large inputs; larger tensors are subsampled (seeded)


def decay(dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Per-step state decay ``exp(Δ·A)`` in (0, 1].

    Args:
        dt: Δ after softplus: (B, L, H) for Mamba-2, (B, L, ED) for Mamba-1.
        A: ``-exp(A_log)``: (H,) for Mamba-2, (ED, N) for Mamba-1.

    Returns:
        (B, L, H) or (B, L, ED, N).
    """
    if A.dim() == 1:
        return torch.exp(dt.float() * A.float())  # (B, L, H)
    return torch.exp(dt.float()[..., None] * A.float())  # (B, L, ED, N)


def memory_length(decay_: torch.Tensor) -> torch.Tensor:
    """Time constant ``-1 / log(decay)`` in tokens (inf where the decay is exactly 1)."""
    return -1.0 / torch.log(decay_.double().clamp(max=1.0)).float()


def gate_closed_share(z: torch.Tensor, below: float = GATE_CLOSED_BELOW) -> float:
    """Share of gate entries whose sigmoid is under ``below`` (the SiLU gate is shut there). z: (B, L, ED)."""
    return (torch.sigmoid(z.float()) < below).float().mean().item()


def outlier_share(a: torch.Tensor, m: float = OUTLIER_M) -> float:
    """Share of entries with ``|a| > m · mean|a|`` (OWL's outlier criterion applied to activations)."""
    mag = a.float().abs()
    return (mag > m * mag.mean()).float().mean().item()


def summary_stats(values: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """``mean``, ``median``, ``p10``, ``p90`` of a tensor's finite entries (subsampled beyond 2**20, seeded)."""
    flat = values.detach().reshape(-1).float()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return {"mean": float("nan"), "median": float("nan"), "p10": float("nan"), "p90": float("nan")}
    mean = flat.mean().item()
    if flat.numel() > _QUANTILE_MAX:
        idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:_QUANTILE_MAX]
        flat = flat[idx]
    q = torch.quantile(flat, torch.tensor([0.5, 0.1, 0.9]))
    return {"mean": mean, "median": q[0].item(), "p10": q[1].item(), "p90": q[2].item()}


def ssm_states(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The state norm at every step, by the selective-scan recurrence (float32, step by step).

    Mamba-2: ``h_t[h] = exp(Δ_t[h] A[h]) h_{t-1}[h] + Δ_t[h] x_t[h] ⊗ B_t[g(h)]`` with ``h`` of shape (P, N);
    Mamba-1: ``h_t = exp(Δ_t ⊙ A) h_{t-1} + (Δ_t x_t) ⊗ B_t`` with ``h`` of shape (ED, N).

    Args:
        u: The scan input (the conv output): (B, L, ED).
        dt: Δ after softplus: (B, L, H) (Mamba-2) or (B, L, ED) (Mamba-1).
        A: (H,) or (ED, N).
        B: (B, L, G, N) (Mamba-2) or (B, L, N) (Mamba-1).
        C: Optional, same shape as ``B``; when given the scan output ``y_t = C_t · h_t`` is returned too (without
            the D skip term), which lets a caller check the recurrence against the model's own scan.

    Returns:
        ``(norms, y)``: norms (B, L, H) (Mamba-2: Frobenius norm of each head's (P, N) state) or (B, L) (Mamba-1:
        of the (ED, N) state); ``y`` (B, L, ED) or None.
    """
    u, dt, A, B = u.float(), dt.float(), A.float(), B.float()
    bsz, L, ED = u.shape
    if A.dim() == 1:  # Mamba-2
        H, G, N = A.shape[0], B.shape[2], B.shape[3]
        P = ED // H
        x = u.reshape(bsz, L, H, P)  # (B, L, H, P)
        Bh = B.repeat_interleave(H // G, dim=2)  # (B, L, H, N)
        Ch = None if C is None else C.float().repeat_interleave(H // G, dim=2)  # (B, L, H, N)
        a = torch.exp(dt * A).transpose(0, 1).contiguous()  # (L, B, H)
        dx = (dt[..., None] * x).transpose(0, 1).contiguous()  # (L, B, H, P)
        Bt = Bh.transpose(0, 1).contiguous()  # (L, B, H, N)
        Ct = None if Ch is None else Ch.transpose(0, 1).contiguous()  # (L, B, H, N)
        h = u.new_zeros(bsz, H, P, N)  # (B, H, P, N)
        norms, ys = [], []
        for t in range(L):
            h.mul_(a[t, :, :, None, None]).add_(dx[t, ..., None] * Bt[t, :, :, None, :])
            norms.append(torch.linalg.vector_norm(h, dim=(-2, -1)))  # (B, H)
            if Ct is not None:
                ys.append(torch.einsum("bhpn,bhn->bhp", h, Ct[t]).reshape(bsz, ED))  # (B, ED)
    else:  # Mamba-1
        N = A.shape[1]
        dx = (dt * u).transpose(0, 1).contiguous()  # (L, B, ED)
        dtt = dt.transpose(0, 1).contiguous()  # (L, B, ED)
        Bt = B.transpose(0, 1).contiguous()  # (L, B, N)
        h = u.new_zeros(bsz, ED, N)  # (B, ED, N)
        norms, ys = [], []
        for t in range(L):
            h.mul_(torch.exp(dtt[t, :, :, None] * A)).add_(dx[t, :, :, None] * Bt[t, :, None, :])
            norms.append(torch.linalg.vector_norm(h, dim=(-2, -1)))  # (B,)
            if C is not None:
                ys.append(torch.einsum("ben,bn->be", h, C[:, t].float()))  # (B, ED)
    y = torch.stack(ys, dim=1) if ys else None  # (B, L, ED)
    return torch.stack(norms, dim=1), y


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """``log(exp(x) - 1)``: the Δ bias that gives a softplus output ``x`` (for tests and planted faults)."""
    return x + torch.log(-torch.expm1(-x))


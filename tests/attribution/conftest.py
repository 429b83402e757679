"""Fixtures for attribution tests: short random token windows."""

from __future__ import annotations

import pytest
import torch

from sensitivity.data import Windows


def _make_windows(n: int = 3, seqlen: int = 16, seed: int = 0, vocab: int = 256) -> Windows:
    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))  # (n, L)
    return Windows(ids=ids, seqlen=seqlen, split="test", source="random", kind="calibration", seed=seed, stride=0)


@pytest.fixture
def make_windows():
    """``make_windows(n, seqlen, seed=0, vocab=256)``: n random windows of seqlen byte tokens."""
    return _make_windows

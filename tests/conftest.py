"""Shared fixtures: tiny random models of every architecture, built from configs."""

from __future__ import annotations

import pytest
import torch

from sensitivity.core import load_model

TINY = ["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba"]


@pytest.fixture(scope="session", params=TINY)
def tiny_lm(request):
    """Each built-in tiny model, instrumented (shared: tests must not modify it)."""
    return load_model(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models gain nothing from more, and on busy shared cores they lose 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))  # (B, L)

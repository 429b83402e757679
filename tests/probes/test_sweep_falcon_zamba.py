"""Probe sweeps on Falcon-H1 (parallel SSM + attention, µP multipliers) and Zamba2 (hybrid layers that read the
input embeddings and share one transformer block): the cached sweep equals the naive one."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sensitivity.core import load_model
from sensitivity.data import load_corpus
from sensitivity.probes import probe

NAMES = ["tiny:falcon-h1", "tiny:zamba2"]
SMALL = dict(windows=3, calib_windows=2, seqlen=24, batch_size=2, show_progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on busy shared cores they lose 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", NAMES)
def test_cached_sweep_equals_naive_sweep(name):
    """The cached sweep runs blocks from the stored stream (Zamba2's hybrid layers get their windows' embeddings,
    resample takes other windows' activations); the naive one runs the HF forward: the same numbers. Zamba2's
    hybrid layers share their transformer's tensors: a weight edit acts in the probed layer only, so the last
    layer's probes agree although the naive forward also runs the first hybrid layer with those tensors."""
    lm, corpus = load_model(name), load_corpus("sample")
    reg = lm.registry
    hybrid = reg.layers_with("q")[0]  # Zamba2: a hybrid layer, reading the embeddings; Falcon-H1: layer 0
    layers = sorted({0, hybrid, reg.n_layers - 1})
    comps = ["x", "dt", "norm", "q", "v", "o", "up", "down", "mixer", "attention", "attn_head", "mlp", "block"]
    kinds = ["zero", "mean", "resample", "bypass", "wanda", "remove"]
    options = dict(components=comps, kinds=kinds, layers=layers, sparsities=[0.5], **SMALL)
    cached = probe(lm, corpus, **options)
    naive = probe(lm, corpus, sweep="naive", **options)
    assert len(cached) == len(naive) > 100
    assert set(cached.layer) == set(layers) and {"q", "attention", "mlp", "mixer"} <= set(cached.component)
    assert ((cached.component == "q") & (cached.kind == "resample") & (cached.layer == hybrid)).any()
    assert ((cached.component == "norm") & (cached.kind == "bypass")).any()  # Falcon-H1: the gate order is kept
    pd.testing.assert_frame_equal(cached.drop(columns="value"), naive.drop(columns="value"))
    assert (cached.value - naive.value).abs().max() < 1e-5
    assert cached.value.notna().all() and (cached[cached.metric == "delta_nll"].value.abs() > 0).any()
    batched = probe(lm, corpus, sweep="batched", **options)
    assert (batched.value - naive.value).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["tiny:bamba", "tiny:granitemoehybrid", "tiny:nemotron-h", "tiny:jamba"])
def test_batched_sweep_equals_naive_sweep_on_the_other_hybrids(name):
    """Several probes of a layer share one forward of the rest of the model (stacked along the batch axis): the
    same numbers as a full forward per probe, on attention, MLP, MoE and SSM layers."""
    lm, corpus = load_model(name), load_corpus("sample")
    layers = sorted({0, *lm.registry.layers_with("q")[:1], lm.registry.n_layers - 1})
    options = dict(layers=layers, kinds=["zero", "resample", "wanda", "remove"], sparsities=[0.5], stack=3, **SMALL)
    batched = probe(lm, corpus, sweep="batched", **options)
    naive = probe(lm, corpus, sweep="naive", **options)
    assert len(batched) == len(naive) > 60 and {"attention", "mixer"} <= set(batched.component)
    pd.testing.assert_frame_equal(batched.drop(columns="value"), naive.drop(columns="value"))
    assert (batched.value - naive.value).abs().max() < 1e-5

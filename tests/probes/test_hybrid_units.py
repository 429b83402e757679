"""Whole-unit probes of the hybrids against independent computations on the plain HF forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sensitivity import load_model
from sensitivity.core import uninstrument
from sensitivity.data import Windows
from sensitivity.probes import probe


def _windows(n: int, seed: int, kind: str) -> Windows:
    ids = torch.randint(0, 256, (n, 24), generator=torch.Generator().manual_seed(seed))  # (n, L)
    return Windows(ids=ids, seqlen=24, split="validation", source="test", kind=kind, seed=seed, stride=0)


@torch.no_grad()
def _nll(model, ids: torch.Tensor) -> float:
    logits = model(ids, use_cache=False).logits.float()  # (n, L, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


@pytest.mark.parametrize(("name", "layer"), [("tiny:granitemoehybrid", 0), ("tiny:jamba", 1), ("tiny:nemotron-h", 3)])
def test_expert_removal_equals_zeroing_that_expert_in_a_plain_copy(name, layer):
    lm = load_model(name)
    held, cal = _windows(3, 0, "calibration"), _windows(2, 1, "calibration")
    df = probe(lm, components=["expert"], kinds=["remove"], layers=[layer], heldout=held, calibration=cal,
               show_progress=False)  # fmt: skip
    got = df[df.metric == "delta_nll"].set_index("index").value
    reg = lm.registry
    assert list(got.index) == list(range(reg.dims["E"]))
    plain = uninstrument(copy.deepcopy(lm.model))
    dense = _nll(plain, held.ids)
    experts = reg.unit(plain, layer, "moe").experts
    for e in range(reg.dims["E"]):
        saved = {n: p.detach().clone() for n, p in experts.named_parameters()}
        with torch.no_grad():
            for p in experts.parameters():
                p[e] = 0
        assert got[e] == pytest.approx(_nll(plain, held.ids) - dense, abs=1e-5), e
        with torch.no_grad():
            for n, p in experts.named_parameters():
                p.copy_(saved[n])
    assert got.abs().max() > 1e-4  # the experts matter on these tokens, so the check above can fail

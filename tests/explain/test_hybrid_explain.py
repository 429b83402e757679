"""The explainer on every built-in tiny hybrid: drift over every layer, restoration patching of components and
whole units (SSM mixer, attention, MLP, MoE), dynamics on the SSM layers only, faults in any unit."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import torch.nn.functional as F

from sensitivity.core import LoadedModel, load_model
from sensitivity.core.spec import SpecError
from sensitivity.data import Windows
from sensitivity.explain import UNIT_ROWS, Explanation, explain
from sensitivity.explain.faults import Fault, default_faults, plant
from sensitivity.pruning import prune

HYBRIDS = ["tiny:bamba", "tiny:granitemoehybrid", "tiny:nemotron-h", "tiny:jamba", "tiny:falcon-h1", "tiny:zamba2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=HYBRIDS)
def dense(request):
    return load_model(request.param)


def _windows(n=3, L=20, seed=0) -> Windows:
    ids = torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(seed))
    return Windows(ids=ids, seqlen=L, split="validation", source="random", kind="calibration", seed=seed, stride=0)


def _copy(lm: LoadedModel, name: str = "copy") -> LoadedModel:
    return LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.registry, name)


def _unit_layers(reg) -> dict[str, int]:
    """Unit kind -> the last layer holding it whose weights no other layer shares."""
    out = {}
    for layer in range(reg.n_layers):
        for kind in reg.units[layer]:
            comps = [c.name for c in reg.components_at(layer) if c.unit == kind and c.tensors]
            if len(comps) > 1 and len(reg.sharing(layer, comps[0])) == 1:
                out[kind] = layer
    return out


def _damage(lm: LoadedModel, layer: int, kind: str) -> list[str]:
    """Noise in every tensor of the ``kind`` unit of ``layer``; returns its components."""
    comps = [c.name for c in lm.registry.components_at(layer) if c.unit == kind and c.tensors]
    for i, comp in enumerate(comps):
        plant(lm, Fault(f"noise_{comp}", layer, comp, "noise"), seed=i)
    return comps


def test_restoring_the_damaged_unit_restores_the_dense_loss_exactly(dense):
    """Damage one whole unit of one layer: patching that unit (every tensor at once) gives back the dense loss, the
    drift is zero before the layer, and nothing in the other layers recovers anything."""
    reg, w = dense.registry, _windows()
    units = _unit_layers(reg)  # Zamba2's attention and MLP are shared: see the test of shared tensors below
    assert len(units) >= (1 if reg.is_shared("q") else 2), units
    for kind, layer in units.items():
        damaged = _copy(dense, f"{kind}{layer}")
        comps = _damage(damaged, layer, kind)
        e = explain(dense, damaged, w, components=comps, label=kind, show_progress=False)
        assert len(e.drift) == reg.n_layers and (e.drift[e.drift.layer < layer].rel_error == 0).all()
        assert e.drift.rel_error[layer] > 0
        row = e.patching[(e.patching.component == UNIT_ROWS[kind]) & (e.patching.layer == layer)]
        assert len(row) == 1 and row.unit.iloc[0] == kind
        assert row.nll.iloc[0] == pytest.approx(e.nll_dense, rel=1e-6, abs=1e-6), (kind, layer)
        assert row.recovered.iloc[0] == pytest.approx(1.0, abs=1e-4)
        assert (e.patching[e.patching.layer != layer].recovered == 0).all()
        assert set(e.patching[e.patching.layer == layer].component) == {*comps, UNIT_ROWS[kind]}


def _nll(lm: LoadedModel, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = lm.model(ids, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_every_patching_row_equals_an_independent_hf_forward(dense):
    """Each unit row's loss and the best component row's loss equal the HF forward of the pruned model with those
    tensors swapped to dense only while that layer's unit runs (a pre-hook writes them, a hook puts them back)."""
    reg, w = dense.registry, _windows()
    pruned = _copy(dense, "magnitude")
    prune(pruned, "magnitude", sparsity=0.5, show_progress=False)
    before = [t.clone() for t in pruned.model.state_dict().values()]
    e = explain(dense, pruned, w, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, pruned.model.state_dict().values()))  # restored after
    assert e.nll_pruned == pytest.approx(_nll(pruned, w.ids), rel=1e-5)
    rows = e.patching[e.patching.component.isin(list(UNIT_ROWS.values()))]
    assert {k for k in UNIT_ROWS if any(k in u for u in reg.units)} == set(rows.unit)
    top = e.top
    checks = [*rows.itertuples(), *e.patching[(e.patching.layer == top[0]) & (e.patching.component == top[1])]
              .itertuples()]  # fmt: skip
    for row in checks:
        comps = ([row.component] if row.component not in UNIT_ROWS.values() else
                 [c.name for c in reg.components_at(row.layer) if c.unit == row.unit and c.tensors])  # fmt: skip
        tensors = [(t, s) for c in comps for t, s in zip(reg.tensors(pruned.model, row.layer, c),
                                                          reg.tensors(dense.model, row.layer, c))]  # fmt: skip
        saved = [t.detach().clone() for t, _ in tensors]

        def put(values):
            with torch.no_grad():
                for (t, _), v in zip(tensors, values):
                    t.copy_(v)

        owner = reg.unit(pruned.model, row.layer, row.unit)
        handles = [owner.register_forward_pre_hook(lambda m, a: put([s for _, s in tensors])),
                   owner.register_forward_hook(lambda m, a, o: put(saved))]  # fmt: skip
        try:
            expected = _nll(pruned, w.ids)
        finally:
            for h in handles:
                h.remove()
        assert row.nll == pytest.approx(expected, rel=1e-5), (row.layer, row.component)


def test_dynamics_only_on_ssm_layers(dense, caplog):
    reg, w = dense.registry, _windows(2, 16)
    ssm = [i for i in range(reg.n_layers) if "ssm" in reg.units[i]]
    others = [i for i in range(reg.n_layers) if i not in ssm]
    with caplog.at_level(logging.INFO, logger="sensitivity.explain.explainer"):
        e = explain(dense, _copy(dense), w, patch=False, show_progress=False)
    assert sorted(set(e.dynamics.layer)) == ssm == sorted(set(e.states.layer)) == sorted(set(e.samples.layer))
    assert e.meta["dynamics_layers"] == ssm
    skipped = [r.getMessage() for r in caplog.records if "SSM dynamics skip" in r.getMessage()]
    if others:
        assert skipped == [f"SSM dynamics skip layer(s) {', '.join(map(str, others))}: no SSM mixer "
                           f"({', '.join(reg.layer_kind(i) for i in others)})"]  # fmt: skip
        kind = re.escape(reg.layer_kind(others[0]))
        with pytest.raises(SpecError, match=f"^dynamics_layers: layer {others[0]} holds {kind} and no SSM mixer, so it "
                           f"has no SSM dynamics; layers with one: {', '.join(map(str, ssm))}$"):  # fmt: skip
            explain(dense, _copy(dense), w, dynamics_layers=[ssm[0], others[0]], show_progress=False)
    else:
        assert not skipped
    one = explain(dense, _copy(dense), w, patch=False, dynamics_layers=[ssm[-1]], show_progress=False)
    assert set(one.dynamics.layer) == {ssm[-1]}
    assert (one.dynamics.set_index(["quantity", "stat"]).dense == e.dynamics[e.dynamics.layer == ssm[-1]]
            .set_index(["quantity", "stat"]).dense).all()  # fmt: skip


def test_default_faults_fit_every_hybrid_and_land_in_units_holding_them(dense):
    reg = dense.registry
    faults = default_faults(dense)
    names = {f.name for f in faults}
    assert len(names) == len(faults) >= 10
    assert ("q_noise" in names) and ("down_pruned" in names) == ("down" in reg.component_names)
    assert ("router_zeroed" in names) == ("router" in reg.component_names)
    for f in faults:
        assert reg.has(f.layer, f.component), f
        lm = plant(_copy(dense), f)
        pairs = zip(reg.tensors(lm.model, f.layer, f.component), reg.tensors(dense.model, f.layer, f.component))
        changed = [t for t, s in pairs if not torch.equal(t, s)]
        assert changed, f.describe()
    lacking = [i for i in range(reg.n_layers) if not reg.has(i, "q")]
    if lacking:
        with pytest.raises(SpecError, match=f"layer {lacking[0]} is an? [a-z+]+ layer with no attention unit; layers "):
            plant(_copy(dense), Fault("q", lacking[0], "q", "zero"))


def test_a_fault_in_an_attention_unit_is_named_and_top_layers_works():
    dense = load_model("tiny:bamba")
    layer = dense.registry.layers_with("o")[0]
    faulty = plant(_copy(dense), Fault("o", layer, "o", "scale", 8.0))
    e = explain(dense, faulty, _windows(), top_layers=1, show_progress=False)
    assert e.top[:2] == (layer, "o") and e.top[2] == pytest.approx(1.0, abs=1e-4)
    assert set(e.patching[~e.patching.component.isin(list(UNIT_ROWS.values()))].layer) == {layer}
    assert f"o of layer {layer} alone recovers 100%" in e.text and f"whole attention of layer {layer}" in e.text


def test_zamba2_shared_tensors_are_restored_in_the_patched_layer_only(tmp_path):
    """A fault in the shared transformer damages both hybrid layers; restoring it in one of them recovers part of
    the gap, and the two rows differ."""
    dense = load_model("tiny:zamba2")
    a, b = dense.registry.sharing(dense.registry.layers_with("v")[0], "v")
    faulty = plant(_copy(dense), Fault("v", a, "v", "scale", 6.0))
    e = explain(dense, faulty, _windows(), components=["v", "o"], show_progress=False)
    rows = e.patching[e.patching.component == "v"].set_index("layer").recovered
    assert set(rows.index) == {a, b} and 0 < rows[a] < 1 and 0 < rows[b] < 1 and rows[a] != rows[b]
    back = Explanation.load(e.save(tmp_path / "zamba2"))
    assert back.text == e.text and list(back.patching.columns) == ["layer", "component", "unit", "nll", "recovered"]

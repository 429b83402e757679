"""The component registry: slices partition the packed tensors and point at the right activations."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from sensitivity.models import build_registry, capture, load_model


def _rows(reg, param):
    out = []
    for comp in reg.components:
        out += [(t.rows, comp.name) for t in comp.tensors if t.param == param and t.rows is not None]
    return sorted(out)


def test_packed_projections_are_partitioned(tiny_lm):
    reg, mixer = tiny_lm.registry, tiny_lm.registry.mixer(tiny_lm.model, 0)
    packed = ["in_proj.weight", "x_proj.weight"] if tiny_lm.arch != "mamba2" else ["in_proj.weight"]
    for param in packed:
        rows = _rows(reg, param)
        assert rows[0][0][0] == 0
        assert all(a[0][1] == b[0][0] for a, b in zip(rows, rows[1:])), rows  # contiguous, no overlap
        assert rows[-1][0][1] == getattr(mixer, param.split(".")[0]).weight.shape[0]
    order = [name for _, name in _rows(reg, "in_proj.weight")]
    assert order == (["z", "x", "B", "C", "dt"] if tiny_lm.arch == "mamba2" else ["x", "z"])


def test_tensors_are_views_into_the_model():
    lm = load_model("tiny:mamba")
    (b_rows,) = lm.registry.tensors(lm.model, 1, "B")
    with torch.no_grad():
        b_rows.fill_(7.0)
    R, N = lm.registry.dims["R"], lm.registry.dims["N"]
    assert (lm.model.backbone.layers[1].mixer.x_proj.weight[R : R + N] == 7.0).all()
    assert (lm.model.backbone.layers[1].mixer.x_proj.weight[:R] != 7.0).all()


@pytest.mark.parametrize("name", ["tiny:mamba", "tiny:falcon-mamba", "tiny:mamba2"])
def test_zeroing_B_rows_through_registry_shows_at_the_B_hook(name, ids):
    lm = load_model(name)
    reg = lm.registry
    with torch.no_grad():
        for t in reg.tensors(lm.model, 0, "B"):
            t.zero_()
    with capture(lm, ["layers.0.B", "layers.1.B"]) as acts:
        lm.model(ids, use_cache=False)
    B0, B1 = acts["layers.0.B"][0], acts["layers.1.B"][0]
    assert B1.abs().sum() > 0
    if lm.arch == "mamba2":  # B goes through the conv: only silu(conv bias of the B channels) remains
        ED, GN = reg.dims["ED"], reg.dims["G"] * reg.dims["N"]
        bias = reg.mixer(lm.model, 0).conv1d.bias[ED : ED + GN]
        torch.testing.assert_close(B0, F.silu(bias).view(1, 1, reg.dims["G"], -1).expand_as(B0))
    else:
        assert (B0 == 0).all()


def test_zeroing_dt_path_leaves_only_the_bias(ids):
    lm = load_model("tiny:mamba")
    mixer = lm.registry.mixer(lm.model, 0)
    with torch.no_grad():
        for t, spec in zip(lm.registry.tensors(lm.model, 0, "dt"), lm.registry.component("dt").tensors):
            if spec.param != "dt_proj.bias":
                t.zero_()
    with capture(lm, ["layers.0.dt_raw", "layers.0.dt"]) as acts:
        lm.model(ids, use_cache=False)
    torch.testing.assert_close(acts["layers.0.dt_raw"][0], mixer.dt_proj.bias.expand_as(acts["layers.0.dt_raw"][0]))
    torch.testing.assert_close(acts["layers.0.dt"][0], F.softplus(acts["layers.0.dt_raw"][0]))


def test_table_lists_every_tensor_with_shape(tiny_lm):
    table = tiny_lm.registry.table(tiny_lm.model)
    per_layer = sum(max(1, len(c.tensors)) for c in tiny_lm.registry.components)
    assert len(table) == per_layer * tiny_lm.registry.n_layers
    row = table[(table.layer == 1) & (table.component == "out_proj") & (table.tensor == "out_proj.weight")].iloc[0]
    assert row["shape"] == f"{tiny_lm.registry.dims['D']}x{tiny_lm.registry.dims['ED']}"
    assert set(table.hook) <= set(tiny_lm.registry.hook_names)


def test_falcon_mamba_lists_its_weightless_norms():
    reg = load_model("tiny:falcon-mamba").registry
    assert {"dt_norm", "B_norm", "C_norm"} <= set(reg.component_names)
    assert reg.component("B_norm").tensors == ()


def test_unknown_names_and_architectures():
    reg = load_model("tiny:mamba2").registry
    with pytest.raises(ValueError, match="unknown component 'dt_proj' for mamba2; allowed: z, x, B, C, dt"):
        reg.component("dt_proj")
    with pytest.raises(ValueError, match="layer 2 out of range; allowed: 0..1"):
        reg.check_layer(2)
    with pytest.raises(ValueError, match="unsupported model_type 'llama'; allowed: mamba, mamba2, falcon_mamba"):
        build_registry(LlamaConfig())
    bad = SimpleNamespace(model_type="mamba2", expand=2, hidden_size=64, num_heads=3, head_dim=16)
    with pytest.raises(ValueError, match="num_heads\\*head_dim=48"):
        build_registry(bad)


def test_column_slices_follow_the_column_layout(ids):
    """Zeroing out_proj columns of head h equals zeroing head h's channels of the out_proj input."""
    from sensitivity.models import TensorSlice, hooks

    lm = load_model("tiny:mamba2")
    reg, h = lm.registry, 3
    (spec,) = [t for t in reg.component("out_proj").tensors if t.param == "out_proj.weight"]
    assert spec.col_layout == ("H", "P")
    P = reg.dims["P"]

    def zero_head(t):
        t = t.clone()
        t.view(*t.shape[:-1], reg.dims["H"], P)[..., h, :] = 0
        return t

    with torch.no_grad():
        with hooks(lm, {"layers.1.out_proj_in": zero_head}):
            expected = lm.model(ids, use_cache=False).logits
        head_cols = TensorSlice("out_proj.weight", cols=(h * P, (h + 1) * P))
        view = head_cols.get(reg.mixer(lm.model, 1))
        assert view.shape == (reg.dims["D"], P)
        view.zero_()
        got = lm.model(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert head_cols.describe() == f"out_proj.weight[:, {h * P}:{(h + 1) * P}]"

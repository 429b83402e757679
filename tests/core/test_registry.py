"""The component registry: slices partition the packed tensors and point at the right activations."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from sensitivity.core import build_registry, capture, load_model
from sensitivity.core.registry import DEFAULT_EXCLUDE


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
    with pytest.raises(ValueError, match="^layer: 2 is out of range; allowed: 0..1$"):
        reg.check_layer(2)
    with pytest.raises(ValueError, match="unsupported model_type 'llama'; allowed: mamba, mamba2, falcon_mamba"):
        build_registry(LlamaConfig())
    bad = SimpleNamespace(model_type="mamba2", expand=2, hidden_size=64, num_heads=3, head_dim=16)
    with pytest.raises(ValueError, match="num_heads\\*head_dim=48"):
        build_registry(bad)


def test_column_slices_follow_the_column_layout(ids):
    """Zeroing out_proj columns of head h equals zeroing head h's channels of the out_proj input."""
    from sensitivity.core import TensorSlice, hooks

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

M1_COMPONENTS = ("x", "z", "conv1d", "dt", "B", "C", "out_proj")


@pytest.fixture(scope="module")
def m2():
    return load_model("tiny:mamba2", instrument=False)


@pytest.fixture(scope="module")
def m1():
    return load_model("tiny:mamba", instrument=False)


# ---- prunable weights and their sizes ----


def test_prunable_components_per_architecture(m2, m1):
    assert m2.registry.prunable_components == ("z", "x", "B", "C", "dt", "conv1d", "out_proj")
    assert m1.registry.prunable_components == M1_COMPONENTS
    falcon = load_model("tiny:falcon-mamba", instrument=False)
    assert falcon.registry.prunable_components == M1_COMPONENTS  # weightless norms are not prunable
    assert DEFAULT_EXCLUDE == ("conv1d",)


def test_weights_are_weight_matrices_only(m2, m1):
    assert [t.describe() for t in m1.registry.weights("dt")] == ["x_proj.weight[0:8]", "dt_proj.weight"]
    assert [t.param for t in m2.registry.weights("dt")] == ["in_proj.weight"]  # not dt_bias
    assert [t.param for t in m2.registry.weights("conv1d")] == ["conv1d.weight"]  # not conv1d.bias
    for name in ("A_log", "D", "norm"):
        assert m2.registry.weights(name) == ()
    with pytest.raises(ValueError, match="unknown component 'w'"):
        m2.registry.weights("w")


def test_weight_sizes_match_config_dims_and_tensors(m2, m1):
    c = m2.model.config
    D, ED, GN, H, K = c.hidden_size, c.expand * c.hidden_size, c.n_groups * c.state_size, c.num_heads, c.conv_kernel
    expected = {"z": ED * D, "x": ED * D, "B": GN * D, "C": GN * D, "dt": H * D, "conv1d": (ED + 2 * GN) * K,
                "out_proj": D * ED}  # fmt: skip
    sizes = m2.registry.weight_sizes(m2.model)
    assert sizes == {(layer, k): v for layer in range(c.num_hidden_layers) for k, v in expected.items()}
    c = m1.model.config
    D, ED, N, R, K = c.hidden_size, c.intermediate_size, c.state_size, c.time_step_rank, c.conv_kernel
    expected = {"x": ED * D, "z": ED * D, "conv1d": ED * K, "dt": R * ED + ED * R, "B": N * ED, "C": N * ED,
                "out_proj": D * ED}  # fmt: skip
    got = m1.registry.weight_sizes(m1.model, ["dt", "B"])
    assert got == {(layer, k): expected[k] for layer in range(2) for k in ("dt", "B")}
    mixer = m1.model.backbone.layers[1].mixer  # the prunable weights hold every parameter of these matrices
    whole = mixer.in_proj.weight.numel() + mixer.x_proj.weight.numel() + mixer.dt_proj.weight.numel()
    whole += mixer.out_proj.weight.numel() + mixer.conv1d.weight.numel()
    assert sum(v for (layer, _), v in m1.registry.weight_sizes(m1.model).items() if layer == 1) == whole


def test_resolve(m2):
    reg = m2.registry
    assert reg.resolve() == ("z", "x", "B", "C", "dt", "out_proj")
    assert reg.resolve(exclude=()) == ("z", "x", "B", "C", "dt", "conv1d", "out_proj")
    assert reg.resolve(["out_proj", "z"]) == ("z", "out_proj")  # registry order
    assert reg.resolve("dt", exclude=None) == ("dt",)
    with pytest.raises(ValueError, match=r"^components: unknown component .q. for mamba2; allowed: z, x, B"):
        reg.resolve(["q"])
    with pytest.raises(ValueError, match="'A_log' has no weight matrix to prune"):
        reg.resolve(["A_log"])
    with pytest.raises(ValueError, match="components: 'conv1d' is both asked for and excluded"):
        reg.resolve(["conv1d"])
    with pytest.raises(ValueError, match="^exclude: unknown component 'conv' for mamba2"):
        reg.resolve(exclude=["conv"])
    with pytest.raises(ValueError, match="no component left"):
        reg.resolve(exclude=reg.prunable_components)

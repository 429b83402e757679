"""act_norm and weight_scores against activations captured independently at the input hooks."""

from functools import reduce

import pytest
import torch

from sensitivity.attribution import attribute, weight_scores
from sensitivity.core import capture, load_model


def _norms(lm, windows, layer, point):
    """||X_j|| = sqrt(sum over windows and positions of x_j^2 / n_windows), from captured activations."""
    name = f"layers.{layer}.{point}"
    with capture(lm, [name]) as acts, torch.no_grad():
        for ids in windows.ids:  # one window per forward: independent of the batching under test
            lm.model(input_ids=ids[None], use_cache=False)
    x = torch.cat(acts[name]).double()  # (n, L, C)
    return (x.square().sum((0, 1)) / len(windows)).sqrt()  # (C,)


def _weight(lm, layer, t):
    w = reduce(getattr, t.param.split("."), lm.registry.mixer(lm.model, layer)).detach().double()
    return w if t.rows is None else w[t.rows[0] : t.rows[1]]


# (model, layer, component, [(weight slice index, input hook point)])
CASES = [
    ("tiny:mamba2", 0, "x", [(0, "in")]),
    ("tiny:mamba2", 1, "conv1d", [(0, "conv_in")]),
    ("tiny:mamba2", 1, "out_proj", [(0, "out_proj_in")]),
    ("tiny:mamba", 1, "dt", [(0, "u"), (1, "dt_low")]),  # x_proj dt rows + dt_proj: concatenated
    ("tiny:mamba", 0, "conv1d", [(0, "x")]),
    ("tiny:falcon-mamba", 0, "B", [(0, "u")]),
]


@pytest.mark.parametrize("name,layer,component,inputs", CASES)
def test_act_norm_matches_captured_inputs(name, layer, component, inputs, make_windows):
    lm = load_model(name)
    windows = make_windows(3, 20, seed=5)
    df = attribute(lm, windows, methods=["act_norm"], layers=[layer], components=[component], batch_size=2,
                   owl_m=2.0, show_progress=False)  # fmt: skip
    got = df.set_index("metric")["value"]
    norms, scores = [], []
    for idx, point in inputs:
        t = lm.registry.component(component).tensors[idx]
        w, norm = _weight(lm, layer, t), _norms(lm, windows, layer, point)
        norms.append(norm)
        scores.append((w.abs() * (norm[None, :] if w.dim() == 2 else norm[:, None, None])).flatten())
    norm, score = torch.cat(norms), torch.cat(scores)
    srt = norm.sort().values
    mid = len(srt) // 2
    median = srt[mid] if len(srt) % 2 else (srt[mid - 1] + srt[mid]) / 2
    assert got["l2_mean"] == pytest.approx(norm.mean().item(), rel=1e-5)
    assert got["max_over_median"] == pytest.approx((srt[-1] / median).item(), rel=1e-5)
    assert got["outlier_ratio"] == pytest.approx((score > 2.0 * score.mean()).double().mean().item(), abs=1e-9)
    assert got["l2_mean"] > 0 and set(got.index) == {"l2_mean", "max_over_median", "outlier_ratio"}


def test_weight_scores_shapes_keys_and_values(make_windows):
    lm = load_model("tiny:mamba2")
    windows = make_windows(2, 16, seed=6)
    mixer = lm.registry.mixer(lm.model, 1)
    wanda = weight_scores(lm, windows, "wanda", layers=[1], show_progress=False)
    magnitude = weight_scores(lm, windows, "magnitude", layers=1, show_progress=False)
    taylor = weight_scores(lm, windows, "taylor", layers=[1], components=["A_log", "x"], show_progress=False)
    assert {k.component for k in wanda} == {"z", "x", "B", "C", "dt", "conv1d", "out_proj"}
    assert {k.component for k in magnitude} == set(lm.registry.component_names)
    assert set(taylor) == {(1, "A_log", "A_log"), (1, "x", "in_proj.weight[128:256]")}
    for scores in (wanda, magnitude, taylor):
        for key, score in scores.items():
            t = next(t for t in lm.registry.component(key.component).tensors if t.describe() == key.tensor)
            assert score.shape == t.get(mixer).shape and score.dtype == torch.float32
    norm = _norms(lm, windows, 1, "conv_in")
    conv = mixer.conv1d.weight.detach().double()
    torch.testing.assert_close(wanda[(1, "conv1d", "conv1d.weight")].double(), conv.abs() * norm[:, None, None])
    torch.testing.assert_close(magnitude[(1, "D", "D")], mixer.D.detach().abs())
    with pytest.raises(ValueError, match="^method: unknown weight score 'act_norm'; allowed: magnitude, wanda, taylor"):
        weight_scores(lm, windows, "act_norm")

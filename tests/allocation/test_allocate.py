"""Allocators: the pure functions against hand computations and brute force, then every method of ``allocate`` on
tiny models, cross-checked against independent computations (OWL ratios from captured activations, Fisher from
HF's own loss), and the read path of real probe output."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sensitivity.allocation import (
    FISHER_GRID,
    METHODS,
    allocate,
    depth_ramp,
    fit_budget,
    greedy_allocate,
    lower_convex_hull,
    owl_sparsity,
)
from sensitivity.core import capture, hook_name, load_model
from sensitivity.data import Windows

# ---- fit_budget ----


def _weighted(s, n) -> float:
    return float((torch.as_tensor(n, dtype=torch.float64) * s).sum() / sum(n))


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(-1, 2), st.integers(1, 10_000), st.floats(0, 0.5), st.floats(0, 0.49)),
        min_size=1,
        max_size=12,
    ),
    frac=st.floats(0, 1),
)
def test_fit_budget_meets_budget_and_bounds(data, frac):
    raw = [d[0] for d in data]
    n = [d[1] for d in data]
    lo = [d[2] for d in data]
    hi = [d[2] + d[3] for d in data]
    least = _weighted(torch.tensor(lo, dtype=torch.float64), n)
    most = _weighted(torch.tensor(hi, dtype=torch.float64), n)
    budget = least + frac * (most - least)
    s = fit_budget(raw, n, budget, lo, hi)
    assert s.dtype == torch.float64 and s.shape == (len(data),)
    assert abs(_weighted(s, n) - budget) < 1e-12
    assert (s >= torch.tensor(lo, dtype=torch.float64)).all() and (s <= torch.tensor(hi, dtype=torch.float64)).all()
    # a shift: entries strictly inside their bounds moved by the same amount
    inside = [(si - r) for si, r, a, b in zip(s.tolist(), raw, lo, hi) if a + 1e-12 < si < b - 1e-12]
    assert max(inside, default=0) - min(inside, default=0) < 1e-9


def test_fit_budget_hand_cases():
    assert fit_budget([0.2, 0.6], [1, 3], 0.5).tolist() == pytest.approx([0.2, 0.6])
    # shift up by 0.1 without bounds: (0.3 + 0.7 * 3) / 4 = 0.6
    assert fit_budget([0.2, 0.6], [1, 3], 0.6).tolist() == pytest.approx([0.3, 0.7])
    # hi = 0.65 binds the big entry: (s0 + 3 * 0.65) / 4 = 0.6 -> s0 = 0.45
    assert fit_budget([0.2, 0.6], [1, 3], 0.6, hi=0.65).tolist() == pytest.approx([0.45, 0.65])
    # per-entry bounds
    assert fit_budget([0.5, 0.5], [1, 1], 0.3, lo=[0.0, 0.4], hi=[1.0, 0.4]).tolist() == pytest.approx([0.2, 0.4])


def test_fit_budget_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"budget 0.7 is infeasible: .* between 0 and 0.6"):
        fit_budget([0.5, 0.5], [1, 1], 0.7, hi=0.6)
    with pytest.raises(ValueError, match="lower bound 0.5 is above upper bound 0.4"):
        fit_budget([0.5], [1], 0.45, lo=0.5, hi=0.4)
    with pytest.raises(ValueError, match="sizes must be > 0"):
        fit_budget([0.5], [0], 0.5)
    with pytest.raises(ValueError, match="lo has 2 values for 3 entries"):
        fit_budget([0.5] * 3, [1] * 3, 0.5, lo=[0, 0])


# ---- OWL and depth ----


def _owl_reference(ratios, sparsity_ratio, lamda):
    """The arithmetic of ``prune_wanda_outlier`` in OWL's ``lib/prune_all.py`` (numpy, percent ratios)."""
    all_layer_ratio = np.array(ratios) * 100
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (
        1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lamda * 2
    )
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
    return 1 - all_layer_ratio  # layer_sparsity_ratio = 1 - all_layer_ratio[i]


def test_owl_sparsity_matches_the_released_formula():
    ratios = [0.012, 0.03, 0.007, 0.02, 0.011]
    got = owl_sparsity(ratios, 0.7, 0.08)
    assert got.tolist() == pytest.approx(_owl_reference(ratios, 0.7, 0.08).tolist(), abs=1e-12)
    # by hand: normalised [0.04, 0.16, 0, 0.2 * 13/23 ...]: the layer with most outliers gets the least sparsity
    assert int(got.argmin()) == 1 and int(got.argmax()) == 2
    assert got.max() - got.min() == pytest.approx(0.16) and got.mean() == pytest.approx(0.7)
    assert owl_sparsity([1.0, 3.0], 0.5, 0.1).tolist() == pytest.approx([0.6, 0.4])


def test_owl_sparsity_equal_ratios_is_uniform_and_errors():
    assert owl_sparsity([0.01] * 4, 0.5, 0.08).tolist() == [0.5] * 4
    with pytest.raises(ValueError, match="owl lambda -0.1"):
        owl_sparsity([1, 2], 0.5, -0.1)
    with pytest.raises(ValueError, match="^budget: 1.0 is out of range; allowed: 0 <= value < 1"):
        owl_sparsity([1, 2], 1.0, 0.1)


def test_depth_ramp():
    assert depth_ramp(5, 0.5, 0.2).tolist() == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])
    assert depth_ramp(1, 0.5, 0.2).tolist() == [0.5]
    assert depth_ramp(3, 0.5, -0.1).tolist() == pytest.approx([0.6, 0.5, 0.4])
    with pytest.raises(ValueError, match="n_layers 0"):
        depth_ramp(0, 0.5, 0.1)


# ---- convex hull and the greedy allocator ----


def test_lower_convex_hull_hand_example():
    pts = [(0, 0), (0.25, 0.5), (0.5, 0.15), (0.75, 0.3), (1, 1)]
    # (0.25, 0.5) is above the chord (0,0)-(0.5,0.15); then slopes 0.3, 0.6, 2.8 increase: all three stay
    assert lower_convex_hull(pts) == [(0.0, 0.0), (0.5, 0.15), (0.75, 0.3), (1.0, 1.0)]
    # (0.5, 0.2) lies on the chord (0,0)-(0.75,0.3): dropped
    assert lower_convex_hull([(0, 0), (0.5, 0.2), (0.75, 0.3), (1, 1)]) == [(0.0, 0.0), (0.75, 0.3), (1.0, 1.0)]
    assert lower_convex_hull([(0, 0), (0.5, 0.5), (1, 1)]) == [(0.0, 0.0), (1.0, 1.0)]  # collinear dropped
    assert lower_convex_hull([(0.5, 2.0), (0, 0)]) == [(0.0, 0.0), (0.5, 2.0)]  # sorted


def _pl(curve, x):
    xs, ys = zip(*sorted(curve))
    return float(np.interp(x, xs, ys))


def _brute_force(curves, n, budget, lo, hi, step=0.0025):
    """Min of the summed piecewise-linear losses over a grid of (s0, s1); s2 is fixed by the budget."""
    grid = np.arange(0, 1, step)
    best, arg = math.inf, None
    caps = [min(hi, max(x for x, _ in c)) for c in curves]
    for s0, s1 in itertools.product(grid, grid):
        if not (lo <= s0 <= caps[0] and lo <= s1 <= caps[1]):
            continue
        s2 = (budget * sum(n) - n[0] * s0 - n[1] * s1) / n[2]
        if not lo - 1e-12 <= s2 <= caps[2] + 1e-12:
            continue
        loss = _pl(curves[0], s0) + _pl(curves[1], s1) + _pl(curves[2], s2)
        if loss < best:
            best, arg = loss, (s0, s1, s2)
    return best, arg


def _random_curves(rng, convex: bool):
    curves = []
    for _ in range(3):
        xs = [0.0, *sorted(rng.choice(np.arange(1, 19) / 20, size=3, replace=False))]
        if convex:  # increasing slopes
            slopes = np.sort(rng.uniform(-0.05, 2.0, size=3))
            ys = np.concatenate([[0.0], np.cumsum(slopes * np.diff(xs))])
        else:
            ys = np.concatenate([[0.0], np.cumsum(rng.uniform(-0.2, 1.0, size=3))])
        curves.append(list(zip(xs, ys.tolist())))
    return curves


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_optimal_on_convex_curves(seed):
    rng = np.random.default_rng(seed)
    curves = _random_curves(rng, convex=True)
    n = rng.integers(50, 500, size=3).tolist()
    reach = sum(ni * c[-1][0] for ni, c in zip(n, curves)) / sum(n)
    budget = float(rng.uniform(0.05, 0.95) * reach)
    got = greedy_allocate(curves, n, budget)
    assert abs(_weighted(got.sparsity, n) - budget) < 1e-12
    assert got.loss == pytest.approx(sum(_pl(c, s) for c, s in zip(curves, got.sparsity.tolist())), abs=1e-12)
    best, _ = _brute_force(curves, n, budget, 0.0, 1.0)
    assert got.loss <= best + 1e-9  # optimal: no grid point beats it
    assert got.loss >= best - 0.05  # and the grid gets close to it


@pytest.mark.parametrize("seed", range(6))
def test_greedy_solves_the_convexified_problem_on_any_curves(seed):
    rng = np.random.default_rng(100 + seed)
    curves = _random_curves(rng, convex=False)
    n = rng.integers(50, 500, size=3).tolist()
    lo, hi = 0.05, 0.9
    caps = [min(hi, c[-1][0]) for c in curves]
    budget = float(lo + rng.uniform(0.1, 0.9) * (sum(ni * ci for ni, ci in zip(n, caps)) / sum(n) - lo))
    got = greedy_allocate(curves, n, budget, lo, hi)
    s = got.sparsity.tolist()
    assert abs(_weighted(got.sparsity, n) - budget) < 1e-12
    assert all(lo - 1e-12 <= si <= ci + 1e-12 for si, ci in zip(s, caps))
    best, _ = _brute_force(curves, n, budget, lo, hi)
    # the value on the hulls of the restricted curves is a lower bound of every feasible point's loss ...
    hulls = []
    for c, cap in zip(curves, caps):
        inner = [(lo, _pl(c, lo))] + [(x, y) for x, y in c if lo < x < cap] + [(cap, _pl(c, cap))]
        hulls.append(lower_convex_hull(inner))
    assert sum(_pl(h, si) for h, si in zip(hulls, s)) <= best + 1e-9
    # ... and the reported loss is the real (piecewise-linear) loss of a feasible point
    assert got.loss == pytest.approx(sum(_pl(c, si) for c, si in zip(curves, s)), abs=1e-12)
    assert got.loss >= best - 0.05


def test_greedy_hand_example_and_bounds():
    curves = [[(0, 0), (0.5, 0.1), (0.9, 1.0)], [(0, 0), (0.5, 0.4), (0.9, 2.0)]]
    got = greedy_allocate(curves, [100, 100], 0.5)
    assert got.sparsity.tolist() == [0.5, 0.5] and got.loss == pytest.approx(0.5)
    # budget 0.6 = 120 params: both cheap segments (100), then 20 more on entry 0's second segment (slope 2.25 < 4)
    got = greedy_allocate(curves, [100, 100], 0.6)
    assert got.sparsity.tolist() == pytest.approx([0.7, 0.5]) and got.loss == pytest.approx(0.1 + 0.45 + 0.4)
    # size matters: a tiny entry's segment prunes few parameters for its loss
    got = greedy_allocate([[(0, 0), (0.8, 0.1)], [(0, 0), (0.8, 0.1)]], [10, 1000], 0.4)
    assert got.sparsity.tolist() == pytest.approx([0.0, 0.404])  # 404 params, all from the big entry
    # lo is a floor for every entry, hi caps them
    # lo = 0.3 for both (60 params), then 20 more: entry 0 up to hi (15, slope 0.2), entry 1 the last 5 (slope 0.8)
    got = greedy_allocate(curves, [100, 100], 0.4, lo=0.3, hi=0.45)
    assert got.sparsity.tolist() == pytest.approx([0.45, 0.35])


def test_greedy_does_not_extrapolate():
    curves = [[(0, 0), (0.5, 0.1)], [(0, 0), (0.75, 0.1)]]
    with pytest.raises(ValueError, match=r"budget 0.7 is infeasible: .* between 0 and 0.625 \(no extrapolation"):
        greedy_allocate(curves, [1, 1], 0.7)
    with pytest.raises(ValueError, match="entry 0: min sparsity 0.6 is above"):
        greedy_allocate(curves, [1, 1], 0.65, lo=0.6)
    with pytest.raises(ValueError, match="no point at sparsity 0"):
        greedy_allocate([[(0.25, 0.1)]], [1], 0.1)
    with pytest.raises(ValueError, match="lists a sparsity twice"):
        greedy_allocate([[(0, 0), (0.5, 0.1), (0.5, 0.2)]], [1], 0.1)


# ---- allocate on tiny models ----


def _windows(n: int = 4, seqlen: int = 32, seed: int = 0) -> Windows:
    ids = torch.randint(0, 257, (n, seqlen), generator=torch.Generator().manual_seed(seed))  # (n, L)
    return Windows(ids=ids, seqlen=seqlen, split="train", source="test", kind="calibration", seed=seed, stride=0)


@pytest.fixture(scope="module")
def m2():
    return load_model("tiny:mamba2")


@pytest.fixture(scope="module", params=["tiny:mamba2", "tiny:mamba"])
def lm(request):
    return load_model(request.param)


def _check_budget(schedule, budget, lo=0.0, hi=0.95):
    assert schedule.budget == budget and abs(schedule.overall() - budget) < 1e-9
    assert all(lo - 1e-12 <= s <= hi + 1e-12 for s in schedule.sparsity.values())


def test_uniform_and_depth(lm, caplog):
    s = allocate(lm, "uniform", 0.4, show_progress=False)
    _check_budget(s, 0.4)
    assert set(s.sparsity.values()) == {0.4} and "conv1d" not in s.components and s.method == "uniform"
    assert s.params == lm.registry.weight_sizes(lm.model, ["z", "x", "B", "C", "dt", "out_proj"])
    s = allocate(lm, "depth", 0.5, depth_spread=0.2, exclude=(), show_progress=False)
    _check_budget(s, 0.5)
    assert s.per_layer() == pytest.approx([0.3, 0.7]) and "conv1d" in s.components
    assert s.meta == {"min_sparsity": 0.0, "max_sparsity": 0.95, "seed": 0, "depth_spread": 0.2}
    # the ramp is clipped at max_sparsity and the rest shifted to keep the budget, with a warning
    with caplog.at_level("WARNING", logger="sensitivity.allocation.allocate"):
        s = allocate(lm, "depth", 0.5, depth_spread=0.2, max_sparsity=0.6, show_progress=False)
    _check_budget(s, 0.5, hi=0.6)
    assert s.per_layer() == pytest.approx([0.4, 0.6])
    assert "depth_spread 0.2 ramps layers from 0.3 to 0.7: clipped to [min_sparsity, max_sparsity] = [0, 0.6]" in (
        caplog.text)  # fmt: skip
    with pytest.raises(ValueError, match=r"depth_spread: 0.6 ramps layers from -0.1 to 1.1, outside \[0, 1\); "
                                         r"allowed: \|depth_spread\| < 0.5 at budget 0.5"):  # fmt: skip
        allocate(lm, "depth", 0.5, depth_spread=0.6, show_progress=False)


def _independent_outlier_ratios(lm, windows, comps, m):
    """WANDA scores from activations captured at each weight's input hook (not through channel_stats)."""
    reg = lm.registry
    names = sorted({hook_name(layer, reg.input_hook(t.param)) for layer in range(reg.n_layers) for c in comps
                    for t in reg.weights(c)})  # fmt: skip
    with torch.no_grad(), capture(lm.model, names) as acts:
        lm.model(input_ids=windows.ids, use_cache=False)
    ratios = []
    for layer in range(reg.n_layers):
        mixer = reg.mixer(lm.model, layer)
        scores = []
        for c in comps:
            for t in reg.weights(c):
                x = acts[hook_name(layer, reg.input_hook(t.param))][0].float()  # (B, L, C)
                norm = (x.pow(2).sum((0, 1)) / len(windows)).sqrt()  # (C,)
                w = t.get(mixer).detach().float()
                if w.dim() == 2:
                    norm = norm if t.cols is None else norm[t.cols[0] : t.cols[1]]
                    scores.append((w.abs() * norm[None, :]).flatten())
                else:  # depthwise conv (C, 1, K): channel c's input norm
                    scores.append((w.abs() * norm[:, None, None]).flatten())
        flat = torch.cat(scores)
        ratios.append((flat > m * flat.mean()).float().mean().item())
    return ratios


def test_owl_matches_independent_ratios(lm):
    windows = _windows()
    s = allocate(lm, "owl", 0.5, windows=windows, owl_m=3.0, owl_lambda=0.1, exclude=(), show_progress=False)
    _check_budget(s, 0.5)
    comps = ("z", "x", "B", "C", "dt", "conv1d", "out_proj") if lm.arch == "mamba2" else (
        "x", "z", "conv1d", "dt", "B", "C", "out_proj")  # fmt: skip
    ratios = _independent_outlier_ratios(lm, windows, comps, 3.0)
    assert s.meta["outlier_ratios"] == pytest.approx(ratios, rel=1e-6)
    expected = _owl_reference(ratios, 0.5, 0.1) if ratios[0] != ratios[1] else [0.5, 0.5]
    assert s.per_layer() == pytest.approx(list(expected), abs=1e-9)  # equal layer sizes: OWL meets the budget
    for (layer, _), v in s.sparsity.items():
        assert v == pytest.approx(s.per_layer()[layer], abs=1e-12)  # one sparsity per layer
    assert s.meta["owl_m"] == 3.0 and s.meta["owl_lambda"] == 0.1 and s.meta["windows"]["n"] == 4


def _synthetic_probes(lm, comps, scale, seeds=(0,)) -> pd.DataFrame:
    """Probe rows of kind ``wanda`` at sparsities s, delta_nll = scale[component] * (layer + 1) * s**2 (+ noise), plus
    distractors (other kinds and metrics)."""
    rows = []
    for layer in range(lm.registry.n_layers):
        for c in comps:
            for s in (0.25, 0.5, 0.75):
                for seed in seeds:
                    v = scale[c] * (layer + 1) * s**2 + 0.01 * seed
                    rows += [dict(layer=layer, component=c, index=None, kind="wanda", sparsity=s,
                                  metric="delta_nll", value=v, seed=seed),
                             dict(layer=layer, component=c, index=None, kind="wanda", sparsity=s,
                                  metric="ppl_ratio", value=math.exp(v), seed=seed),
                             dict(layer=layer, component=c, index=None, kind="magnitude", sparsity=s,
                                  metric="delta_nll", value=100.0, seed=seed)]  # fmt: skip
            rows.append(dict(layer=layer, component=c, index=None, kind="zero", sparsity=None, metric="delta_nll",
                             value=5.0, seed=0))  # fmt: skip
    return pd.DataFrame(rows)


def test_sensitivity_from_probe_frame(lm):
    comps = ("z", "x", "B", "C", "dt", "out_proj") if lm.arch == "mamba2" else ("x", "z", "dt", "B", "C", "out_proj")
    scale = {c: 1.0 for c in comps} | {"out_proj": 20.0}
    df = _synthetic_probes(lm, comps, scale, seeds=(0, 1))
    s = allocate(lm, "sensitivity", 0.5, probes=df, max_sparsity=0.75, show_progress=False)
    _check_budget(s, 0.5, hi=0.75)
    assert s.meta["source"] == "probes" and s.meta["probe_method"] == "wanda" and s.meta["probes"] is None
    # the same allocation from the curves built by hand (mean over the two seeds: + 0.005)
    keys = list(s.sparsity)
    curves = [[(0.0, 0.0)] + [(x, scale[c] * (layer + 1) * x**2 + 0.005) for x in (0.25, 0.5, 0.75)]
              for layer, c in keys]  # fmt: skip
    ref = greedy_allocate(curves, [s.params[k] for k in keys], 0.5, 0.0, 0.75)
    assert list(s.sparsity.values()) == pytest.approx(ref.sparsity.tolist(), abs=1e-12)
    assert s.meta["predicted_loss"] == pytest.approx(ref.loss)
    # the sensitive out_proj and the deeper layer are pruned less
    assert s.get(0, "out_proj") < s.get(0, "z") and s.get(1, "z") <= s.get(0, "z")


def test_sensitivity_probe_errors(lm):
    comps = ("z", "x") if lm.arch == "mamba2" else ("x", "z")
    df = _synthetic_probes(lm, comps, {c: 1.0 for c in comps})
    with pytest.raises(ValueError, match=r"no wanda probes \(delta_nll\) for \(layer, component\) .*\(0, B\), "
                                         r"\(0, C\).*components= / exclude="):  # fmt: skip
        allocate(lm, "sensitivity", 0.5, probes=df, show_progress=False)
    s = allocate(lm, "sensitivity", 0.5, probes=df, components=comps, max_sparsity=0.75, show_progress=False)
    _check_budget(s, 0.5, hi=0.75)
    with pytest.raises(ValueError, match=r"^budget: 0.8 is outside \[min_sparsity, max_sparsity\] = \[0, 0.75\]"):
        allocate(lm, "sensitivity", 0.8, probes=df, components=comps, max_sparsity=0.75)
    with pytest.raises(ValueError, match="budget 0.8 is infeasible.*between 0 and 0.75"):
        allocate(lm, "sensitivity", 0.8, probes=df, components=comps)  # probes only reach 0.75
    with pytest.raises(ValueError, match="^options.metric: 'ppl_ratio' is invalid; allowed: one of 'delta_nll'"):
        allocate(lm, "sensitivity", 0.5, probes=df, metric="ppl_ratio")
    with pytest.raises(ValueError, match="no magnitude probes with metric 'kl'; kinds present: magnitude, wanda"):
        allocate(lm, "sensitivity", 0.5, probes=df, probe_method="magnitude", metric="kl", components=comps)
    with pytest.raises(ValueError, match="lacks column 'metric'"):
        allocate(lm, "sensitivity", 0.5, probes=df.drop(columns="metric"))
    with pytest.raises(ValueError, match="^probes: sensitivity needs probes"):
        allocate(lm, "sensitivity", 0.5)
    with pytest.raises(ValueError, match="^probes: '/nonexistent/probes' does not exist"):
        allocate(lm, "sensitivity", 0.5, probes="/nonexistent/probes")


def test_fisher_source_matches_independent_gradients(lm):
    windows = _windows(n=3)
    comps = ("out_proj", "B")
    s = allocate(lm, "sensitivity", 0.3, windows=windows, source="fisher", components=comps, show_progress=False)
    _check_budget(s, 0.3)
    # independent Fisher: one backward of HF's own causal-LM loss per window
    reg, model = lm.registry, lm.model
    keys = list(s.sparsity)
    params = {k: [t for t in reg.weights(k[1])] for k in keys}
    sq = {(k, i): 0.0 for k in keys for i in range(len(params[k]))}
    for w in range(len(windows)):
        model.zero_grad(set_to_none=True)
        ids = windows.ids[w : w + 1]
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for k in keys:
            mixer = reg.mixer(model, k[0])
            for i, t in enumerate(params[k]):
                weight = getattr(mixer, t.param.split(".")[0]).weight
                g = weight.grad
                g = g if t.rows is None else g[t.rows[0] : t.rows[1]]
                sq[(k, i)] = sq[(k, i)] + g.double() ** 2
    model.zero_grad(set_to_none=True)
    curves = []
    for k in keys:
        mixer = reg.mixer(model, k[0])
        sal = torch.cat([(0.5 * sq[(k, i)] / len(windows) * t.get(mixer).detach().double() ** 2).flatten()
                         for i, t in enumerate(params[k])]).sort().values  # fmt: skip
        curves.append([(x, sal[: int(x * sal.numel())].sum().item()) for x in FISHER_GRID])
    ref = greedy_allocate(curves, [s.params[k] for k in keys], 0.3, 0.0, 0.95)
    assert list(s.sparsity.values()) == pytest.approx(ref.sparsity.tolist(), abs=1e-4)
    assert s.meta["predicted_loss"] == pytest.approx(ref.loss, rel=1e-3)
    assert s.meta["source"] == "fisher" and s.meta["grid"][-1] == 0.95


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="random"), "unknown allocation method 'random'; allowed: uniform, depth, owl, sensitivity, unit"),
        (dict(budget=1.0), "^budget: 1.0 is out of range; allowed: 0 <= value < 1"),
        (dict(budget=-0.1), "^budget: -0.1 is out of range"),
        (dict(min_sparsity=0.6, max_sparsity=0.5), "^min_sparsity: 0.6 is above max_sparsity 0.5"),
        (dict(min_sparsity=0.6), r"^budget: 0.5 is outside \[min_sparsity, max_sparsity\] = \[0.6, 0.95\]"),
        (dict(components=["q"]), "^components: unknown component 'q'"),
        (dict(method="owl"), "^windows: owl needs calibration windows"),
        (dict(method="sensitivity", source="hessian"),
         "^options.source: 'hessian' is invalid; allowed: one of 'probes' or 'fisher'"),
        (dict(method="sensitivity", source="fisher"), "^windows: sensitivity needs calibration windows"),
        (dict(method="sensitivity", probe_method="taylor"),
         "^options.probe_method: 'taylor' is invalid; allowed: one of 'wanda' or 'magnitude'"),
        (dict(seed=1.5), "^seed: 1.5 is invalid; allowed: an integer"),
        (dict(method="depth", owl_m=3), "^options.owl_m: not an option of 'depth'; its options: depth_spread"),
        (dict(method="owl", owl_m=0), "^options.owl_m: 0 is out of range; allowed: value > 0"),
    ],
)
def test_allocate_argument_errors(m2, kwargs, match):
    lm = m2
    args = {"method": "uniform", "budget": 0.5} | kwargs
    with pytest.raises(ValueError, match=match):
        allocate(lm, args.pop("method"), args.pop("budget"), show_progress=False, **args)


def test_every_method_round_trips_through_yaml(lm):
    comps = ("z", "x", "B", "C", "dt", "out_proj") if lm.arch == "mamba2" else ("x", "z", "dt", "B", "C", "out_proj")
    df = _synthetic_probes(lm, comps, {c: 1.0 for c in comps})
    for method in METHODS:
        s = allocate(lm, method, 0.5, windows=_windows(), probes=df, max_sparsity=0.75, show_progress=False)
        back = type(s).from_yaml(s.to_yaml())
        assert back == s and back.validate(lm.registry, lm) is back


@pytest.mark.slow
def test_sensitivity_reads_real_probe_output(tmp_path):
    """The read path of a real sweep: ``sensitivity.probe`` writes probes.csv, ``allocate`` reads the directory."""
    from sensitivity.probes import probe

    lm = load_model("tiny:mamba2")
    comps = ("z", "x", "B", "C", "dt", "out_proj")
    df = probe(lm, components=comps, kinds=["wanda"], heldout=_windows(n=2, seed=1), calibration=_windows(n=2),
               batch_size=2, out=tmp_path, show_progress=False)  # fmt: skip
    assert set(df["kind"]) == {"wanda"} and set(df["sparsity"]) == {0.25, 0.5, 0.75}
    s = allocate(lm, "sensitivity", 0.5, probes=tmp_path, max_sparsity=0.75, show_progress=False)
    _check_budget(s, 0.5, hi=0.75)
    assert s.meta["probes"] == str(tmp_path / "probes.csv") and s.meta["metric"] == "delta_nll"
    from_frame = allocate(lm, "sensitivity", 0.5, probes=df, max_sparsity=0.75, show_progress=False)
    assert from_frame.sparsity == pytest.approx(s.sparsity, abs=1e-9)  # the CSV keeps the values
    kl = allocate(lm, "sensitivity", 0.5, probes=tmp_path / "probes.csv", metric="kl", max_sparsity=0.75,
                  show_progress=False)  # fmt: skip
    _check_budget(kl, 0.5, hi=0.75)

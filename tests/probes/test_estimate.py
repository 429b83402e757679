"""Probe estimates: first order exact where the layer is linear in the patch and equal to finite differences; the
Fisher estimate equal to the second derivative of the exact KL, the empirical one to a per-window loop; marking,
resume, streamed = in memory."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pandas as pd
import pytest
import torch

from sensitivity.core import load_model
from sensitivity.core.hooks import hook_name, hooks
from sensitivity.data import calibration_windows, load_corpus
from sensitivity.probes import probe
from sensitivity.probes.ablations import KINDS, Context, Probe
from sensitivity.probes.estimate import estimate

SMALL = dict(windows=3, calib_windows=2, seqlen=32, batch_size=2, show_progress=False)
KEY = ["layer", "component", "index", "kind", "sparsity"]


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("sample")


def _trained_like(name: str, seed: int = 3):
    """A tiny model with weights moved off their initial values, so that every component matters."""
    lm = load_model(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return lm


def _delta(df: pd.DataFrame) -> pd.Series:
    return df[df.metric == "delta_nll"].set_index(KEY).value


def test_linear_equals_local_where_the_layer_is_linear_in_the_patch(corpus):
    # Mamba-1: y is linear in B, C and D, and the block output is linear in y and in out_proj's weights, so the
    # activation and weight gradients give exactly what running the ablated layer and linearising after it gives
    lm = _trained_like("tiny:mamba")
    # (resample too: another window's B, C or mixer output, read from the dense activations of the other windows)
    opts = dict(components=["B", "C", "D", "out_proj"], kinds=["zero", "magnitude", "resample"], sparsities=[0.5],
                **SMALL)  # fmt: skip
    linear = _delta(probe(lm, corpus, estimate=True, estimator="linear", **opts))
    local = _delta(probe(lm, corpus, estimate=True, estimator="local", **opts))
    assert len(linear) == 2 * (4 + 3 + 3)  # zero of B, C, D, out_proj; magnitude and resample of B, C, out_proj
    assert (linear.abs() > 1e-4).all()
    assert ((linear - local).abs() / local.abs()).max() < 1e-4
    # and so does the second-order estimate, read at the hook points or at the layer output (layer_kinds)
    point = probe(lm, corpus, estimate=True, **opts)
    layer = probe(lm, corpus, estimate=True, layer_kinds=["zero", "magnitude", "resample"], **opts)
    assert set(layer.estimator) == {"fisher K=2, layer"} and set(point.estimator) == {"fisher K=2"}
    for metric in ("delta_nll", "kl"):
        a, b = (df[df.metric == metric].value.to_numpy() for df in (point, layer))
        assert (abs(a) > 1e-6).all() and (abs(a - b) / abs(b)).max() < 1e-3


def _nudge(eps: float, weights: bool):
    """A kind scaling a component's activation (or weights) by 1 + eps."""

    @contextmanager
    def fn(model, registry, p, ctx):
        if not weights:
            with hooks(model, {hook_name(p.layer, registry.component(p.component).hook): lambda t: t * (1 + eps)}):
                yield
            return
        views = registry.tensors(model, p.layer, p.component)
        saved = [v.detach().clone() for v in views]
        with torch.no_grad():
            for v in views:
                v.mul_(1 + eps)
        try:
            yield
        finally:
            with torch.no_grad():
                for v, s in zip(views, saved):
                    v.copy_(s)

    return fn


@pytest.mark.parametrize(("name", "task"), [("tiny:mamba", "text"), ("tiny:mamba2", "text"), ("tiny:bamba", "text"),
                                           ("tiny:mamba2", "recall:3")])  # fmt: skip
@pytest.mark.parametrize("weights", [False, True])
def test_estimate_matches_finite_differences(corpus, name, task, weights):
    lm = _trained_like(name)
    objective = {} if task == "text" else {"task": task, "task_items": 6}
    comps = ["x", "B", "dt"] if not weights else ["x", "C", "out_proj"]
    comps += ["v"] if name == "tiny:bamba" and not weights else ["o"] if name == "tiny:bamba" else []
    eps = 2e-3
    exact = {}
    try:
        for sign in (1, -1):
            KINDS.register("nudge", description="scale by 1 + eps", replace=True,
                           applies=lambda reg, c: c in reg.component_names)(_nudge(sign * eps, weights))  # fmt: skip
            exact[sign] = _delta(probe(lm, corpus, components=comps, kinds=["nudge"], **objective, **SMALL))
            if sign == 1:
                est = _delta(probe(lm, corpus, components=comps, kinds=["nudge"], estimate=True, estimator="linear",
                                   **objective, **SMALL))  # fmt: skip
    finally:
        KINDS.unregister("nudge")
    central = (exact[1] - exact[-1]) / 2  # the first-order term, to O(eps^3)
    assert len(est) >= 6 and (est.abs() > 1e-6).all()
    assert ((est - central).abs() / central.abs()).max() < 2e-2
    assert ((est - exact[1]).abs()).max() < 0.2 * exact[1].abs().max()  # and near the one-sided change itself


def test_every_architecture_gets_an_estimate_per_exact_probe(corpus):
    for name in ("tiny:mamba2", "tiny:bamba", "tiny:zamba2", "tiny:falcon-h1"):
        lm = load_model(name)
        exact = probe(lm, corpus, layers=[0, 1], **SMALL)
        est = probe(lm, corpus, layers=[0, 1], estimate=True, **SMALL)
        pd.testing.assert_frame_equal(exact[KEY + ["metric"]], est[KEY + ["metric"]])
        assert not exact.estimated.any() and est.estimated.all()
        assert (exact.estimator == "exact").all() and (est.estimator == "fisher K=2").all()
        assert est[est.metric == "delta_nll"].value.map(math.isfinite).all()
        kl = est[est.metric == "kl"].value
        assert (kl >= 0).all() and (kl > 0).mean() > 0.9  # the Fisher quadratic: a KL, filled
        ratio = est[est.metric == "ppl_ratio"].value.to_numpy()
        assert ratio == pytest.approx(est[est.metric == "delta_nll"].value.map(math.exp).to_numpy())


def test_state_probe_is_estimated_by_its_layer_not_by_two_first_order_terms(corpus):
    # zeroing state n's B and C: each first-order term alone is the whole change of y, so their sum doubles it
    lm = _trained_like("tiny:mamba2")
    heldout = calibration_windows(corpus, lm.tokenizer, 2, 32, seed=0, split="test")
    state = Probe(1, "state", "remove", 3)
    linear = estimate(lm, [state], heldout, Context({}, {}), estimator="linear", batch_size=2)[state.key]["delta_nll"]
    local = estimate(lm, [state], heldout, Context({}, {}), estimator="local", batch_size=2)[state.key]["delta_nll"]
    assert linear == local
    b_zero, c_zero = (Probe(1, c, "zero") for c in ("B", "C"))
    only = estimate(lm, [b_zero, c_zero], heldout, Context({}, {}), estimator="linear", batch_size=2)
    b_term, c_term = only[b_zero.key]["delta_nll"], only[c_zero.key]["delta_nll"]
    assert b_term == pytest.approx(c_term, rel=0.5)  # each alone is about the whole effect of removing the channel


def test_estimated_rows_are_marked_in_the_csv_and_resume(corpus, tmp_path):
    lm = load_model("tiny:mamba2")
    out = tmp_path / "est"
    df = probe(lm, corpus, components=["dt", "mixer"], estimate=True, out=out, **SMALL)
    csv = pd.read_csv(out / "probes.csv")
    assert list(csv.columns)[-2:] == ["estimated", "estimator"] and csv.estimated.all()
    assert (csv.estimator == "fisher K=2").all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["estimate"] is True and manifest["spec"]["estimator"] == "fisher"
    assert manifest["spec"]["samples"] == 2
    again = probe(lm, corpus, components=["dt", "mixer"], estimate=True, out=out, **SMALL)
    pd.testing.assert_frame_equal(df, again)
    assert json.loads((out / "manifest.json").read_text())["resumed_with"] == len(df) // 3


def test_unknown_estimator_and_bad_samples_are_refused():
    from sensitivity.core.spec import SpecError
    from sensitivity.probes import ProbeOptions

    with pytest.raises(SpecError, match="estimator"):
        ProbeOptions(estimator="quadratic")
    with pytest.raises(SpecError, match="samples"):
        ProbeOptions(estimate=True, samples=0)
    with pytest.raises(SpecError, match=r"samples: 4 label samples are drawn by the fisher estimator only; it needs "
                                        r"estimate and estimator=fisher \(here linear\)"):  # fmt: skip
        ProbeOptions(estimate=True, estimator="linear", samples=4)


def test_cli_refuses_bad_samples_in_one_line(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-m", "sensitivity", "probe", "--estimate", "--samples", "0", "--out",
                           str(out)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and not out.exists()
    assert len(proc.stderr.strip().splitlines()) == 1 and "--samples" in proc.stderr and "0" in proc.stderr


def _windows(lm, corpus, n: int, seqlen: int = 32):
    return (calibration_windows(corpus, lm.tokenizer, n, seqlen, seed=0, split="test"),
            calibration_windows(corpus, lm.tokenizer, 2, seqlen, seed=0, split="train"))  # fmt: skip


@pytest.mark.parametrize("weights", [False, True])
def test_fisher_estimate_is_the_second_derivative_of_the_exact_kl(corpus, weights):
    # KL(dense || dense moved by eps * d) = (1/2) eps^2 d^T F d + O(eps^3); the central second difference of the
    # exact KL removes the odd terms. The estimate draws K labels per window: its relative noise ~ sqrt(2 / (K n))
    lm = _trained_like("tiny:mamba2")
    heldout, calibration = _windows(lm, corpus, 4)
    last = lm.registry.n_layers - 1
    opts = dict(components=["x", "C", "out_proj"], layers=[last], heldout=heldout, calibration=calibration,
                show_progress=False)  # fmt: skip
    eps, kl, est = 0.02, {}, None
    try:
        for sign in (1, -1):
            KINDS.register("nudge", description="scale by 1 + eps", replace=True,
                           applies=lambda reg, c: c in reg.component_names)(_nudge(sign * eps, weights))  # fmt: skip
            df = probe(lm, corpus, kinds=["nudge"], **opts)
            kl[sign] = df[df.metric == "kl"].set_index(KEY).value
            if sign == 1:
                df = probe(lm, corpus, kinds=["nudge"], estimate=True, samples=1024, **opts)
                est = df[df.metric == "kl"].set_index(KEY).value
    finally:
        KINDS.unregister("nudge")
    second = (kl[1] + kl[-1]) / 2  # (1/2) eps^2 d^T F d, to O(eps^4)
    assert len(est) == 3 and (second > 1e-7).all()
    assert ((est - second).abs() / second).max() < 0.08


def test_empirical_estimate_equals_a_per_window_loop(corpus):
    # (1/2N) sum_w s_w^2 with s_w the derivative of window w's summed NLL along the change, here from central
    # differences of the exact sweep run on each window alone
    from sensitivity.data import Windows

    lm = _trained_like("tiny:mamba2")
    heldout, calibration = _windows(lm, corpus, 3)
    opts = dict(components=["x", "B", "out_proj"], layers=[0, 1], calibration=calibration, show_progress=False)
    eps, per_window, est = 2e-3, [], None
    try:
        for sign in (1, -1):
            KINDS.register("nudge", description="scale by 1 + eps", replace=True,
                           applies=lambda reg, c: c in reg.component_names)(_nudge(sign * eps, False))  # fmt: skip
            per_window.append([_delta(probe(lm, corpus, kinds=["nudge"], heldout=Windows(
                heldout.ids[w : w + 1], heldout.seqlen, heldout.split, heldout.source, heldout.kind, heldout.seed,
                heldout.stride), **opts)) for w in range(len(heldout))])  # fmt: skip
            if sign == 1:
                est = _delta(probe(lm, corpus, kinds=["nudge"], estimate=True, estimator="empirical", heldout=heldout,
                                   **opts))  # fmt: skip
    finally:
        KINDS.unregister("nudge")
    positions = heldout.seqlen - 1
    s = [(plus - minus) / 2 * positions for plus, minus in zip(*per_window)]  # per window: summed NLL's derivative
    loop = sum(x**2 for x in s) / 2 / (positions * len(heldout))
    assert len(est) == 6 and (loop > 1e-9).all()
    assert ((est - loop).abs() / loop).max() < 0.03


@pytest.mark.slow
def test_estimate_matches_finite_differences_on_the_default_model():
    # the estimate is right on the trained model too: what it misses on real ablations is their curvature
    lm = load_model("default")
    opts = dict(windows=2, calib_windows=2, seqlen=256, show_progress=False, layers=[0, 4],
                components=["x", "dt", "out_proj"])  # fmt: skip
    exact = {}
    try:
        for sign in (1, -1):
            KINDS.register("nudge", description="scale by 1 + eps", replace=True,
                           applies=lambda reg, c: c in reg.component_names)(_nudge(sign * 0.05, False))  # fmt: skip
            exact[sign] = _delta(probe(lm, None, kinds=["nudge"], **opts))
            if sign == 1:
                est = _delta(probe(lm, None, kinds=["nudge"], estimate=True, estimator="linear", **opts))
    finally:
        KINDS.unregister("nudge")
    central = (exact[1] - exact[-1]) / 2
    assert ((est - central).abs() / central.abs()).max() < 0.03


def test_only_refuses_probes_the_options_do_not_plan(corpus):
    from sensitivity.core.spec import SpecError

    lm = load_model("tiny:mamba2")
    with pytest.raises(SpecError, match=r"only= names probes the options do not plan"):
        probe(lm, corpus, components=["dt"], only=[Probe(0, "B", "zero")], **SMALL)
    df = probe(lm, corpus, components=["dt"], kinds=["zero", "bypass"], only=[Probe(1, "dt", "bypass")], **SMALL)
    assert df[["layer", "component", "kind"]].drop_duplicates().values.tolist() == [[1, "dt", "bypass"]]


def test_cli_refuses_a_bad_exact_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "sensitivity", "report", "--exact", "top:x", "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == [
        "sensitivity report: error: argument --exact: 'top:x' is not one of all, none, top:K (K a positive whole "
        "number)"]  # fmt: skip

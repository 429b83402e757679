"""The probe sweep: cached equals naive, metrics equal independent evaluation, resume, determinism, errors."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch

from sensitivity.core import load_model
from sensitivity.data import calibration_windows, load_corpus
from sensitivity.eval import kl_divergence, perplexity
from sensitivity.probes import COLUMNS, Probe, ProbeOptions, plan, probe
from sensitivity.probes import sweep as sweep_mod
from sensitivity.probes.ablations import Context, ablate

SMALL = dict(windows=3, calib_windows=2, seqlen=32, batch_size=2, show_progress=False)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("sample")


@pytest.fixture(scope="module", params=["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba"])
def lm(request):
    lm = load_model(request.param)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return lm


@pytest.mark.parametrize("sweep", ["cached", "batched"])
def test_cached_and_batched_sweeps_equal_naive_full_forward_sweep(lm, corpus, sweep):
    comps = None if lm.arch != "mamba2" else (*lm.registry.component_names, "mixer", "head", "state")
    fast = probe(lm, corpus, components=comps, sweep=sweep, stack=3, **SMALL)
    naive = probe(lm, corpus, components=comps, sweep="naive", **SMALL)
    assert len(fast) == len(naive) > 300
    pd.testing.assert_frame_equal(fast.drop(columns="value"), naive.drop(columns="value"))
    assert (fast.value - naive.value).abs().max() < 1e-5
    assert fast.value.notna().all() and (fast[fast.metric == "kl"].value >= -1e-7).all()


def test_metrics_equal_independent_perplexity_and_kl(corpus):
    lm = load_model("tiny:mamba2")
    heldout = calibration_windows(corpus, lm.tokenizer, 3, 32, seed=0, split="test")
    calib = calibration_windows(corpus, lm.tokenizer, 2, 32, seed=0, split="train")
    df = probe(lm, corpus, components=["B", "mixer"], kinds=["zero", "remove"], layers=[1], heldout=heldout,
               calibration=calib, show_progress=False, batch_size=2)  # fmt: skip
    dense_ppl = perplexity(lm, heldout, show_progress=False)
    reference = copy.deepcopy(lm.model)
    for comp, kind in (("B", "zero"), ("mixer", "remove")):
        with ablate(lm.model, lm.registry, Probe(1, comp, kind), Context({}, {})):
            ppl = perplexity(lm, heldout, show_progress=False)
            kl = kl_divergence(lm, reference, heldout, show_progress=False)
        got = df[(df.component == comp)].set_index("metric").value
        assert got["delta_nll"] == pytest.approx(ppl.nll - dense_ppl.nll, abs=1e-5)
        assert got["ppl_ratio"] == pytest.approx(ppl.perplexity / dense_ppl.perplexity, rel=1e-5)
        assert got["kl"] == pytest.approx(kl.kl, abs=1e-6)
        assert got["delta_nll"] > (0.001 if comp == "mixer" else 0)


def test_table_is_tidy_and_covers_the_plan():
    lm = load_model("tiny:mamba2")
    df = probe(lm, "sample", **SMALL)
    assert tuple(df.columns) == COLUMNS
    probes = plan(lm.registry, ProbeOptions())
    assert len(df) == 3 * len(probes)
    assert set(df.metric) == {"delta_nll", "ppl_ratio", "kl"}
    assert (df.seed == 0).all()
    sparse = df[df.kind.isin(["magnitude", "wanda"])]
    assert set(sparse.sparsity) == {0.25, 0.5, 0.75} and df[~df.kind.isin(["magnitude", "wanda"])].sparsity.isna().all()
    assert set(df.kind) == {"zero", "mean", "resample", "bypass", "magnitude", "wanda", "remove"}  # plain names
    assert df[df.component == "head"]["index"].notna().all() and df[df.component == "x"]["index"].isna().all()
    ratio = df[df.metric == "ppl_ratio"].value.to_numpy()
    assert ratio == pytest.approx([math.exp(v) for v in df[df.metric == "delta_nll"].value])


def test_same_seed_same_numbers_other_seed_other_windows():
    lm = load_model("tiny:mamba")
    opts = {**SMALL, "components": ["dt", "conv1d"], "kinds": ["zero", "resample", "wanda"], "layers": [0]}
    a, b = probe(lm, "sample", **opts), probe(lm, "sample", **opts)
    pd.testing.assert_frame_equal(a, b)
    c = probe(lm, "sample", **{**opts, "seed": 1})
    assert (c.seed == 1).all() and not (a.value.to_numpy() == c.value.to_numpy()).all()


def test_interrupted_sweep_resumes_to_the_identical_csv(tmp_path, monkeypatch):
    lm = load_model("tiny:mamba2")
    opts = {**SMALL, "components": ["x", "dt", "head"], "kinds": ["zero", "mean", "wanda", "remove"]}
    probe(lm, "sample", out=tmp_path / "full", **opts)
    calls = {"n": 0}
    real_run = sweep_mod._Sweep.run

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_run(self, *args)

    monkeypatch.setattr(sweep_mod._Sweep, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        probe(lm, "sample", out=tmp_path / "part", **opts)
    partial = pd.read_csv(tmp_path / "part" / "probes.csv")
    assert len(partial) == 6 * 3
    assert json.loads((tmp_path / "part" / "manifest.json").read_text())["status"] == "running"
    monkeypatch.setattr(sweep_mod._Sweep, "run", real_run)
    probe(lm, "sample", out=tmp_path / "part", **opts)
    full = (tmp_path / "full" / "probes.csv").read_bytes()
    assert (tmp_path / "part" / "probes.csv").read_bytes() == full
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed_with"] == 6
    assert not list((tmp_path / "part").glob(".*tmp"))


def test_finished_sweep_reruns_nothing_and_manifest_records_the_run(tmp_path, monkeypatch):
    lm = load_model("tiny:mamba")
    opts = {**SMALL, "components": ["D"], "kinds": ["zero"]}
    first = probe(lm, "sample", out=tmp_path, **opts)
    monkeypatch.setattr(sweep_mod._Sweep, "run", lambda *a: pytest.fail("a finished probe ran again"))
    again = probe(lm, "sample", out=tmp_path, **opts)
    pd.testing.assert_frame_equal(first, again)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["job"] == "probe" and m["spec"]["model"] == "tiny:mamba" and m["spec"]["data"] == "sample"
    assert m["seqlen"] == 32 and m["seed"] == 0 and len(m["inputs"]["windows_sha256"]) == 16
    assert m["spec"]["windows"] == 3 and "3 random" in m["windows"] and "'test'" in m["windows"]
    assert {"torch", "transformers", "python"} <= set(m["versions"]) and m["probes"] == 2


def test_out_dir_of_another_sweep_is_refused(tmp_path):
    lm = load_model("tiny:mamba")
    probe(lm, "sample", out=tmp_path, components=["D"], kinds=["zero"], **SMALL)
    before = (tmp_path / "probes.csv").read_bytes()
    with pytest.raises(ValueError, match="holds a probe run with other settings \\(seed\\)"):
        probe(lm, "sample", out=tmp_path, components=["D"], kinds=["zero"], **{**SMALL, "seed": 4})
    assert (tmp_path / "probes.csv").read_bytes() == before


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kinds": ["zap"]}, "kinds: unknown ablation kind 'zap'; allowed: zero, mean"),
        ({"components": ["q_proj"]}, "components: unknown component 'q_proj' for mamba; allowed: x, z"),
        ({"components": ["head"]}, "components: 'head' needs Mamba-2 mixers; mamba has none; allowed: x, z"),
        ({"layers": [9]}, r"layers: 9 is out of range; allowed: 0..1"),
        ({"sparsities": [1.5]}, r"sparsities.0: 1.5 is out of range; allowed: 0 < value < 1"),
        ({"windows": 0}, "windows: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        ({"sweep": "fast"}, "sweep: 'fast' is invalid; allowed: one of 'cached', 'batched' or 'naive'"),
        ({"components": ["A_log"], "kinds": ["mean"]}, "kinds: no probe applies"),
        ({"layers": [0, 0]}, "layers: lists 0 twice"),
        ({"kinds": ["zero", "zero"]}, "kinds: lists 'zero' twice"),
        ({"sparsities": [0.5, 0.50]}, r"sparsities: lists 0.5 twice"),
        ({"seed": "one"}, "seed: 'one' is invalid; allowed: an integer"),
        ({"colour": "red"}, "colour: unknown field; allowed: task, task_items, backend, address"),
        ({"seqlen": 1}, "seqlen: 1 is out of range; allowed: 2 <= value <= 67,108,864"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        probe(load_model("tiny:mamba"), "sample", **{**SMALL, **options})


def test_options_round_trip_through_json_and_yaml():
    opts = ProbeOptions(components=("dt",), kinds=("zero",), layers=(1,), seed=3)
    assert ProbeOptions.from_dict(json.loads(opts.to_json())) == opts
    assert ProbeOptions.from_yaml(opts.to_yaml()) == opts
    assert ProbeOptions(components="dt,B", sparsities="0.25,0.5").sparsities == (0.25, 0.5)  # command-line forms


@pytest.mark.slow
def test_default_model_cached_equals_naive_and_damage_is_real():
    lm = load_model("default")
    opts = dict(components=["dt", "mixer"], kinds=["zero", "bypass", "remove"], layers=[0, 7], windows=2,
                calib_windows=2, seqlen=128, show_progress=False)  # fmt: skip
    cached, naive = probe(lm, **opts), probe(lm, **opts, sweep="naive")
    assert (cached.value - naive.value).abs().max() < 1e-5
    d = cached[cached.metric == "delta_nll"].set_index(["layer", "component", "kind"]).value
    assert d[(0, "mixer", "remove")] > 1.0 and d[(0, "dt", "zero")] > 0.01


def test_batched_sweep_runs_the_rest_of_the_model_once_for_equal_layer_outputs(corpus, monkeypatch):
    # zeroing z, the norm's weight or out_proj, and removing the mixer, all make layer 1's mixer output exactly 0
    lm = load_model("tiny:mamba2")
    suffixes = []
    original = sweep_mod.LayerRunner.run

    def counting(self, hidden, start, stop=None, rows=None):
        if stop is None:
            suffixes.append((start, hidden.shape[0]))
        return original(self, hidden, start, stop, rows)

    monkeypatch.setattr(sweep_mod.LayerRunner, "run", counting)
    options = dict(components=["z", "norm", "out_proj", "mixer", "dt"], kinds=["zero", "remove"], layers=[1])
    df = probe(lm, corpus, sweep="batched", **options, **SMALL)
    batches = math.ceil(SMALL["windows"] / SMALL["batch_size"])
    # per batch: one stacked suffix for the 2 distinct outputs (all-zero; dt zeroed: y = D·u), windows 2 and 1
    assert suffixes == [(2, 2 * 2), (2, 2 * 1)] and len(suffixes) == batches
    delta = df[df.metric == "delta_nll"].set_index("component").value
    assert delta["z"] == delta["norm"] == delta["out_proj"] == delta["mixer"] != delta["dt"]

"""Every loss-measuring stage on a task objective, on tiny models: probes, attribution, schedules, the explainer."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sensitivity.attribution.job import AttributeSpec
from sensitivity.core import load_model
from sensitivity.core.jobs import Inputs
from sensitivity.data.objective import task_windows
from sensitivity.eval import perplexity
from sensitivity.explain.job import ExplainSpec
from sensitivity.jobs import run
from sensitivity.probes import probe
from sensitivity.probes.job import ProbeSpec

MODELS = ["tiny:mamba2", "tiny:mamba", "tiny:bamba", "tiny:zamba2"]


@pytest.mark.parametrize("name", MODELS)
def test_task_probes_cached_equal_naive_and_measure_the_answers(name, one_thread):
    lm = load_model(name)
    common = dict(task="recall:3", task_items=6, components=["mixer", "out_proj"], kinds=["zero", "wanda"],
                  sparsities=[0.5], calib_windows=2, seqlen=32, show_progress=False)  # fmt: skip
    cached = probe(lm, "sample", **common)
    naive = probe(lm, "sample", sweep="naive", **common)
    pd.testing.assert_series_equal(cached.value, naive.value, rtol=1e-5, atol=1e-6)
    batched = probe(lm, "sample", sweep="batched", **common)
    pd.testing.assert_series_equal(batched.value, naive.value, rtol=1e-5, atol=1e-6)
    text = probe(lm, "sample", **{**common, "task": "text", "windows": 2})
    assert not cached.value.reset_index(drop=True).equals(text.value.reset_index(drop=True))
    # the deltas are taken from the answers' NLL: 6 items x 3 queries scored
    dense = perplexity(lm, task_windows("recall:3", lm.tokenizer, items=6), show_progress=False)
    assert dense.tokens == 18


def test_probe_job_records_the_task_and_schedules_record_it(tmp_path, one_thread):
    inputs = Inputs()
    spec = ProbeSpec(model="tiny:mamba2", data="sample", task="recall:2", task_items=4, kinds=["wanda"],
                     sparsities=[0.25, 0.5], calib_windows=2, seqlen=32, out=str(tmp_path / "p"))  # fmt: skip
    result = run(spec, inputs=inputs, show_progress=False)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["spec"]["task"] == "recall:2" and manifest["spec"]["task_items"] == 4
    assert "recall items of 2 pairs" in manifest["windows"]
    from sensitivity.allocation import allocate

    schedule = allocate(inputs.model("tiny:mamba2"), "sensitivity", 0.4, probes=tmp_path / "p", max_sparsity=0.5,
                        show_progress=False)  # fmt: skip
    assert schedule.meta["probes_task"] == "recall:2"
    assert len(result.value)


def test_attribution_job_attributes_the_task_log_likelihood(tmp_path, one_thread):
    inputs = Inputs()
    base = dict(model="tiny:mamba2", data="sample", methods=["taylor"], components=["dt", "out_proj"], seqlen=32)
    text = run(AttributeSpec(**base, windows=2, out=str(tmp_path / "t")), inputs=inputs, show_progress=False).value
    task = run(AttributeSpec(**base, task="recall:2", task_items=3, out=str(tmp_path / "r")), inputs=inputs,
               show_progress=False).value  # fmt: skip
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert "recall items" in manifest["windows"]
    assert len(task) == len(text) and not task.value.equals(text.value)


@pytest.mark.parametrize("name", ["tiny:mamba2", "tiny:bamba"])
def test_explainer_gives_a_verdict_on_the_task(tmp_path, name, one_thread):
    spec = ExplainSpec(dense=name, data="sample", method="wanda", sparsity=0.5, task="recall:3", task_items=4,
                       seqlen=32, calib_windows=2, out=str(tmp_path / "e"))  # fmt: skip
    e = run(spec, show_progress=False).value
    assert e.meta["scored"] == "the answer tokens only" and "recall items of 3 pairs" in e.meta["windows"]
    assert e.text.split(". ")[1].startswith("Answer perplexity")
    dense = perplexity(load_model(name), task_windows("recall:3", load_model(name).tokenizer, items=4),
                       show_progress=False)  # fmt: skip
    assert e.nll_dense == pytest.approx(dense.nll, rel=1e-5)

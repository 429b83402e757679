import hashlib
import json

import pytest
import torch

from sensitivity.core import load_model
from sensitivity.data import Windows, calibration_windows, eval_windows, load_corpus
from sensitivity.eval import perplexity
from sensitivity.pruning import prune, sparsity_report
from sensitivity.zoo import zoo_path


def _windows(n=4, L=32, seed=0):
    ids = torch.randint(0, 257, (n, L), generator=torch.Generator().manual_seed(seed))
    return Windows(ids=ids, seqlen=L, split="train", source="test", kind="calibration", seed=seed, stride=0)


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids, use_cache=False).logits


def test_saved_model_reloads_with_the_same_outputs_and_manifest(tmp_path):
    lm, windows = load_model("tiny:mamba2"), _windows()
    result = prune(lm, "wanda", sparsity=0.5, windows=windows, seed=3)
    out = result.save(tmp_path / "wanda50")
    again = load_model(out)
    ids = _windows(2, 40, seed=1).ids
    assert torch.equal(_logits(lm, ids), _logits(again, ids))
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["method"] == "wanda" and manifest["seed"] == 3
    assert manifest["calibration"]["sha256"] == hashlib.sha256(windows.ids.numpy().tobytes()).hexdigest()
    assert manifest["schedule"]["method"] == "uniform"
    assert manifest["params_before"]["params"] == manifest["params_after"]["params"] == lm.n_params
    report = sparsity_report(again)
    zeros = sum(int((p == 0).sum()) for p in {id(p): p for p in again.model.parameters()}.values())
    assert manifest["params_after"]["nonzero"] == lm.n_params - zeros
    recorded = {(r["layer"], r["tensor"]): r["zeros"] for r in manifest["sparsity"]}
    assert recorded == {(r.layer, r.tensor): r.zeros for r in report.itertuples()}
    assert "torch" in manifest["versions"]


def test_never_writes_into_the_source_checkpoint(tmp_path):
    source = tmp_path / "ckpt"
    base = load_model("tiny:mamba")
    base.model.save_pretrained(source)
    base.tokenizer.save_pretrained(source)
    before = _digests(source)
    lm = load_model(source)
    result = prune(lm, "magnitude", sparsity=0.5)
    for inside in (source, source / "pruned"):
        with pytest.raises(ValueError, match="is inside the source checkpoint"):
            result.save(inside)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    with pytest.raises(ValueError, match="is not empty; choose another directory"):
        result.save(tmp_path / "full")
    with pytest.raises(ValueError, match="holds no pruning_manifest.json; it is never replaced, even with overwrite"):
        result.save(tmp_path / "full", overwrite=True)
    assert (tmp_path / "full" / "x.txt").read_text() == "keep"
    result.save(tmp_path / "earlier")
    (tmp_path / "earlier" / "x.txt").write_text("stale")
    result.save(tmp_path / "earlier", overwrite=True)  # an earlier pruned checkpoint is replaced whole
    assert not (tmp_path / "earlier" / "x.txt").exists() and (tmp_path / "earlier" / "config.json").is_file()
    assert _digests(source) == before
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_default_model_pruned_saved_and_reloaded(tmp_path):
    source = zoo_path("default")
    before = _digests(source)
    lm = load_model()
    corpus = load_corpus()
    calib = calibration_windows(corpus, lm.tokenizer, 8, 128, seed=0)
    heldout = eval_windows(corpus, lm.tokenizer, 256, split="validation", max_windows=4)
    dense = perplexity(lm, heldout, show_progress=False).perplexity
    result = prune(lm, "wanda", sparsity=0.5, windows=calib, show_progress=False)
    pruned = perplexity(lm, heldout, show_progress=False).perplexity
    out = result.save(tmp_path / "wanda50")
    reloaded = perplexity(load_model(out), heldout, show_progress=False).perplexity
    assert reloaded == pytest.approx(pruned, rel=1e-5)
    assert pruned > dense  # pruning half of every mixer matrix costs something
    report = result.report()
    prunable = report[report.prunable & (report.component != "conv1d")]
    assert (prunable.zeros.sum() / prunable.numel.sum()) == pytest.approx(0.5, abs=1e-3)
    assert _digests(source) == before

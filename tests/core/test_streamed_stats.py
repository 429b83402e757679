"""The streamed calibration statistics against the in-memory ones, and the memory-mapped residual cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sensitivity.core import load_model
from sensitivity.core.stats import channel_stats, window_gradients
from sensitivity.core.streamed import (
    ResidualCache,
    StreamedCheckpoint,
    streamed_channel_stats,
    streamed_window_gradients,
)
from sensitivity.data import calibration_windows, load_corpus


def _save(name: str, path):
    lm = load_model(name)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["tiny:mamba2", "tiny:bamba"])
def test_streamed_channel_stats_equal_the_whole_models(name, tmp_path, one_thread):
    src = _save(name, tmp_path / "m")
    lm = load_model(str(src))
    windows = calibration_windows(load_corpus("sample"), lm.tokenizer, 5, 32, seed=2)
    points = ["layers.0.in", "layers.1.out_proj_in", f"layers.{lm.registry.n_layers - 1}.in"]
    points = [p for p in points if int(p.split(".")[1]) in [i for i, u in enumerate(lm.registry.units) if "ssm" in u]]
    want = channel_stats(lm, windows, points, batch_size=2, show_progress=False)
    got = streamed_channel_stats(StreamedCheckpoint(src), windows, points, batch_size=2, show_progress=False)
    for p in points:
        assert got[p].count == want[p].count == 5 * 32
        for field in ("sum", "sumsq", "absmax"):
            torch.testing.assert_close(getattr(got[p], field), getattr(want[p], field), rtol=1e-6, atol=1e-6)


def test_streamed_window_gradients_equal_the_whole_models(tmp_path, one_thread):
    src = _save("tiny:falcon-h1", tmp_path / "m")
    lm = load_model(str(src))
    windows = calibration_windows(load_corpus("sample"), lm.tokenizer, 3, 24, seed=4)
    layers = [0, lm.registry.n_layers - 1]
    want = window_gradients(lm, windows, {(i, "out_proj.weight"): lm.registry.mixer(lm.model, i).out_proj.weight
                                          for i in layers}, show_progress=False)  # fmt: skip
    ckpt = StreamedCheckpoint(src)
    got = streamed_window_gradients(ckpt, windows, lambda i, block: {(i, "out_proj.weight"): ckpt.lm.registry.mixer(
        ckpt.lm.model, i).out_proj.weight}, layers, cache_dir=tmp_path, show_progress=False)  # fmt: skip
    assert not list(tmp_path.glob("residuals-*"))  # the cache file is gone
    for k in want:
        assert got[k].count == want[k].count == 3
        torch.testing.assert_close(got[k].sum, want[k].sum, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[k].sumsq, want[k].sumsq, rtol=1e-4, atol=1e-9)


def test_residual_cache_is_a_file_on_disk(tmp_path):
    cache = ResidualCache(tmp_path, (3, 2, 4, 5), torch.float32)
    assert cache.path.parent.parent == tmp_path and cache.path.stat().st_size == 3 * 2 * 4 * 5 * 4
    values = torch.arange(40, dtype=torch.float32).view(4, 10)
    cache[1][0] = values.view(4, 5, 2)[..., 0]  # (L, D)
    on_disk = np.fromfile(cache.path, dtype=np.float32).reshape(3, 2, 4, 5)
    assert np.array_equal(on_disk[1, 0], values.view(4, 5, 2)[..., 0].numpy()) and not on_disk[0].any()
    cache.close()
    assert not cache.path.exists()

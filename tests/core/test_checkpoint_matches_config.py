"""A checkpoint is what its config says, or it is refused before any job runs (every family of the registry)."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sensitivity.core import TINY_MODELS, load_model

FAMILIES = list(TINY_MODELS)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """A tiny model of each family saved as an ordinary checkpoint, and its tensors."""
    path = tmp_path_factory.mktemp("ckpt") / request.param.removeprefix("tiny:")
    lm = load_model(request.param, instrument=False)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path, load_file(path / "model.safetensors"), json.loads((path / "config.json").read_text())


def _copy(saved, tmp_path, tensors=None, config=None):
    path, original, cfg = saved
    out = tmp_path / "edited"
    out.mkdir()
    for f in path.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    save_file(tensors if tensors is not None else original, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config if config is not None else cfg))
    return out


def _layers(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).num_hidden_layers


def test_the_unedited_copy_loads(saved, tmp_path):
    load_model(_copy(saved, tmp_path))


def test_a_missing_tensor_is_refused_naming_it(saved, tmp_path):
    path, tensors, _ = saved
    dropped = sorted(k for k in tensors if ".layers.0." in k)[0]
    edited = {k: v for k, v in tensors.items() if k != dropped}
    with pytest.raises(ValueError) as e:
        load_model(_copy(saved, tmp_path, tensors=edited))
    assert "has no tensor" in str(e.value) and f"num_hidden_layers={_layers(path)}) builds" in str(e.value)
    assert ".layers.0." in str(e.value)  # under the model's name (transformers' conversions may rename it)


def test_tensors_of_a_layer_the_config_lacks_are_refused(saved, tmp_path):
    path, tensors, _ = saved
    n = _layers(path)
    extra = {k.replace(".layers.0.", f".layers.{n}."): v.clone() for k, v in tensors.items() if ".layers.0." in k}
    with pytest.raises(ValueError) as e:
        load_model(_copy(saved, tmp_path, tensors={**tensors, **extra}))
    assert f".layers.{n}." in str(e.value) and "does not have" in str(e.value)
    assert f"num_hidden_layers={n}" in str(e.value)


def test_integer_weights_are_refused(saved, tmp_path):
    _, tensors, _ = saved
    key = sorted(k for k in tensors if k.endswith("out_proj.weight") or k.endswith("o_proj.weight"))[0]
    edited = {**tensors, key: tensors[key].to(torch.int32)}
    with pytest.raises(ValueError, match=rf"model.safetensors: {key} is stored as I32; weights must be floating "
                                         r"point \(F64, F32, F16, BF16\)"):  # fmt: skip
        load_model(_copy(saved, tmp_path, tensors=edited))


def test_another_architectures_config_over_these_weights_is_refused(saved, tmp_path):
    path, tensors, cfg = saved
    other = "tiny:bamba" if cfg["model_type"] != "bamba" else "tiny:mamba2"
    foreign = json.loads(load_model(other, instrument=False).model.config.to_json_string())
    with pytest.raises(ValueError, match="has no tensor|does not have|shape"):
        load_model(_copy(saved, tmp_path, config=foreign))


@pytest.mark.parametrize("edit", ["missing", "extra", "integer"])
def test_streamed_checkpoints_are_refused_alike(saved, tmp_path, edit):
    from sensitivity.core.streamed import StreamedCheckpoint

    path, tensors, _ = saved
    n = _layers(path)
    if edit == "missing":
        dropped = sorted(k for k in tensors if ".layers.1." in k)[0]
        edited, message = {k: v for k, v in tensors.items() if k != dropped}, f"has no tensor '{dropped}'"
    elif edit == "extra":
        extra = {k.replace(".layers.0.", f".layers.{n}."): v.clone() for k, v in tensors.items() if ".layers.0." in k}
        edited, message = {**tensors, **extra}, f"layers.{n}."
    else:
        key = sorted(k for k in tensors if k.endswith("norm.weight"))[0]
        edited, message = {**tensors, key: tensors[key].to(torch.int64)}, f"{key} is stored as I64"
    with pytest.raises(ValueError, match=re.escape(message)):
        StreamedCheckpoint(_copy(saved, tmp_path, tensors=edited))


def test_the_cli_refuses_with_one_line_and_writes_nothing(tmp_path):
    lm = load_model("tiny:mamba2", instrument=False)
    lm.model.save_pretrained(tmp_path / "model")
    tensors = load_file(tmp_path / "model" / "model.safetensors")
    dropped = "backbone.layers.1.mixer.D"
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / "model" / "model.safetensors",
              metadata={"format": "pt"})
    for streamed in ([], ["--streamed"]):
        out = tmp_path / "out"
        run = subprocess.run([sys.executable, "-m", "sensitivity", "prune", "--model", str(tmp_path / "model"),
                              "--method", "wanda", "--sparsity", "0.5", "--data", "sample", "--seqlen", "16",
                              "--calib-windows", "1", "--out", str(out), *streamed], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and f"has no tensor '{dropped}'" in run.stderr, run.stderr
        assert not out.exists()

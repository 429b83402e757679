"""The training script: seeded and resumable (tiny config, a few steps)."""

from __future__ import annotations

import json

import torch

from sensitivity.zoo import zoo_path
from sensitivity.zoo.train import build_parser, train_model

TINY = dict(hidden_size=32, num_hidden_layers=1, num_heads=2, head_dim=32, n_groups=1, state_size=8, chunk_size=16)


def _args(out):
    argv = ["model", "--arch", "mamba2", "--tokenizer", str(zoo_path("default")), "--out", str(out),
            "--max-tokens", "256", "--batch", "2", "--seqlen", "32", "--eval-every", "2", "--eval-windows", "2",
            "--warmup", "1", "--seed", "3"]  # fmt: skip
    return build_parser().parse_args(argv)


def _log(out):
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "tok_per_s")}
        for line in (out / "log.jsonl").read_text().splitlines()
    ]


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_model(_args(straight), **TINY)
    resumed.mkdir()
    (resumed / "STOP").touch()  # stops after the first evaluation (step 2 of 4)
    train_model(_args(resumed), **TINY)
    assert [r["step"] for r in _log(resumed)] == [2]
    (resumed / "STOP").unlink()
    train_model(_args(resumed), **TINY)
    assert _log(resumed) == _log(straight)
    assert [r["step"] for r in _log(straight)] == [2, 4]
    a = torch.load(straight / "last.pt", weights_only=False)["model"]
    b = torch.load(resumed / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best = json.loads((straight / "best" / "best.json").read_text())
    assert best["val_loss"] == min(r["val_loss"] for r in _log(straight))
    assert json.loads((straight / "train_args.json").read_text())["seed"] == 3

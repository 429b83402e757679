"""The training script: seeded and resumable (tiny config, a few steps)."""

from __future__ import annotations

import json

import pytest
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


def test_a_finished_run_can_be_extended_with_a_second_cosine_segment(tmp_path):
    out = tmp_path / "run"
    train_model(_args(out), **TINY)
    args = _args(out)
    args.extend_to, args.extend_lr = 384, 5e-4  # 256 tokens were trained; two more steps of 2 x 32 tokens
    train_model(args, **TINY)
    log = _log(out)
    assert [r["step"] for r in log] == [2, 4, 6]
    assert log[-1]["lr"] == pytest.approx(5e-4 * 0.5 + 2e-4 * 0.5)  # halfway down the segment's cosine, floor 0.1 lr
    saved = json.loads((out / "train_args.json").read_text())
    assert saved["extensions"] == [{"from_step": 4, "steps": 2, "lr": 5e-4}]
    train_model(args, **TINY)  # rerunning the same command does not extend twice
    assert [r["step"] for r in _log(out)] == [2, 4, 6]


def test_export_stores_float16_with_a_card_that_matches_a_fresh_measurement(tmp_path):
    from sensitivity import eval_windows, load_corpus, load_model, perplexity
    from sensitivity.zoo.train import export_model

    run = tmp_path / "run"
    train_model(_args(run), **TINY)
    card = export_model(run, "default", dest_root=tmp_path / "zoo")
    dest = tmp_path / "zoo" / "default"
    assert sorted(p.name for p in dest.iterdir()) == [
        "README.md", "card.json", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "training_log.jsonl",
    ]  # fmt: skip
    from safetensors import safe_open

    with safe_open(dest / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads((dest / "card.json").read_text()) == card
    lm = load_model(str(dest))
    assert lm.model.dtype == torch.float32
    fresh = perplexity(lm, eval_windows(load_corpus(), lm.tokenizer, 512, split="test"), show_progress=False)
    assert fresh.perplexity == pytest.approx(card["test_perplexity"], rel=1e-6)
    assert card["tokens_seen"] == 256 and card["best_step"] == 4 and card["seed"] == 3
    assert card["command"].endswith("--max-tokens 256")
    assert f"**{card['test_perplexity']:.2f}**" in (dest / "README.md").read_text()


def test_continuing_a_model_on_recall_items_is_resumable_and_keeps_frozen_embeddings(tmp_path):
    base = tmp_path / "base"
    train_model(_args(base), **TINY)

    def args(out):
        a = _args(out)
        a.init, a.freeze_embeddings = str(base / "best"), True
        a.recall_batch, a.recall_max_pairs, a.recall_max_gap, a.recall_eval_pairs = 4, 3, 2, 2
        return a

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_model(args(straight))
    resumed.mkdir()
    (resumed / "STOP").touch()
    train_model(args(resumed))
    (resumed / "STOP").unlink()
    train_model(args(resumed))
    log = _log(straight)
    assert _log(resumed) == log and all(0 <= r["recall_acc"] <= 1 and r["recall_nll"] > 0 for r in log)
    start = torch.load(base / "last.pt", weights_only=False)["model"]
    end = torch.load(straight / "last.pt", weights_only=False)["model"]
    key = "backbone.embeddings.weight"
    assert torch.equal(start[key], end[key]) and not torch.equal(start["backbone.layers.0.mixer.A_log"],
                                                                 end["backbone.layers.0.mixer.A_log"])
    saved = json.loads((straight / "train_args.json").read_text())
    assert saved["init"] == str(base / "best") and saved["recall"]["batch"] == 4


def test_appended_blocks_start_as_the_identity(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    train_model(_args(base), **TINY)
    out = tmp_path / "grown"
    a = _args(out)
    a.init, a.append_layers, a.train_new_only, a.lr = str(base / "best"), 1, True, 0.0
    a.warmup = 1
    train_model(a)
    grown = AutoModelForCausalLM.from_pretrained(str(out / "best"))
    plain = AutoModelForCausalLM.from_pretrained(str(base / "best"))
    assert grown.config.num_hidden_layers == plain.config.num_hidden_layers + 1
    ids = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grown(input_ids=ids, use_cache=False).logits,
                                   plain(input_ids=ids, use_cache=False).logits)  # fmt: skip

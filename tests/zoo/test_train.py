"""The training script: seeded and resumable (tiny config, a few steps)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

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


def test_prepended_memory_block_starts_as_the_identity_with_the_old_blocks_shifted(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    train_model(_args(base), **TINY)
    out = tmp_path / "grown"
    a = _args(out)
    a.init, a.prepend_layers, a.memory_init, a.train_new_only, a.lr = str(base / "best"), 1, True, True, 0.0
    train_model(a)
    grown = AutoModelForCausalLM.from_pretrained(str(out / "best"))
    plain = AutoModelForCausalLM.from_pretrained(str(base / "best"))
    old, new = plain.backbone.layers[0].mixer, grown.backbone.layers[1].mixer
    assert torch.equal(old.in_proj.weight, new.in_proj.weight) and torch.equal(old.A_log, new.A_log)
    from sensitivity.core.registry import build_registry

    reg = build_registry(grown.config)
    (b,), (c,), (d,) = (reg.tensors(grown, 0, name) for name in ("B", "C", "D"))
    assert torch.equal(b, c) and not torch.equal(b, torch.zeros_like(b)) and float(d.abs().max()) == 0.0
    ids = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grown(input_ids=ids, use_cache=False).logits,
                                   plain(input_ids=ids, use_cache=False).logits)  # fmt: skip
    assert json.loads((out / "train_args.json").read_text())["prepend_layers"] == 1


@pytest.mark.parametrize("flag", ["--prepend-layers", "--stop-at"])
def test_negative_or_non_integer_counts_are_refused_with_one_line(flag, capsys):
    for bad, message in (("-1", "-1 is negative; allowed: 0 or more"), ("x", "'x' is not an integer")):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["model", "--arch", "mamba2", "--tokenizer", "t", "--out", "o", flag, bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_memory_init_retrieves_the_value_stored_under_each_key():
    """In front of ``default``, the initialised memory's output at a query is nearest (cosine) to the matching
    value's ``x`` among the item's values, for nearly every query at 4 and 16 pairs (chance 1/P)."""
    from transformers import AutoModelForCausalLM

    from sensitivity.core import capture, instrument
    from sensitivity.core.registry import build_registry
    from sensitivity.data.recall import recall_items, recall_pools
    from sensitivity.zoo.train import _memory_init, _shift_layers

    plain = AutoModelForCausalLM.from_pretrained(str(zoo_path("default")))
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(zoo_path("default")))
    config = plain.config
    config.num_hidden_layers += 1
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(_shift_layers(plain.state_dict(), 1), strict=False)
    _memory_init(model, [0], 0, torch.cat(recall_pools(tok)))
    instrument(model)
    ed = build_registry(config).dims["ED"]
    for pairs, floor in ((4, 0.95), (16, 0.8)):
        items = recall_items(tok, pairs, 16, seed=0, split="synthetic")
        with torch.no_grad(), capture(model, ["layers.0.conv", "layers.0.y"]) as acts:
            model(input_ids=items.ids, use_cache=False)
        x, y = acts["layers.0.conv"][0][..., :ed], acts["layers.0.y"][0]  # (N, L, ED) each
        value_pos = torch.arange(pairs) * 2 + 2  # eos k1 v1 k2 v2 ...
        hits = []
        for n in range(16):
            sims = F.normalize(x[n, value_pos], dim=-1) @ F.normalize(y[n, items.query_pos[n]], dim=-1).T  # (P, P)
            truth = torch.stack([(items.ids[n, value_pos] == a).nonzero()[0, 0] for a in items.answers[n]])
            hits.append(sims.argmax(0) == truth)
        assert float(torch.cat(hits).float().mean()) >= floor, pairs


def test_a_model_continued_in_two_runs_has_a_card_naming_every_run(tmp_path, monkeypatch):
    from sensitivity.zoo.train import export_model

    base, first, second = tmp_path / "base", tmp_path / "first", tmp_path / "second"
    train_model(_args(base), **TINY)
    recall = ["--recall-batch", "2", "--recall-max-pairs", "2", "--recall-max-gap", "0", "--recall-eval-pairs", "2"]

    def run(out, *extra):
        argv = ["model", "--arch", "mamba2", "--tokenizer", str(zoo_path("default")), "--out", str(out),
                "--max-tokens", "256", "--batch", "2", "--seqlen", "32", "--eval-every", "2", "--eval-windows", "2",
                "--warmup", "1", "--seed", "3", *recall, *extra]  # fmt: skip
        monkeypatch.setattr("sys.argv", ["train", *argv])
        train_model(build_parser().parse_args(argv))

    run(first, "--init", str(base / "best"), "--prepend-layers", "1", "--memory-init", "--train-new-only",
        "--stop-at", "2")  # fmt: skip
    assert [r["step"] for r in _log(first)] == [2]  # --stop-at: the schedule was 4 steps
    run(second, "--init", str(first / "best"), "--freeze-embeddings")
    card = export_model(second, "recall", dest_root=tmp_path / "zoo")
    lines = card["command"].splitlines()
    assert len(lines) == 3 and lines[0].endswith("--stop-at 4") and "--init" not in lines[0]
    assert "--prepend-layers 1 --memory-init" in lines[1] and lines[1].endswith("--stop-at 2")
    assert "--freeze-embeddings" in lines[2] and card["init"] == ""
    elapsed = [json.loads((r / "best" / "best.json").read_text())["elapsed_s"] for r in (base, first, second)]
    assert card["wall_hours"] == pytest.approx(sum(elapsed) / 3600)
    readme = (tmp_path / "zoo" / "recall" / "README.md").read_text()
    assert "Trained from scratch for 4 steps of 2 x 32 text tokens" in readme
    assert "with 1 new block(s) in front, initialised as an associative memory" in readme
    assert "only the new blocks for 2 steps" in readme
    assert f"every weight but the (tied) embeddings for {card['best_step']} steps" in readme
    assert set(card["recall_accuracy"]) == {"4", "8", "16", "32", "64"}

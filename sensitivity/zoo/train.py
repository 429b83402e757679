"""Train the embedded tokenizer and models (maintainer script; not run by CI).

Three steps, each resumable and seeded::

    python -m sensitivity.zoo.train tokenizer --out runs/tokenizer
    python -m sensitivity.zoo.train model --arch mamba2 --tokenizer runs/tokenizer --out runs/mamba2 \\
        --max-tokens 8000000
    python -m sensitivity.zoo.train export --run runs/mamba2 --name default

``model`` trains on random windows of the built-in corpus' train split through
the instrumented forward (the fast Mamba-1 scan, Mamba-2's SSD), with AdamW, a
linear warm-up and cosine decay. Every ``--eval-every`` steps it measures the
validation loss, appends a line to ``log.jsonl``, keeps ``best/`` (the
checkpoint with the lowest validation loss) and writes ``last.pt`` (model,
optimiser, step and RNG state) atomically; rerunning the same command resumes
from ``last.pt``. ``export`` stores ``best/`` in half precision with its
tokenizer, measures test perplexity and writes the model card into the package.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent / "models"
EOS = "<|endoftext|>"

_COMMON = dict(hidden_size=256, num_hidden_layers=8, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
               tie_word_embeddings=True)  # fmt: skip
ARCH_CONFIGS: dict[str, dict] = {
    "mamba2": dict(_COMMON, model_type="mamba2", num_heads=8, head_dim=64, n_groups=2, state_size=64, chunk_size=64),
    "mamba": dict(_COMMON, model_type="mamba", state_size=16),
    # Bamba: 8 decoder layers, each a mixer (Mamba-2, or attention at layers 2 and 5) then a SwiGLU MLP.
    "hybrid": dict(model_type="bamba", hidden_size=256, num_hidden_layers=8, attn_layer_indices=[2, 5],
                   mamba_n_heads=8, mamba_d_head=64, mamba_n_groups=2, mamba_d_state=64, mamba_chunk_size=64,
                   mamba_expand=2, mamba_d_conv=4, mamba_proj_bias=False, mamba_conv_bias=True,
                   num_attention_heads=4, num_key_value_heads=4, intermediate_size=192, tie_word_embeddings=True),
}
"""Architecture of each shipped model (plus the tokenizer's vocabulary and special tokens)."""


# --- tokenizer ---------------------------------------------------------------------------------------------------


def train_tokenizer(out: Path, vocab_size: int = 8192) -> None:
    """Train a byte-level BPE on the built-in train split and save it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data.corpus import builtin_splits

    docs = builtin_splits()["train"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=1 << 20
    )
    fast.save_pretrained(str(out))
    logger.info("tokenizer: %d tokens -> %s", len(fast), out)


# --- model -------------------------------------------------------------------------------------------------------


def build_config(arch: str, tokenizer, **overrides):
    """The HF config of a zoo model of ``arch`` for ``tokenizer`` (``overrides`` replace fields, e.g. in tests)."""
    from transformers import AutoConfig

    spec = {**ARCH_CONFIGS[arch], **overrides}
    model_type = spec.pop("model_type")
    eos = tokenizer.eos_token_id
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        **spec,
    )


@functools.lru_cache(maxsize=4)
def _token_stream(tokenizer_path: str, split: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    from ..data import load_corpus, tokenize_split

    return tokenize_split(load_corpus("austen-kjv"), AutoTokenizer.from_pretrained(tokenizer_path), split)  # (T,)


def _batch(stream: torch.Tensor, batch: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seqlen - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seqlen + 1] for s in starts.tolist()])  # (B, L+1)


def _shift_layers(state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """``state`` with block ``i``'s tensors renamed to block ``i + k`` (room for ``k`` new blocks in front)."""
    if not k:
        return state
    pattern = re.compile(r"(^|\.)layers\.(\d+)\.")
    return {pattern.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + k}.", name, count=1): t
            for name, t in state.items()}  # fmt: skip


@torch.no_grad()
def _memory_init(model, layers, seed: int, tokens: torch.Tensor | None = None) -> None:
    """Start the Mamba-2 mixers of ``layers`` as an associative memory (a known MQAR solution; training refines it).

    Keys and queries share one random projection (``B`` and ``C`` rows of ``in_proj`` equal); the convolution
    feeds ``B`` the previous token (the key before a value) and ``C`` and ``x`` the current one (the query key;
    the value); ``dt`` is 1 with almost no decay (``A = -1e-3``) and ``D`` is 0, so the output at a query is
    ``sum_s (C_t . B_s) x_s``: mostly the value stored under the matching key. In block 0, whose input is the
    token embedding, the key features are centred on the mean over ``tokens`` (the recall pools) and shifted by
    -1 before the SiLU, so they are sparse and unmatched keys barely interfere. ``out_proj`` stays zero, so the
    model is unchanged until training reads the memory out.
    """
    from ..core.registry import build_registry

    reg = build_registry(model.config)
    ed, gn = reg.dims["ED"], reg.dims["G"] * reg.dims["N"]
    gen = torch.Generator().manual_seed(seed)
    for layer in layers:
        (b,), (c,) = reg.tensors(model, layer, "B"), reg.tensors(model, layer, "C")  # (GN, D) each
        centred = layer == 0 and tokens is not None
        w = torch.randn(b.shape, generator=gen) * (2.0 if centred else 1.0) / math.sqrt(b.shape[1])  # (GN, D)
        b.copy_(w)
        c.copy_(w)
        conv_w, conv_b = reg.tensors(model, layer, "conv1d")  # (ED+2GN, 1, K), (ED+2GN,) over [x | B | C]
        k = conv_w.shape[-1]
        conv_w.zero_()
        conv_b.zero_()
        conv_w[:ed, 0, k - 1] = 1.0  # x: the current token
        conv_w[ed : ed + gn, 0, k - 2] = 1.0  # B: the previous token
        conv_w[ed + gn :, 0, k - 1] = 1.0  # C: the current token
        if centred:
            e = model.get_input_embeddings().weight[tokens].float()  # (T, D)
            normed = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + model.config.layer_norm_epsilon)  # (T, D)
            mu = normed.mean(0) @ w.T  # (GN,)
            conv_b[ed:] = torch.cat([mu, mu]).neg() - 1.0
        dt_w, dt_b = reg.tensors(model, layer, "dt")  # (H, D), (H,)
        dt_w.zero_()
        dt_b.fill_(math.log(math.expm1(1.0)))  # softplus(dt_bias) = 1
        reg.tensors(model, layer, "A_log")[0].fill_(math.log(1e-3))  # (H,)
        reg.tensors(model, layer, "D")[0].zero_()  # (H,)


def _loss(model, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits  # (B, L, V)
    targets = (ids if labels is None else labels)[:, 1:]  # (B, L)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _recall_batch(tokenizer, stream: torch.Tensor, args, gen: torch.Generator):
    """One batch of recall items for training: pairs and gap drawn per batch, seeds from ``gen``."""
    from ..data.recall import recall_items

    pairs = int(torch.randint(1, args.recall_max_pairs + 1, (1,), generator=gen))
    gap = int(torch.randint(0, args.recall_max_gap + 1, (1,), generator=gen))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return recall_items(tokenizer, pairs, args.recall_batch, gap=gap, seed=seed, filler=stream, split="train")


@torch.no_grad()
def _eval_recall(model, tokenizer, stream: torch.Tensor, pairs: int, gap: int, n: int = 64) -> tuple[float, float]:
    """(NLL of the answers, accuracy) on ``n`` validation recall items (seed 1)."""
    from ..data.recall import recall_items

    model.eval()
    items = recall_items(tokenizer, pairs, n, gap=gap, seed=1, filler=stream, split="validation")
    logits = model(input_ids=items.ids, use_cache=False).logits  # (N, L, V)
    at = logits.gather(1, items.query_pos[..., None].expand(-1, -1, logits.shape[-1]))  # (N, P, V)
    nll = F.cross_entropy(at.flatten(0, 1).float(), items.answers.flatten()).item()
    acc = (at.argmax(-1) == items.answers).float().mean().item()
    model.train()
    return nll, acc


@torch.no_grad()
def _eval_loss(model, stream: torch.Tensor, seqlen: int, max_windows: int, autocast: bool) -> float:
    model.eval()
    n = min(max_windows, (stream.numel() - 1) // seqlen)
    total = 0.0
    for i in range(0, n, 8):
        ids = torch.stack([stream[j * seqlen : j * seqlen + seqlen + 1] for j in range(i, min(n, i + 8))])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total += _loss(model, ids).item() * ids.shape[0]
    model.train()
    return total / n


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "conv1d" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_model(args, **config_overrides) -> None:
    """Train (or resume) one model; see the module docstring.

    Args:
        args: The parsed ``model`` sub-command arguments.
        **config_overrides: Config fields replacing those of :data:`ARCH_CONFIGS` (tests train tiny models).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core import instrument

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = build_config(args.arch, tokenizer, **config_overrides)
    if args.init:  # continue from a shipped (or any local) model: its weights and config, not the arch's
        from ..core.zoo import zoo_path

        source = zoo_path(args.init) if "/" not in args.init else Path(args.init)
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        config = model.config
        front = getattr(args, "prepend_layers", 0)
        if args.append_layers or front:  # new blocks, their output projections zero: the same model at first
            config.num_hidden_layers += args.append_layers + front
            grown = AutoModelForCausalLM.from_config(config)
            missing, _ = grown.load_state_dict(_shift_layers(model.state_dict(), front), strict=False)
            for name, p in grown.named_parameters():
                if name in missing and name.endswith("out_proj.weight"):
                    torch.nn.init.zeros_(p)
            model = grown
            if getattr(args, "memory_init", False):
                new = [*range(front), *range(config.num_hidden_layers - args.append_layers, config.num_hidden_layers)]
                from ..data.recall import recall_pools

                _memory_init(model, new, args.seed, torch.cat(recall_pools(tokenizer)))
            if args.train_new_only:  # everything else frozen: only the appended blocks learn
                for name, p in model.named_parameters():
                    p.requires_grad_(name in missing)
    else:
        model = AutoModelForCausalLM.from_config(config)
    if getattr(args, "freeze_embeddings", False):  # the (tied) embeddings and LM head stay as they are
        model.get_input_embeddings().weight.requires_grad_(False)
    if config.model_type in ("mamba", "mamba2"):  # the fast Mamba-1 scan; hybrids train through their HF forward
        instrument(model, scan="auto")
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    tokens_per_step = args.batch * args.seqlen
    args_file = out / "train_args.json"
    saved = json.loads(args_file.read_text()) if args_file.exists() else None
    extensions: list[dict] = []
    if saved:  # a resumed run keeps the budget (and continuation segments) it started with
        args.max_tokens, extensions = saved["max_tokens"], saved.get("extensions", [])
    total_steps = math.ceil(args.max_tokens / tokens_per_step)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        floor = 0.1 * args.lr
        for seg in extensions:  # continuation segments: cosine from seg["lr"] down to the floor
            if seg["from_step"] <= step:
                progress = min(1.0, (step - seg["from_step"]) / seg["steps"])
                return floor + (seg["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        progress = (step - args.warmup) / max(1, total_steps - args.warmup)
        return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def final_step() -> int:
        return max([total_steps] + [seg["from_step"] + seg["steps"] for seg in extensions])

    train = _token_stream(str(args.tokenizer), "train")
    val = _token_stream(str(args.tokenizer), "validation")
    gen = torch.Generator().manual_seed(args.seed)
    step, best, elapsed = 0, float("inf"), 0.0
    last = out / "last.pt"
    if last.exists():
        state = torch.load(last, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        step, best, elapsed = state["step"], state["best"], state["elapsed"]
        logger.info("resumed %s at step %d (best val loss %.4f)", out, step, best)
    meta = saved or {
        "arch": args.arch,
        "seed": args.seed,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "max_tokens": args.max_tokens,
        "bf16_autocast": args.autocast,
        "eval_every": args.eval_every,
        "eval_windows": args.eval_windows,
        "threads": torch.get_num_threads(),
        "train_tokens_in_split": int(train.numel()),
        "command": "python -m sensitivity.zoo.train " + " ".join(sys.argv[1:]),
        "init": args.init,
        "append_layers": args.append_layers,
        "prepend_layers": getattr(args, "prepend_layers", 0),
        "train_new_only": args.train_new_only,
        "memory_init": getattr(args, "memory_init", False),
        "freeze_embeddings": args.freeze_embeddings,
        "recall": {"batch": args.recall_batch, "max_pairs": args.recall_max_pairs, "max_gap": args.recall_max_gap,
                   "eval_pairs": args.recall_eval_pairs} if args.recall_batch else None,
    }
    target = math.ceil(args.extend_to / tokens_per_step)
    if args.extend_to and step >= final_step() and target > step:  # continue a finished run: one more cosine segment
        seg = {"from_step": step, "steps": target - step, "lr": args.extend_lr}
        extensions.insert(0, seg)
        meta["extensions"] = extensions
        args_file.write_text(json.dumps(meta, indent=2) + "\n")
        logger.info("extending %s by %d steps from step %d (lr %g)", out, seg["steps"], step, seg["lr"])
    log = (out / "log.jsonl").open("a")
    t0 = time.perf_counter() - elapsed
    window_loss, window_n = 0.0, 0
    if not args_file.exists():
        args_file.write_text(json.dumps(meta, indent=2) + "\n")
    show = sys.stderr.isatty()
    bar = tqdm(total=final_step(), initial=step, desc=f"train {args.arch}", unit="step", disable=not show)
    while step < final_step():
        if step == args.budget_probe and args.time_budget and not meta.get("budget_fixed"):
            # Fix the token budget once from the measured speed, so the cosine schedule ends on time.
            rate = step * tokens_per_step / (time.perf_counter() - t0)
            args.max_tokens = meta["max_tokens"] = int(rate * args.time_budget) // tokens_per_step * tokens_per_step
            meta["budget_fixed"] = f"{args.time_budget} s at {rate:.0f} tok/s measured over {step} steps"
            total_steps = math.ceil(args.max_tokens / tokens_per_step)
            args_file.write_text(json.dumps(meta, indent=2) + "\n")
            logger.info("time budget %s s -> %d tokens (%d steps)", args.time_budget, args.max_tokens, total_steps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids = _batch(train, args.batch, args.seqlen, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
            loss = _loss(model, ids)
            if args.recall_batch:  # text loss + the recall answers' loss, one batch each
                items = _recall_batch(tokenizer, train, args, gen)
                loss = loss + _loss(model, items.ids, items.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.total = final_step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        window_loss, window_n = window_loss + loss.item(), window_n + 1
        if step % args.eval_every == 0 or step == final_step():
            val_loss = _eval_loss(model, val, args.seqlen, args.eval_windows, args.autocast)
            elapsed = time.perf_counter() - t0
            record = {
                "step": step,
                "tokens": step * tokens_per_step,
                "train_loss": window_loss / window_n,
                "val_loss": val_loss,
                "val_ppl": math.exp(val_loss),
                "lr": lr_at(step - 1),
                "elapsed_s": round(elapsed, 1),
                "tok_per_s": round(step * tokens_per_step / elapsed, 1),
            }
            window_loss, window_n = 0.0, 0
            score = val_loss
            if args.recall_batch:  # choose the checkpoint on text and recall (answer NLL at the eval pairs, gap 0)
                r_nll, r_acc = _eval_recall(model, tokenizer, val, args.recall_eval_pairs, 0)
                record.update(recall_nll=r_nll, recall_acc=r_acc)
                score = val_loss + r_nll
            if score < best:
                best = score
                tmp = out / "best.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
                (tmp / "best.json").write_text(json.dumps(record, indent=2) + "\n")
                shutil.rmtree(out / "best", ignore_errors=True)
                os.replace(tmp, out / "best")
                record["best"] = True
            log.write(json.dumps(record) + "\n")
            log.flush()
            logger.info("%s", record)
            state = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "rng": torch.get_rng_state(),
                "step": step,
                "best": best,
                "elapsed": elapsed,
            }
            _atomic_save(state, last)
            if getattr(args, "stop_at", 0) and step >= args.stop_at:
                logger.info("stopping at step %d (--stop-at)", step)
                break
            if (out / "STOP").exists():
                logger.info("STOP file found; stopping at step %d", step)
                break
    bar.close()
    log.close()


# --- export ------------------------------------------------------------------------------------------------------

CARD_TEMPLATE = """---
license: other
library_name: transformers
pipeline_tag: text-generation
---
# {name}: {arch_title} trained by `sensitivity`

A small {arch_title} language model {origin} on 2 CPU cores by this project, shipped inside the
package so that every command runs offline on a genuinely trained state-space model. Load it with
`sensitivity.load_model("{name}")` or `AutoModelForCausalLM.from_pretrained(<this directory>)`.
{recall}
| | |
|---|---|
| architecture | {arch} (`{model_type}`): {layers} layers, hidden {hidden}, {mixer} |
| parameters | {params:,} (embeddings tied to the LM head) |
| tokenizer | byte-level BPE, {vocab} tokens, trained on the corpus' train split |
| training data | built-in corpus `austen-kjv`, train split ({train_tokens:,} tokens) |
| tokens seen (best checkpoint) | {tokens_seen:,} ({epochs:.2f} epochs) at step {step} |
| tokens seen (whole run) | {tokens_total:,} |
| CPU time | {cpu_hours:.2f} core-hours to the best checkpoint ({threads}, {wall_hours:.2f} h wall) |
| optimiser | AdamW (0.9, 0.95), weight decay {weight_decay}, lr {lr}, {warmup} warm-up steps, cosine to 10% |
| batch | {batch} x {seqlen} tokens, {precision} |
| seed | {seed} |
| **test perplexity** | **{test_ppl:.2f}** |
| validation perplexity | {val_ppl:.2f} |
| stored as | float16 safetensors ({size_mb:.1f} MB); `config.json` asks for float32 on load |

Perplexity definition: {definition}

Commands (the time budget was fixed as {budget}):

```
python -m sensitivity.zoo.train tokenizer --out runs/tokenizer
{command}
python -m sensitivity.zoo.train export --run <run dir> --name {name}
```

The loss curve is in `training_log.jsonl`: the mean train loss of the last {eval_every} steps and the validation
loss on the first {eval_windows} windows of 512 tokens of the validation split (mostly Austen, which is harder than
the corpus average; the shipped checkpoint is the one with the lowest such loss).

Intended use: a testbed for pruning and interpretability analysis of state-space LMs. It is far too small to be a
useful text generator. The training text is public domain; see the corpus data card in
`sensitivity/data/builtin/README.md`.
"""


RECALL_CARD_PAIRS = (4, 8, 16, 32, 64)
"""Numbers of pairs of the recall accuracy on the card of a model trained with recall items."""

RECALL_TEMPLATE = """
**A model that needs its state.** {origin} In every step the text batch is followed by {batch} multi-query
associative recall items (`sensitivity.data.recall`: 1 to {max_pairs} key-value pairs of whole-word tokens, a gap
of 0 to {max_gap} tokens of train-split text, then every key again followed by its value); the loss is the text
loss plus the recall answers' loss. The checkpoint kept is the one with the lowest sum of validation text loss and
recall loss at {eval_pairs} pairs.

Recall accuracy (argmax over the whole vocabulary at each query key; 256 items per column, seed 0, no gap; chance
1/256 for a model that knows the answer is a value):

| pairs | {head} |
|---|{rule}|
| accuracy | {row} |
"""

_TITLES = {"mamba2": "Mamba-2", "mamba": "Mamba-1", "bamba": "hybrid Mamba-2 + attention (Bamba)"}


def _effective_command(meta: dict) -> str:
    """The command lines that reproduce a run: the time budget replaced by the token budget it fixed."""
    words, base, skip = meta["command"].split(), [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--time-budget", "--max-tokens", "--extend-to", "--extend-lr"):
            skip = True
        else:
            base.append(word.replace("/work/runs/", "runs/"))
    first = " ".join(base + ["--max-tokens", str(meta["max_tokens"])])
    lines = [first]
    tokens_per_step = meta["batch"] * meta["seqlen"]
    for seg in sorted(meta.get("extensions", []), key=lambda seg: seg["from_step"]):
        end = (seg["from_step"] + seg["steps"]) * tokens_per_step
        lines.append(f"{first} --extend-to {end} --extend-lr {seg['lr']}")
    return "\n".join(lines)


def _run_story(meta: dict, best: dict) -> str:
    """One sentence saying what a run trained (for the card)."""
    init = meta.get("init") or ""
    tokens = f"{best['step']} steps of {meta['batch']} x {meta['seqlen']} text tokens at peak lr {meta['lr']}"
    if not init:
        return f"Trained from scratch for {tokens}."
    source = f"`{init}`" if "/" not in init else "the previous run's best checkpoint"
    grown = []
    if meta.get("prepend_layers"):
        grown.append(f"{meta['prepend_layers']} new block(s) in front")
    if meta.get("append_layers"):
        grown.append(f"{meta['append_layers']} new block(s) after the last")
    what = f"Continued {source}" + (f" with {' and '.join(grown)}" if grown else "")
    if meta.get("memory_init"):
        what += (", initialised as an associative memory (`--memory-init`: keys and queries share one projection, "
                 "the convolution gives the keys the previous token, no decay; its output projection zero, so the "
                 "model starts unchanged)")  # fmt: skip
    trained = ("only the new blocks" if meta.get("train_new_only") else
               "every weight but the (tied) embeddings" if meta.get("freeze_embeddings") else "every weight")
    return f"{what}, training {trained} for {tokens}."


def _earlier_runs(meta: dict) -> list[tuple[dict, dict]]:
    """``(train_args, best)`` of the runs this one continued (``--init`` naming a run's ``best/``), oldest first."""
    runs, init = [], meta.get("init")
    while init and (Path(init).parent / "train_args.json").exists():
        earlier = json.loads((Path(init).parent / "train_args.json").read_text())
        runs.insert(0, (earlier, json.loads((Path(init) / "best.json").read_text())))
        init = earlier.get("init")
    return runs


def export_model(run: Path, name: str, dest_root: Path = ZOO_DIR) -> dict:
    """Store ``run/best`` in float16 under ``dest_root/name`` with its card; returns the card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core import load_model
    from ..core.output import versions
    from ..data import eval_windows, load_corpus
    from ..eval import perplexity

    best = json.loads((run / "best" / "best.json").read_text())
    meta = json.loads((run / "train_args.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    tmp = dest_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(run / "best"), dtype=torch.float32)
    model.to(torch.float16).save_pretrained(str(tmp))
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    AutoTokenizer.from_pretrained(str(run / "best")).save_pretrained(str(tmp))
    shutil.copy(run / "log.jsonl", tmp / "training_log.jsonl")

    lm = load_model(str(tmp))
    corpus = load_corpus("austen-kjv")
    test = perplexity(lm, eval_windows(corpus, lm.tokenizer, 512, split="test"), show_progress=False)
    val = perplexity(lm, eval_windows(corpus, lm.tokenizer, 512, split="validation"), show_progress=False)
    cfg = lm.model.config
    if cfg.model_type == "mamba2":
        mixer = f"{cfg.num_heads} heads x {cfg.head_dim}, {cfg.n_groups} groups, state {cfg.state_size}"
    elif cfg.model_type == "bamba":
        attn = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
        heads = f"{cfg.num_attention_heads} heads x {cfg.hidden_size // cfg.num_attention_heads}"
        mixer = (f"Mamba-2 mixers ({cfg.mamba_n_heads} heads x {cfg.mamba_d_head}, {cfg.mamba_n_groups} groups, state "
                 f"{cfg.mamba_d_state}) except attention at layers {', '.join(map(str, attn))} ({heads}, RoPE), "
                 f"each followed by a SwiGLU MLP of width {cfg.intermediate_size}")  # fmt: skip
    else:
        mixer = f"inner {cfg.intermediate_size}, state {cfg.state_size}, dt rank {cfg.time_step_rank}"
    earlier = _earlier_runs(meta)
    command = "\n".join([*(f"{_effective_command(m)} --stop-at {b['step']}" for m, b in earlier),
                          _effective_command(meta)])  # fmt: skip
    card = {
        "name": name,
        "arch": cfg.model_type,
        "parameters": lm.n_params,
        "vocab_size": cfg.vocab_size,
        "train_tokens_in_split": meta["train_tokens_in_split"],
        "tokens_seen": best["tokens"],
        "tokens_total": log[-1]["tokens"],
        "best_step": best["step"],
        "cpu_hours": sum(b["elapsed_s"] * m["threads"] for m, b in [*earlier, (meta, best)]) / 3600,
        "wall_hours": sum(b["elapsed_s"] for _, b in [*earlier, (meta, best)]) / 3600,
        "seed": meta["seed"],
        "command": command,
        "test_perplexity": test.perplexity,
        "test_definition": test.definition,
        "validation_perplexity": val.perplexity,
        "storage_dtype": "float16",
        "versions": versions(),
    }
    if meta.get("init"):
        card["init"] = earlier[0][0]["init"] if earlier else meta["init"]
    recall_text = ""
    if meta.get("recall"):
        from ..eval.recall import recall_accuracy

        acc = recall_accuracy(lm, lm.tokenizer, pairs=RECALL_CARD_PAIRS, items=256, seed=0, show_progress=False)
        by_pairs = acc.groupby("pairs").correct.mean()
        card["recall_accuracy"] = {str(int(p)): float(v) for p, v in by_pairs.items()}
        card["recall_definition"] = "256 recall items per number of pairs, seed 0, no gap (sensitivity.eval.recall)"
        r = meta["recall"]
        recall_text = RECALL_TEMPLATE.format(
            origin=" ".join(_run_story(m, b) for m, b in [*earlier, (meta, best)]), batch=r["batch"],
            max_pairs=r["max_pairs"], max_gap=r["max_gap"], eval_pairs=r["eval_pairs"],
            head=" | ".join(str(p) for p in RECALL_CARD_PAIRS),
            rule=" | ".join("---" for _ in RECALL_CARD_PAIRS),
            row=" | ".join(f"{v:.1%}" for v in by_pairs.to_numpy()),
        )  # fmt: skip
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    size_mb = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file()) / 1e6
    readme = CARD_TEMPLATE.format(
        name=name,
        origin="continued from `" + card["init"] + "`" if meta.get("init") else "trained from scratch",
        recall=recall_text,
        arch_title=_TITLES[cfg.model_type],
        arch=_TITLES[cfg.model_type],
        model_type=cfg.model_type,
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        mixer=mixer,
        params=lm.n_params,
        vocab=cfg.vocab_size,
        train_tokens=meta["train_tokens_in_split"],
        tokens_seen=best["tokens"],
        epochs=best["tokens"] / meta["train_tokens_in_split"],
        step=best["step"],
        tokens_total=log[-1]["tokens"],
        cpu_hours=card["cpu_hours"],
        threads=f"{meta['threads']} thread" + ("s" if meta["threads"] != 1 else ""),
        wall_hours=card["wall_hours"],
        weight_decay=meta["weight_decay"],
        lr=meta["lr"],
        warmup=meta["warmup"],
        batch=meta["batch"],
        seqlen=meta["seqlen"],
        seed=meta["seed"],
        test_ppl=test.perplexity,
        val_ppl=val.perplexity,
        size_mb=size_mb,
        definition=test.definition,
        budget=meta.get("budget_fixed", "not used"),
        command=command,
        eval_every=log[0]["step"],
        eval_windows=meta.get("eval_windows", 96),
        precision="bf16 autocast" if meta["bf16_autocast"] else "float32",
    )
    (tmp / "README.md").write_text(readme)
    dest = dest_root / name
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    logger.info("exported %s: test ppl %.2f, %.1f MB", dest, test.perplexity, size_mb)
    return card


def _count(text: str) -> int:
    """An argparse type: an integer >= 0 (a clear one-line error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: 0 or more") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; allowed: 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (sub-commands ``tokenizer``, ``model``, ``export``)."""
    parser = argparse.ArgumentParser(description="Train the embedded tokenizer and models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=8192)
    p = sub.add_parser("model")
    p.add_argument("--arch", choices=sorted(ARCH_CONFIGS), required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=8_000_000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=96)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast (slower than float32 without bf16 units)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=0, help="seconds; fixes --max-tokens from measured speed")
    p.add_argument("--budget-probe", type=int, default=30, help="steps timed before fixing the time budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extend-to", type=int, default=0, help="continue a finished run up to this many tokens in all")
    p.add_argument("--extend-lr", type=float, default=6e-4, help="peak lr of the continuation's cosine segment")
    p.add_argument("--init", default="", help="start from this model's weights (a zoo name or a local path)")
    p.add_argument("--append-layers", type=int, default=0, help="with --init: add this many blocks after the last")
    p.add_argument("--stop-at", type=_count, default=0, help="stop after this step (the schedule stays the full one)")
    p.add_argument("--prepend-layers", type=_count, default=0, help="with --init: add N blocks before the first")
    p.add_argument("--memory-init", action="store_true", help="start the new blocks as an associative memory")
    p.add_argument("--train-new-only", action="store_true", help="train only the appended blocks")
    p.add_argument("--freeze-embeddings", action="store_true", help="keep the (tied) embeddings as they are")
    p.add_argument("--recall-batch", type=int, default=0, help="recall items per step added to each text batch")
    p.add_argument("--recall-max-pairs", type=int, default=32)
    p.add_argument("--recall-max-gap", type=int, default=64)
    p.add_argument("--recall-eval-pairs", type=int, default=16)
    p = sub.add_parser("export")
    p.add_argument("--run", required=True)
    p.add_argument("--name", required=True, choices=["default", "default-mamba1", "default-hybrid", "recall"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.cmd == "tokenizer":
        train_tokenizer(Path(args.out), args.vocab_size)
    elif args.cmd == "model":
        train_model(args)
    elif args.cmd == "export":
        export_model(Path(args.run), args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

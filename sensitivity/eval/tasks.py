"""Zero-shot task scores: the built-in tasks scored by the toolkit exactly as lm-eval scores them, and any lm-eval task
through lm-eval's ``HFLM`` wrapping the in-memory (loaded or pruned) model.

Every score comes as tidy rows ``{task, metric, value, stderr, n, definition}``, one per (task, metric).

* :func:`score_builtin` scores ``cloze`` and ``choice`` (:mod:`sensitivity.data.tasks`) with lm-eval's tokens
  (:func:`~sensitivity.data.tasks.encode_pair`), log-softmax, metrics and standard errors (lm-eval 0.4.13): per item
  the summed log-likelihood of the continuation's tokens and whether every one is the argmax; ``acc`` is the mean
  of those greedy hits (cloze) or of ``argmax(lls) == gold`` (choice), ``acc_norm`` divides each choice's
  log-likelihood by its length in characters, ``perplexity`` is ``exp(-mean over items of the summed
  log-likelihood)``. Standard errors: ``sample std / sqrt(n)`` for means, lm-eval's seeded bootstrap for perplexity.
* :func:`lm_eval_rows` runs ``lm_eval.simple_evaluate`` on lm-eval task names, the built-in tasks' shipped YAMLs
  (their data path made absolute; offline) or a user's task YAML.
* :func:`evaluate_tasks` dispatches each name: a name in :data:`SCORERS` is scored by the toolkit (unless
  ``engine="lm-eval"``), anything else by lm-eval, and returns a pandas frame.

Shape legend: B sequences in a batch, L tokens, V vocabulary, C continuation tokens.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.finite import check_loss
from ..core.loading import unwrap
from ..core.names import ENGINES
from ..data.tasks import BUILTIN_TASKS, TASK_ABOUT, task_items, task_pairs, task_path, task_texts

__all__ = ["BOOTSTRAP_ITERS", "COLUMNS", "ENGINES", "SCORERS", "check_tasks", "default_max_length",
           "evaluate_tasks", "lm_eval_rows", "loglikelihoods", "score_builtin"]  # fmt: skip

logger = logging.getLogger(__name__)

COLUMNS = ("task", "metric", "value", "stderr", "n", "definition")
"""Columns of every task row (and of :func:`evaluate_tasks`' frame)."""
"""``auto``: the toolkit scores the tasks it has a scorer for, lm-eval the rest; ``builtin``: the toolkit only;
``lm-eval``: lm-eval scores everything (the built-in tasks through their shipped YAMLs)."""
BOOTSTRAP_ITERS = 1000
"""Bootstrap resamples for the standard error of perplexity, here and in the lm-eval runs (lm-eval's own default
is 100,000; the resamples are seeded the same way, so both give the same number)."""
DEFAULT_MAX_LENGTH = 512
"""Least ``max_length`` given to HFLM when none is set (raised to fit the longest built-in item)."""

_REQUIRED_KEYS = ("task", "dataset_path", "output_type", "doc_to_text", "doc_to_target")
_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")

Row = dict[str, Any]
Scorer = Callable[..., list[Row]]


# ---- lm-eval's metric arithmetic (lm_eval/api/metrics.py), on Python floats in item order --------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _sample_stddev(xs: Sequence[float]) -> float:
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def _mean_stderr(xs: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``; NaN (lm-eval: "N/A") for fewer than 2 items."""
    return _sample_stddev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


def _perplexity(lls: Sequence[float]) -> float:
    """lm-eval's ``perplexity`` aggregation: ``exp(-mean(lls))`` over items (summed log-likelihoods)."""
    return math.exp(-_mean(lls))


def _bootstrap_stderr(fn: Callable[[Sequence[float]], float], xs: Sequence[float], iters: int) -> float:
    """lm-eval's ``bootstrap_stderr``: ``iters`` resamples in chunks of up to 1000, chunk ``i`` drawn by
    ``random.Random(i)``; the sample std of the statistic over them. NaN for fewer than 2 items or no resamples."""
    if len(xs) < 2 or iters <= 0:
        return math.nan
    chunk = min(1000, iters)
    stats = []
    for i in range(iters // chunk):
        rnd = random.Random(i)
        stats.extend(fn(rnd.choices(xs, k=len(xs))) for _ in range(chunk))
    return _sample_stddev(stats)


# ---- the toolkit's scoring ----------------------------------------------------------------------------------------


@torch.no_grad()
def loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8,
                   show_progress: bool = True, desc: str = "loglikelihood") -> list[tuple[float, bool]]:  # fmt: skip
    """Log-likelihood of each continuation given its context, and whether it is the greedy one, as lm-eval's
    ``HFLM._loglikelihood_tokens`` computes them.

    Sequences ``(context + continuation)[:-1]`` are run longest first in right-padded batches (padding after a
    sequence cannot change its causal logits); ``log_softmax`` is taken in the logits' dtype, as lm-eval does.

    Args:
        model: A ``LoadedModel`` or a HF causal LM.
        pairs: ``(context_ids, continuation_ids)`` per request, both non-empty
            (:func:`sensitivity.data.tasks.encode_pair`).
        batch_size: Sequences per forward.
        show_progress: Show a tqdm bar.
        desc: The bar's label.

    Returns:
        ``(summed log-likelihood in nats, every continuation token is the argmax)`` per pair, in input order.

    Raises:
        NonFiniteError: When a batch's log-likelihood is not finite (naming where the forward first went wrong).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} is invalid; allowed: an integer >= 1")
    module = unwrap(model)
    device = next(module.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    bar = tqdm(total=len(pairs), desc=desc, disable=not show_progress, unit="seq")
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        seqs = [(pairs[i][0] + pairs[i][1])[:-1] for i in batch]
        ids = torch.zeros(len(batch), max(map(len, seqs)), dtype=torch.long)  # (B, L)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
        ids = ids.to(device)
        logits = module(input_ids=ids, use_cache=False).logits  # (B, L, V)
        total = 0.0
        for row, i in enumerate(batch):
            ctx, cont = pairs[i]
            end = len(ctx) + len(cont) - 1  # the logits at [end - C, end) score the continuation
            lp = F.log_softmax(logits[row, end - len(cont) : end], dim=-1)  # (C, V), row-wise as lm-eval's
            target = torch.tensor(cont, device=device)  # (C,)
            greedy = bool((lp.argmax(dim=-1) == target).all())
            ll = float(lp.gather(-1, target[:, None]).sum())
            out[i] = (ll, greedy)
            total += ll
        check_loss(module, total, ids, "the log-likelihood")
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def _toolkit() -> str:
    return "scored by the toolkit with lm-eval 0.4.13's tokens and formulas"


def _definitions(name: str, n: int, how: str) -> dict[str, str]:
    """One sentence per metric of built-in task ``name``: the items, how it is scored, the chance level."""
    about = TASK_ABOUT[name]
    if name == "cloze":
        return {
            "acc": f"share of {n} cloze items whose target ' ' + word is the model's greedy continuation (every "
                   f"token the argmax) given the passage; {about}; {how}",
            "perplexity": f"exp(-mean over {n} cloze items of the summed log-likelihood, nats, of the target's "
                          f"tokens given the passage) (lm-eval's per-item perplexity, lower is better; stderr by "
                          f"{BOOTSTRAP_ITERS} seeded bootstrap resamples); {about}; {how}",
        }  # fmt: skip
    return {
        "acc": f"share of {n} choice items whose highest summed log-likelihood of ' ' + choice given the context "
               f"is the true continuation's; {about}; {how}",
        "acc_norm": f"as acc with each choice's log-likelihood divided by its length in characters (lm-eval's "
                    f"acc_norm) on {n} choice items; {about}; {how}",
    }  # fmt: skip


def score_builtin(model, name: str, *, max_items: int | None = None, batch_size: int = 8,
                  show_progress: bool = True, tokenizer=None) -> list[Row]:  # fmt: skip
    """Score a built-in task with the toolkit: the numbers lm-eval gives for the same items.

    ``cloze``: ``acc`` (greedy target) and ``perplexity`` (``exp(-mean summed log-likelihood)``); ``choice``:
    ``acc`` and ``acc_norm``. Standard errors as lm-eval computes them (``sample std / sqrt(n)`` for accuracies, its
    seeded bootstrap with :data:`BOOTSTRAP_ITERS` resamples for perplexity; NaN for a single item).

    Args:
        model: A ``LoadedModel`` or a HF causal LM.
        name: ``"cloze"`` or ``"choice"``.
        max_items: Score only the first K items (lm-eval's ``limit``); all if ``None``.
        batch_size: Sequences per forward.
        show_progress: Show a tqdm bar.
        tokenizer: The model's tokenizer (default: the ``LoadedModel``'s).

    Returns:
        Rows ``{task, metric, value, stderr, n, definition}``, one per metric.

    Examples:
        >>> rows = score_builtin(load_model("default"), "choice", max_items=100)
        >>> [(r["metric"], round(r["value"], 3)) for r in rows]
    """
    module, tokenizer = unwrap(model), _tokenizer(model, tokenizer)
    items = task_pairs(name, tokenizer, max_items=max_items)
    flat = [pair for pairs, _ in items for pair in pairs]
    results = iter(loglikelihoods(module, flat, batch_size=batch_size, show_progress=show_progress, desc=name))
    scored = [([next(results) for _ in pairs], gold) for pairs, gold in items]
    n = len(scored)
    defs = _definitions(name, n, _toolkit())
    if name == "cloze":
        lls = [res[0][0] for res, _ in scored]
        acc = [int(res[0][1]) for res, _ in scored]
        values = {"acc": (_mean(acc), _mean_stderr(acc)),
                  "perplexity": (_perplexity(lls), _bootstrap_stderr(_perplexity, lls, BOOTSTRAP_ITERS))}  # fmt: skip
    else:
        acc, acc_norm = [], []
        texts = [task_texts(name, item)[1] for item in task_items(name)[:n]]
        for (res, gold), conts in zip(scored, texts):
            lls = np.array([ll for ll, _ in res])
            chars = np.array([float(len(c) - 1) for c in conts])  # the choice without lm-eval's target delimiter
            acc.append(1.0 if np.argmax(lls) == gold else 0.0)
            acc_norm.append(1.0 if np.argmax(lls / chars) == gold else 0.0)
        values = {"acc": (_mean(acc), _mean_stderr(acc)), "acc_norm": (_mean(acc_norm), _mean_stderr(acc_norm))}
    return [{"task": name, "metric": m, "value": v, "stderr": s, "n": n, "definition": defs[m]}
            for m, (v, s) in values.items()]  # fmt: skip


SCORERS: dict[str, Scorer] = {name: functools.partial(score_builtin, name=name) for name in BUILTIN_TASKS}
"""Tasks the toolkit scores itself: name -> ``fn(model, *, max_items, batch_size, show_progress) -> rows``
(``{task, metric, value, stderr, n, definition}``). Add an entry to score another in-package task."""


def _recall_pairs(name: str) -> int | None:
    """P of a task named ``recall:P`` (P >= 1), else None."""
    head, colon, pairs = name.partition(":")
    return int(pairs) if head == "recall" and colon and pairs.isdigit() and pairs.isascii() and int(pairs) else None


def _recall(model, *, max_items: int | None = None, batch_size: int = 8, show_progress: bool = True,
            pairs: tuple[int, ...] | None = None) -> list[Row]:  # fmt: skip
    """Associative recall accuracy at ``pairs`` pairs (default 4..64, as many as the key pool holds; ``recall:P``
    asks for P alone), ``max_items`` items each (default 64; seed 0, no gap)."""
    from ..core.objective import check_recall_pairs
    from ..data.recall import check_recall_size, recall_pools
    from .recall import recall_accuracy, recall_definition, recall_rows

    tokenizer = _tokenizer(model, None)
    items, pool = max_items or 64, len(recall_pools(tokenizer)[0])
    if pairs is not None:
        check_recall_pairs(max(pairs), tokenizer, "tasks")
        check_recall_size(max(pairs), items)
    df = recall_accuracy(model, tokenizer, pairs=pairs or [p for p in (4, 8, 16, 32, 64) if p <= pool], items=items,
                         seed=0, batch_size=batch_size, show_progress=show_progress)  # fmt: skip
    definition = recall_definition(items, 0, pool)
    return [{**row, "definition": definition} for row in recall_rows(df)]


def _long(model, *, max_items: int | None = None, batch_size: int = 8, show_progress: bool = True) -> list[Row]:
    """Mean next-token NLL by position on ``max_items`` (default 4) test windows of 4,096 tokens, in 8 bins."""
    from .recall import position_nll

    del batch_size  # one window per forward
    df = position_nll(model, _tokenizer(model, None), seqlen=4096, windows=max_items or 4, bins=8,
                      show_progress=show_progress)  # fmt: skip
    n = int(df.windows.iloc[0])
    definition = (f"mean next-token NLL (nats) over the predicted positions start..stop-1 of the first {n} "
                  "consecutive test-split windows of 4096 tokens of the built-in corpus")  # fmt: skip
    return [{"task": "long", "metric": f"nll@{r.start}-{r.stop - 1}", "value": r.nll, "stderr": float("nan"),
             "n": n, "definition": definition} for r in df.itertuples()]  # fmt: skip


SCORERS.update(recall=_recall, long=_long)


def _tokenizer(model, tokenizer):
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: pass a LoadedModel, or tokenizer=")
    return tokenizer


# ---- lm-eval ------------------------------------------------------------------------------------------------------


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"lm-eval tasks need lm-eval with its HF model: pip install 'sensitivity[eval]' ({e})"
                          ) from None  # fmt: skip
    return lm_eval, HFLM, TaskManager


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def _absolute_data(cfg: dict, folder: Path) -> dict:
    """``cfg`` with a local dataset's relative ``data_files`` (and a relative ``dataset_path`` directory) made
    absolute against the YAML's folder when they exist there."""
    cfg = dict(cfg)

    def fix(value):
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
            return str((folder / value).resolve())
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    path = cfg.get("dataset_path")
    if isinstance(path, str) and path not in _LOCAL_BUILDERS:
        cfg["dataset_path"] = fix(path)
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        cfg["dataset_kwargs"] = {**kwargs, "data_files": fix(kwargs["data_files"])}
    return cfg


def _read_task_yaml(path: str | Path) -> dict:
    """A task YAML read as lm-eval reads it (``include`` and ``!function`` resolved), checked for the keys a task
    needs, its local data paths made absolute.

    Raises:
        ValueError: One line naming the file: missing, unparsable, not a mapping, a key missing or invalid.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"task YAML {str(path)!r} does not exist")
    try:
        cfg = load_yaml(path, resolve_func=True, recursive=True)
    except Exception as e:  # yaml errors, bad includes, unimportable !function
        detail = " ".join(str(e).split())
        raise ValueError(f"malformed task YAML {str(path)!r}: {type(e).__name__}: {detail[:300]}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"malformed task YAML {str(path)!r}: not a mapping of task fields")
    if "group" in cfg:
        return cfg
    missing = [k for k in _REQUIRED_KEYS if k not in cfg]
    if cfg.get("output_type") == "multiple_choice" and "doc_to_choice" not in cfg:
        missing.append("doc_to_choice")
    if missing:
        raise ValueError(f"malformed task YAML {str(path)!r}: missing {', '.join(missing)} (a task needs "
                         f"{', '.join(_REQUIRED_KEYS)})")  # fmt: skip
    if not isinstance(cfg["task"], str) or not cfg["task"]:
        raise ValueError(f"malformed task YAML {str(path)!r}: task must be a name, got {cfg['task']!r}")
    if cfg["output_type"] not in _OUTPUT_TYPES:
        raise ValueError(f"malformed task YAML {str(path)!r}: output_type {cfg['output_type']!r} is invalid; "
                         f"allowed: {', '.join(_OUTPUT_TYPES)}")  # fmt: skip
    return _absolute_data(cfg, path.resolve().parent)


def _plan(tasks: Sequence[str], engine: str) -> list[tuple[str, str, Any]]:
    """Each requested task as ``(name, how, what)``: ``("cloze", "toolkit", scorer)``, ``(name, "config", cfg)``
    for a built-in or YAML task run by lm-eval, or ``(name, "lm-eval", name)`` for an lm-eval task name."""
    if engine not in ENGINES:
        raise ValueError(f"engine: {engine!r} is invalid; allowed: {', '.join(ENGINES)}")
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks: {tasks!r} is invalid; allowed: a non-empty list of task names or task YAML paths")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: {list(tasks)!r} names a task twice")
    plan = []
    for name in tasks:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"tasks: {name!r} is invalid; allowed: a task name or a task YAML path")
        if engine != "lm-eval" and name in SCORERS:
            plan.append((name, "toolkit", SCORERS[name]))
        elif engine != "lm-eval" and (pairs := _recall_pairs(name)) is not None:
            plan.append((name, "toolkit", functools.partial(_recall, pairs=(pairs,))))
        elif engine == "builtin":
            raise ValueError(f"task {name!r} has no built-in scorer; allowed with engine 'builtin': "
                             f"{', '.join(SCORERS)} (other tasks need engine 'auto' or 'lm-eval')")  # fmt: skip
        elif name in BUILTIN_TASKS:
            plan.append((name, "config", None))
        elif _is_yaml_path(name):
            plan.append((name, "config", None))
        else:
            plan.append((name, "lm-eval", name))
    return plan


def check_tasks(tasks: Sequence[str], engine: str = "auto") -> None:
    """Check, before any model is loaded, that every name is a task this engine can run: a scorer of
    :data:`SCORERS`, a built-in task, a well-formed task YAML, or an lm-eval task name.

    Raises:
        ValueError: One line naming the bad value and what is allowed (or the malformed YAML file).
        ImportError: When lm-eval is needed and missing.
    """
    plan = _plan(tasks, engine)
    if not any(how != "toolkit" for _, how, _ in plan):
        return
    try:
        _, _, TaskManager = _lm_eval()
    except ImportError:
        for name, how, _ in plan:
            if how == "lm-eval":
                raise ValueError(f"task {name!r} is not a built-in task ({', '.join(SCORERS)}) or a task YAML path "
                                 "(.yaml); lm-eval task names need lm-eval: pip install 'sensitivity[eval]'"
                                 ) from None  # fmt: skip
        raise
    _configs(plan, TaskManager)


@functools.lru_cache(maxsize=1)
def _lm_eval_task_names() -> frozenset[str]:
    _, _, TaskManager = _lm_eval()
    return frozenset(TaskManager().all_tasks)


def _configs(plan: list[tuple[str, str, Any]], TaskManager) -> tuple[list, dict[str, str], bool]:
    """What to pass to ``simple_evaluate`` for the lm-eval part of ``plan``, lm-eval's task name -> the requested
    name, and whether lm-eval's own task index is needed."""
    specs, names, needs_index = [], {}, False
    for name, how, _ in plan:
        if how == "toolkit":
            continue
        if how == "lm-eval":
            if name not in _lm_eval_task_names():
                raise ValueError(f"task {name!r} is not a built-in task ({', '.join(SCORERS)}, recall:P), an existing "
                                 "task YAML file (.yaml) or an lm-eval task name (lm_eval.tasks.TaskManager()"
                                 ".all_tasks)")  # fmt: skip
            specs.append(name)
            names[name] = name
            needs_index = True
            continue
        cfg = _read_task_yaml(task_path(name, ".yaml") if name in BUILTIN_TASKS else name)
        if "group" in cfg:
            specs.append(str(Path(name).expanduser().resolve()))
            needs_index = True
        else:
            specs.append(cfg)
            names[cfg["task"]] = name if name in BUILTIN_TASKS else cfg["task"]
    return specs, names, needs_index


def default_max_length(tokenizer, tasks: Sequence[str], floor: int = DEFAULT_MAX_LENGTH) -> int:
    """The ``max_length`` HFLM gets when none is set: ``floor``, raised to the longest item of the built-in tasks
    among ``tasks`` (context + longest continuation, in tokens), so that lm-eval truncates none of them."""
    longest = floor
    for name in tasks:
        if name in BUILTIN_TASKS:
            items = task_pairs(name, tokenizer)
            longest = max(longest, max(len(c) + len(t) for pairs, _ in items for c, t in pairs))
    return longest


@contextlib.contextmanager
def _quiet_lm_eval(show_progress: bool):
    """lm-eval's prints and progress bars to stderr (stdout stays the caller's; both dropped without
    ``show_progress``), its warnings only when this module logs INFO, and the global random states restored
    afterwards (``simple_evaluate`` seeds python, numpy and torch)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    if not logger.isEnabledFor(logging.INFO):
        lm_logger.setLevel(logging.ERROR)
    bars = None
    try:
        import datasets

        bars = datasets.is_progress_bar_enabled()
        if not show_progress:
            datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - lm-eval requires datasets
        pass
    sink = sys.stderr if show_progress else io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        lm_logger.setLevel(level)
        if bars:
            import datasets

            datasets.enable_progress_bars()
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def lm_eval_rows(model, tokenizer, tasks: Sequence[str], *, max_length: int, batch_size: int = 8,
                 limit: int | None = None, seed: int = 0, show_progress: bool = True) -> list[Row]:  # fmt: skip
    """Run lm-eval on the in-memory model and return tidy rows.

    The model is wrapped by lm-eval's ``HFLM`` (``max_length`` from the caller, not the tokenizer's
    ``model_max_length``; HFLM puts it in eval mode and ties its weights as it does for any model). Tasks are
    lm-eval task names (their data must be available: lm-eval downloads it, or reads the HF cache offline),
    built-in task names (their shipped YAML, data path made absolute: offline), or paths to task YAMLs (relative
    local data paths resolved against the YAML's folder). Zero-shot, no chat template; perplexity standard errors
    from :data:`BOOTSTRAP_ITERS` resamples.

    Args:
        model: A ``LoadedModel`` or a HF causal LM.
        tokenizer: Its tokenizer (``None``: the ``LoadedModel``'s).
        tasks: Task names or YAML paths.
        max_length: Longest input (tokens) HFLM feeds the model; longer inputs are cut from the left.
        batch_size: Requests per forward.
        limit: Score only the first K documents of each task.
        seed: lm-eval's python, numpy, torch and few-shot seeds (the caller's random states are restored).
        show_progress: Leave lm-eval's and datasets' progress bars on.

    Returns:
        Rows ``{task, metric, value, stderr, n, definition}`` (stderr NaN where lm-eval gives "N/A").

    Raises:
        ValueError: For a name that is no task, or a malformed task YAML (one line naming it).
        ImportError: When lm-eval is not installed.
    """
    lm_eval, HFLM, TaskManager = _lm_eval()
    plan = _plan(tasks, "lm-eval")
    specs, names, needs_index = _configs(plan, TaskManager)
    module, tokenizer = unwrap(model), _tokenizer(model, tokenizer)
    with _quiet_lm_eval(show_progress):
        hflm = HFLM(pretrained=module, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)
        manager = TaskManager() if needs_index else TaskManager(include_defaults=False)
        seeds = {"random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed, "fewshot_random_seed": seed}
        out = lm_eval.simple_evaluate(model=hflm, tasks=specs, task_manager=manager, limit=limit,
                                      bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, **seeds)  # fmt: skip
    version = getattr(lm_eval, "__version__", "")
    rows = []
    for key, result in out["results"].items():
        task = names.get(key, key)
        n = (out.get("n-samples") or {}).get(key, {}).get("effective")
        config = (out.get("configs") or {}).get(key, {})
        how = (f"scored by lm-eval {version} (HFLM on the in-memory model, max_length {max_length}, "
               f"{config.get('num_fewshot') or 0}-shot)")  # fmt: skip
        defs = _definitions(task, n, how) if task in BUILTIN_TASKS and n else {}
        for metric_key, value in result.items():
            if "," not in metric_key or "_stderr," in metric_key:
                continue
            metric, filt = metric_key.split(",", 1)
            stderr = result.get(f"{metric}_stderr,{filt}")
            label = metric if filt == "none" else f"{metric}/{filt}"
            better = (out.get("higher_is_better") or {}).get(key, {}).get(metric)
            direction = "" if better is None else ", higher is better" if better else ", lower is better"
            definition = defs.get(metric) or (
                f"lm-eval task {key!r} ({config.get('output_type', 'group')}), metric {metric} (filter {filt}"
                f"{direction}) over {n if n is not None else 'its subtasks'} documents; {how}")  # fmt: skip
            rows.append({"task": task, "metric": label, "value": _number(value), "stderr": _number(stderr),
                         "n": n, "definition": definition})  # fmt: skip
    return rows


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ---- dispatch -----------------------------------------------------------------------------------------------------


def evaluate_tasks(model, tasks: Sequence[str], *, engine: str = "auto", max_length: int | None = None,
                   limit: int | None = None, batch_size: int = 8, seed: int = 0, show_progress: bool = True
                   ) -> pd.DataFrame:  # fmt: skip
    """Score a model on zero-shot tasks: the toolkit's scorers (:data:`SCORERS`) for the tasks it has, lm-eval for
    the rest.

    Args:
        model: A ``LoadedModel`` (loaded or pruned; its tokenizer is used).
        tasks: Built-in task names (``cloze``, ``choice``), lm-eval task names, or paths to lm-eval task YAMLs.
        engine: ``"auto"`` (toolkit where it has a scorer, lm-eval otherwise), ``"builtin"`` (toolkit only) or
            ``"lm-eval"`` (lm-eval for every task, the built-in ones through their shipped YAMLs).
        max_length: Longest input HFLM feeds the model (default: :func:`default_max_length`). The toolkit's scorers
            score whole items.
        limit: Score only the first K items of each task.
        batch_size: Sequences (toolkit) or requests (lm-eval) per forward.
        seed: lm-eval's seeds (the toolkit's scoring draws nothing at random).
        show_progress: Show progress bars.

    Returns:
        One row per (task, metric) with columns :data:`COLUMNS`, in the order of ``tasks``.

    Raises:
        ValueError: For a name that is no task (one line naming it and what is allowed) or a malformed task YAML.

    Examples:
        >>> evaluate_tasks(load_model("default"), ["cloze", "choice"], limit=100)
    """
    plan = _plan(tasks, engine)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: {limit!r} is invalid; allowed: an integer >= 1 or None")
    check_tasks(tasks, engine)
    by_task: dict[str, list[Row]] = {}
    for name, how, scorer in plan:
        if how == "toolkit":
            by_task[name] = scorer(model, max_items=limit, batch_size=batch_size, show_progress=show_progress)
    rest = [name for name, how, _ in plan if how != "toolkit"]
    if rest:
        tokenizer = getattr(model, "tokenizer", None)
        if max_length is None:
            max_length = default_max_length(tokenizer, rest)
        for row in lm_eval_rows(model, tokenizer, rest, max_length=max_length, batch_size=batch_size, limit=limit,
                                seed=seed, show_progress=show_progress):  # fmt: skip
            by_task.setdefault(row["task"], []).append(row)
    order = [name for name, _, _ in plan] + [t for t in by_task if t not in tasks]
    rows = [row for name in order for row in by_task.get(name, [])]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["n"] = frame["n"].astype("Int64")
    return frame

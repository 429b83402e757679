"""The ``evaluate`` job: token-level perplexity (and KL to a reference) of one model on held-out text, and optionally
its scores on zero-shot tasks (the built-in ``cloze`` and ``choice``, lm-eval tasks, task YAMLs)."""

from __future__ import annotations

import json
import math
from typing import Literal

from ..core.jobs import JOBS, Inputs, JobResult, ModelData
from ..core.names import ENGINES
from ..core.output import OutputDir, versions
from ..core.spec import Count, Exclude, Seed, Seqlen, SpecError, Text

__all__ = ["EvaluateSpec", "run_evaluate"]


class EvaluateSpec(ModelData):
    """The ``evaluate`` job."""

    job: Literal["evaluate"] = "evaluate"
    split: str | None = None
    """Split to evaluate (default: test, else the corpus' held-out split; a single text file's test split is its
    last 10%, 'all' scores the whole file)."""
    seqlen: Seqlen = 512
    """Window length in tokens (non-overlapping windows, stride = seqlen)."""
    max_windows: Count | None = None
    """Evaluate only the first K windows (default: all)."""
    batch_size: Count = 8
    """Windows per forward."""
    reference: Text | None = None
    """Also report KL(reference || model) against this model."""
    seed: Seed = 0
    """Seed recorded with the result, and lm-eval's seeds (the toolkit's evaluation draws nothing at random)."""
    tasks: Exclude = ()
    """Also score these zero-shot tasks: built-in (cloze, choice, recall, recall:P, long), lm-eval task names (their
    data available), or paths to lm-eval task YAMLs; comma-separated (default: none)."""
    engine: Literal[ENGINES] = "auto"  # type: ignore[valid-type]
    """Who scores the tasks: auto (the toolkit the built-in ones, lm-eval the rest), builtin (the toolkit only) or
    lm-eval (every task, the built-in ones through their shipped YAMLs)."""
    limit: Count | None = None
    """Score only the first K items of each task (default: all)."""
    max_length: Seqlen | None = None
    """Longest input in tokens lm-eval's HFLM feeds the model (default: the longer of seqlen and the longest
    built-in task item)."""
    streamed: bool = False
    """Read the checkpoint (a local directory) one block at a time instead of loading it: for checkpoints larger
    than memory (perplexity only)."""
    out: Text | None = None
    """Directory for evaluation.json (and tasks.csv with tasks) and manifest.json (default: print only)."""


def _split_note(corpus, split: str) -> dict:
    """What the split is when it was cut off a text that had none (a user's file): said plainly with the result."""
    if corpus.heldout_fraction is None or split == "all":
        return {}
    what = ("the last" if split == "test" else "all but the last") + f" {corpus.heldout_fraction:.0%}"
    return {"split_note": f"{what} of {corpus.name} (held out for evaluation; split 'all' scores the whole text)"}


@JOBS.register("evaluate", options=EvaluateSpec, description="token-level perplexity on held-out text")
def run_evaluate(spec: EvaluateSpec, inputs: Inputs, *, overwrite: bool = False, show_progress: bool = True
                 ) -> JobResult:  # fmt: skip
    """Evaluate ``spec.model`` on ``spec.data``; the result dict is the job's value (and ``evaluation.json``)."""
    from ..data import eval_windows
    from .perplexity import kl_divergence, perplexity
    from .tasks import SCORERS, default_max_length, evaluate_tasks

    out = OutputDir(spec.out, "evaluate", spec, overwrite=overwrite).check() if spec.out else None
    if spec.tasks:
        _check_tasks(spec)
    if spec.streamed:
        return _streamed(spec, inputs, out, show_progress)
    corpus, lm = inputs.load(spec)
    reference = (inputs.model(spec.reference, spec.dtype, tokenizer=False, allow_nonfinite=spec.allow_nonfinite,
                              field="reference") if spec.reference else None)  # fmt: skip
    windows = eval_windows(corpus, lm.tokenizer, spec.seqlen, split=spec.split, max_windows=spec.max_windows)
    ppl = perplexity(lm, windows, batch_size=spec.batch_size, show_progress=show_progress)
    result = {"model": lm.name, "arch": lm.arch, "n_layers": lm.registry.n_layers, "params": lm.n_params,
              "data": spec.data, "split": windows.split, **_split_note(corpus, windows.split), **ppl.to_dict(),
              "seed": spec.seed,
              "versions": versions()}  # fmt: skip
    if reference is not None:
        kl = kl_divergence(lm, reference, windows, batch_size=spec.batch_size, show_progress=show_progress)
        result.update(reference=reference.name, kl=kl.kl, kl_definition=kl.definition)
    frame = None
    if spec.tasks:
        uses_lm_eval = spec.engine == "lm-eval" or any(name not in SCORERS for name in spec.tasks)
        max_length = spec.max_length or (default_max_length(lm.tokenizer, spec.tasks, floor=spec.seqlen)
                                         if uses_lm_eval else None)  # fmt: skip
        frame = evaluate_tasks(lm, list(spec.tasks), engine=spec.engine, max_length=max_length, limit=spec.limit,
                               batch_size=spec.batch_size, seed=spec.seed, show_progress=show_progress)  # fmt: skip
        result["tasks"] = [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
    outputs = {}
    if out is not None:
        with out:
            if frame is not None:
                outputs["tasks"] = out.write_text("tasks.csv", frame.to_csv(index=False))
            outputs["evaluation"] = out.write_text("evaluation.json", json.dumps(result, indent=2) + "\n")
            out.manifest(status="complete", windows=windows.describe(), windows_sha256=windows.sha256())
    return JobResult(spec, outputs, result)


def _streamed(spec: EvaluateSpec, inputs: Inputs, out: OutputDir | None, show_progress: bool) -> JobResult:
    """Perplexity of a checkpoint read one block at a time (``streamed``)."""
    from ..core.streamed import StreamedCheckpoint
    from ..data import eval_windows
    from .perplexity import streamed_perplexity

    if spec.reference or spec.tasks:
        raise SpecError("streamed evaluation measures perplexity only; drop reference and tasks", "streamed")
    corpus = inputs.corpus(spec.data, spec.text_field)
    try:
        ckpt = StreamedCheckpoint(spec.model)
    except ValueError as e:
        raise SpecError(str(e), "model") from None
    if ckpt.lm.tokenizer is None:
        raise SpecError(f"{spec.model!r} has no tokenizer; save one next to its config", "model")
    windows = eval_windows(corpus, ckpt.lm.tokenizer, spec.seqlen, split=spec.split, max_windows=spec.max_windows)
    ppl = streamed_perplexity(ckpt, windows, batch_size=spec.batch_size, show_progress=show_progress)
    result = {"model": spec.model, "arch": ckpt.lm.arch, "n_layers": ckpt.lm.registry.n_layers,
              "params": ckpt.lm.n_params, "data": spec.data, "split": windows.split,
              **_split_note(corpus, windows.split), **ppl.to_dict(), "streamed": True, "seed": spec.seed,
              "versions": versions()}  # fmt: skip
    outputs = {}
    if out is not None:
        with out:
            outputs["evaluation"] = out.write_text("evaluation.json", json.dumps(result, indent=2) + "\n")
            out.manifest(status="complete", windows=windows.describe(), windows_sha256=windows.sha256())
    return JobResult(spec, outputs, result)


def _check_tasks(spec: EvaluateSpec) -> None:
    """The task names and YAMLs, checked before anything loads (errors name the ``tasks`` field)."""
    from .tasks import check_tasks

    try:
        check_tasks(spec.tasks, spec.engine)
    except (ValueError, ImportError) as e:
        raise SpecError(str(e), "tasks") from None


def _plain(value):
    """A frame cell as JSON data: NaN and pandas' NA as None, numpy numbers as Python numbers."""
    import pandas as pd

    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value

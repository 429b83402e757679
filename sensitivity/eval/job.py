"""The ``evaluate`` job: token-level perplexity (and KL to a reference) of one model on held-out text."""

from __future__ import annotations

import json
from typing import Literal

from ..core.jobs import JOBS, Inputs, JobResult, ModelData
from ..core.output import OutputDir, versions
from ..core.spec import Count, Int, Seqlen, Text
from ..data import eval_windows
from .perplexity import kl_divergence, perplexity

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
    seed: Int = 0
    """Seed recorded with the result (evaluation draws nothing at random)."""
    out: Text | None = None
    """Directory for evaluation.json and manifest.json (default: print only)."""


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
    out = OutputDir(spec.out, "evaluate", spec, overwrite=overwrite).check() if spec.out else None
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
    outputs = {}
    if out is not None:
        with out:
            outputs["evaluation"] = out.write_text("evaluation.json", json.dumps(result, indent=2) + "\n")
            out.manifest(status="complete", windows=windows.describe(), windows_sha256=windows.sha256())
    return JobResult(spec, outputs, result)

"""The ``explain`` job: why a pruned model degrades, written as ``explanation.json``, ``.md`` and CSV tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import model_validator

from ..core.jobs import JOBS, Inputs, JobResult, JobSpec
from ..core.methods import Methods
from ..core.names import DEFAULT_MODEL, DEVICES, DTYPE_NAMES
from ..core.objective import TaskOptions, objective_windows
from ..core.output import check_publish, versions
from ..core.spec import Count, Fraction, Seqlen, SpecError, Text
from ..data.corpus import DEFAULT_CORPUS
from ..pruning import MANIFEST as PRUNING_MANIFEST
from ..pruning import METHODS as PRUNING_METHODS
from .options import ExplainOptions

__all__ = ["ExplainSpec", "run_explain"]



class ExplainSpec(ExplainOptions, TaskOptions, JobSpec):
    """The ``explain`` job: a pruned checkpoint (``pruned``), or a method and sparsity to prune a copy with; a task
    objective explains the loss on its answers, on its items."""

    method_table: ClassVar[Methods] = PRUNING_METHODS

    job: Literal["explain"] = "explain"
    dense: Text = DEFAULT_MODEL
    """The dense model."""
    dtype: Literal[DTYPE_NAMES] = "float32"  # type: ignore[valid-type]
    """Weights dtype."""
    device: Literal[DEVICES] = "cpu"  # type: ignore[valid-type]
    """Where the models run: cpu, cuda, or auto (CUDA when there is a GPU)."""
    pruned: Text | None = None
    """A pruned checkpoint directory (from the prune job)."""
    method: str | None = None
    """Prune a copy of dense with this method instead (structured methods in mask mode)."""
    sparsity: Fraction | None = None
    """Sparsity for method."""
    data: Text = DEFAULT_CORPUS
    """Corpus the windows come from."""
    text_field: str = "text"
    """JSONL/HF field holding the text."""
    windows: Count = 8
    """Windows to explain on (random offsets of split, seeded)."""
    split: str | None = None
    """Split of those windows (default: validation, else the corpus' held-out split)."""
    seqlen: Seqlen = 256
    """Tokens per window."""
    calib_windows: Count = 32
    """Train windows for methods that need calibration (WANDA, Taylor and FLAP scores)."""
    label: str | None = None
    """Name of the pruned model in tables (default: the method)."""
    allow_nonfinite: bool = False
    """Load models whose weights hold NaN or infinity (refused by default, naming the tensors)."""
    out: Text
    """Directory for explanation.json/.md and the CSV tables."""

    @model_validator(mode="after")
    def _which(self) -> ExplainSpec:
        if (self.pruned is None) == (self.method is None):
            raise SpecError("give exactly one of a pruned checkpoint (pruned) or a method", "method")
        if self.method is not None:
            PRUNING_METHODS.check(self.method, field="method")
            if self.sparsity is None:
                raise SpecError(f"method {self.method} needs a sparsity", "sparsity")
        elif self.sparsity is not None:
            raise SpecError("goes with method; a pruned checkpoint already has its sparsity", "sparsity")
        return self


@JOBS.register("explain", options=ExplainSpec,
               description="why a pruned model degrades: drift, restoration patching, SSM dynamics")  # fmt: skip
def run_explain(spec: ExplainSpec, inputs: Inputs, *, overwrite: bool = False, show_progress: bool = True
                ) -> JobResult:  # fmt: skip
    """Explain ``spec.pruned`` (or ``spec.method`` at ``spec.sparsity``) against ``spec.dense``; the
    :class:`Explanation` is the job's value."""
    from ..data import calibration_windows
    from .explainer import explain, explain_method

    check_publish(Path(spec.out).expanduser().absolute(), overwrite, "explanation.json")  # before anything loads
    corpus = inputs.corpus(spec.data, spec.text_field)
    dense = inputs.model(spec.dense, spec.dtype, allow_nonfinite=spec.allow_nonfinite, field="dense")
    split = spec.split or ("validation" if "validation" in corpus.splits else corpus.heldout_split)
    windows = objective_windows(spec, dense.tokenizer) or calibration_windows(
        corpus, dense.tokenizer, spec.windows, spec.seqlen, seed=spec.seed, split=split)  # fmt: skip
    options = {k: getattr(spec, k) for k in ExplainOptions.model_fields}
    if spec.method is not None:
        calib = calibration_windows(corpus, dense.tokenizer, spec.calib_windows, spec.seqlen, seed=spec.seed)
        e = explain_method(dense, spec.method, spec.sparsity, windows, calibration=calib, label=spec.label,
                           show_progress=show_progress, **options)  # fmt: skip
    else:
        pruned = inputs.model(spec.pruned, spec.dtype, tokenizer=False, allow_nonfinite=spec.allow_nonfinite,
                              field="pruned")  # fmt: skip
        if (pruned.arch, pruned.registry.n_layers, pruned.model.config.vocab_size) != (
                dense.arch, dense.registry.n_layers, dense.model.config.vocab_size):  # fmt: skip
            raise SpecError(f"{spec.pruned!r} is a {pruned.registry.n_layers}-layer {pruned.arch} model and the dense "
                            f"{spec.dense!r} a {dense.registry.n_layers}-layer {dense.arch} model; allowed: a pruned "
                            "copy of the dense model", "pruned")  # fmt: skip
        record = Path(spec.pruned) / PRUNING_MANIFEST
        info = json.loads(record.read_text()) if record.is_file() else {}
        label = spec.label or info.get("method") or Path(spec.pruned).name
        sparsity = info.get("options", {}).get("sparsity")
        e = explain(dense, pruned, windows, label=label, sparsity=sparsity if isinstance(sparsity, float) else None,
                    show_progress=show_progress, **options)  # fmt: skip
    manifest = {"job": "explain", "spec": spec.to_dict(), "status": "complete", "seed": spec.seed,
                "versions": versions()}  # fmt: skip
    saved = e.save(spec.out, overwrite=overwrite, manifest=manifest)
    return JobResult(spec, {"explanation": saved / "explanation.json"}, e)

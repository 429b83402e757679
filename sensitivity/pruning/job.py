"""The ``prune`` job: prune a model and save it as an ordinary checkpoint with ``pruning_manifest.json``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import SerializeAsAny, field_validator, model_validator

from ..core.jobs import JOBS, Inputs, JobResult, ModelData
from ..core.methods import Methods
from ..core.spec import Count, Seqlen, Spec, SpecError, Text
from .methods import MANIFEST, METHODS, PruneRequest, check_method, check_target

__all__ = ["PruneSpec", "run_prune"]


class PruneSpec(PruneRequest, ModelData):
    """The ``prune`` job."""

    method_table: ClassVar[Methods] = METHODS

    job: Literal["prune"] = "prune"
    method: str
    """Pruning method: magnitude, wanda (weights), state, head, headdim (SSM units), blocks (whole blocks or units,
    greedily), or one registered from user code."""
    options: SerializeAsAny[Spec] = {}
    """The method's own options (structure, compare, components, exclude, sequential; score, mode, layers,
    bias_compensation; n_blocks, unit, layers)."""
    schedule: Text | None = None
    """Schedule YAML (from the schedule job) instead of a sparsity."""
    calib_windows: Count = 64
    """Calibration windows (random offsets of the train split)."""
    seqlen: Seqlen = 256
    """Tokens per calibration window."""
    streamed: bool = False
    """Read the checkpoint (a local directory) one block at a time and write the pruned one shard by shard, for
    checkpoints larger than memory (magnitude, wanda, state, head, headdim; the same result as in memory; weights
    saved as the source stores them)."""
    save_dtype: Literal["source", "float32", "bfloat16", "float16"] = "source"
    """Dtype of the saved weights: the source checkpoint's (default), or the one named."""
    out: Text
    """Directory for the pruned checkpoint."""

    _method = field_validator("method")(METHODS.spec_validators()[0])
    _options = field_validator("options", mode="before")(METHODS.spec_validators()[1])

    @model_validator(mode="after")
    def _target(self) -> PruneSpec:
        check_target(METHODS[self.method], self.options, self.sparsity, self.schedule is not None)
        return self


@JOBS.register("prune", options=PruneSpec, description="prune a model and save it with its manifest")
def run_prune(spec: PruneSpec, inputs: Inputs, *, overwrite: bool = False, show_progress: bool = True) -> JobResult:
    """Prune a copy of ``spec.model`` and save it to ``spec.out``; the :class:`PruneResult` is the job's value."""
    from ..allocation import Schedule
    from ..core.loading import DTYPES, checkpoint_dtype
    from ..data import calibration_windows
    from .api import prune
    from .save import check_out

    out = check_out(spec.out, spec.model, overwrite)  # before anything loads
    schedule = None
    if spec.schedule is not None:
        try:
            schedule = Schedule.from_yaml(Path(spec.schedule))
        except SpecError as e:
            raise e.within("schedule") if not e.field.startswith("schedule") else e from None
    if spec.streamed:
        return _streamed(spec, inputs, schedule, overwrite, show_progress)
    corpus, _ = inputs.load(spec)
    lm = inputs.fresh(spec.model, spec.dtype, allow_nonfinite=spec.allow_nonfinite)
    entry = check_method(spec.method, lm.arch)
    windows = None
    if entry.needs_calibration(spec.options):
        windows = calibration_windows(corpus, lm.tokenizer, spec.calib_windows, spec.seqlen, seed=spec.seed)
    result = prune(lm, spec.method, sparsity=spec.sparsity, schedule=schedule, windows=windows, seed=spec.seed,
                   batch_size=spec.batch_size, show_progress=show_progress, **spec.options.to_dict())  # fmt: skip
    stored = checkpoint_dtype(spec.model) if spec.save_dtype == "source" else DTYPES[spec.save_dtype]
    result.manifest.update(job="prune", spec=spec.to_dict(), data=spec.data,
                           saved_dtype=str(stored or lm.dtype).removeprefix("torch."))  # fmt: skip
    saved = result.save(out, overwrite=overwrite, dtype=stored)
    return JobResult(spec, {"checkpoint": saved, "manifest": saved / MANIFEST}, result)


def _streamed(spec: PruneSpec, inputs: Inputs, schedule, overwrite: bool, show_progress: bool) -> JobResult:
    """Prune ``spec.model`` one block at a time (``streamed``)."""
    from ..core.streamed import StreamedCheckpoint
    from ..data import calibration_windows
    from .streamed import STREAMED_METHODS, prune_streamed

    if spec.method not in STREAMED_METHODS:
        raise SpecError(f"{spec.method!r} does not run streamed; allowed: {', '.join(STREAMED_METHODS)}", "method")
    if schedule is not None or spec.save_dtype != "source":
        raise SpecError("streamed pruning takes one sparsity and saves the source's dtype", "streamed")
    corpus = inputs.corpus(spec.data, spec.text_field)
    try:
        ckpt = StreamedCheckpoint(spec.model)  # read once: its tokenizer draws the windows, then it is pruned
    except ValueError as e:
        raise SpecError(str(e), "model") from None
    windows = None
    if METHODS[spec.method].needs_calibration(spec.options):
        windows = calibration_windows(corpus, ckpt.lm.tokenizer, spec.calib_windows, spec.seqlen, seed=spec.seed)
    record = prune_streamed(ckpt, spec.method, spec.out, sparsity=spec.sparsity, windows=windows,
                            batch_size=spec.batch_size, overwrite=overwrite, show_progress=show_progress,
                            seed=spec.seed, manifest={"job": "prune", "spec": spec.to_dict(), "data": spec.data,
                                                      "seed": spec.seed},
                            **spec.options.to_dict())  # fmt: skip
    out = Path(spec.out).expanduser().absolute()
    return JobResult(spec, {"checkpoint": out, "manifest": out / MANIFEST}, record)

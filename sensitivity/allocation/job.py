"""The ``schedule`` job: allocate a global sparsity budget over (layer, component) and write it as YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import SerializeAsAny, field_validator, model_validator

from ..core.jobs import JOBS, Inputs, JobResult, ModelData
from ..core.methods import Methods
from ..core.output import OutputError, atomic_write_texts, check_file, starts_with, versions
from ..core.spec import Count, Seqlen, Spec, SpecError, Text
from .options import METHODS, RECIPE_HEADER, SCHEDULE_HEADER, AllocateOptions, needs_probes

__all__ = ["ScheduleSpec", "run_schedule"]


class ScheduleSpec(AllocateOptions, ModelData):
    """The ``schedule`` job."""

    method_table: ClassVar[Methods] = METHODS

    job: Literal["schedule"] = "schedule"
    method: str
    """Allocation method: uniform, depth, owl, sensitivity (or one registered from user code)."""
    options: SerializeAsAny[Spec] = {}
    """The method's own options (depth_spread; owl_m, owl_lambda; source, probe_method, metric)."""
    probes: Text | None = None
    """probes.csv or its directory (method sensitivity with source probes)."""
    calib_windows: Count = 32
    """Calibration windows for owl and fisher."""
    seqlen: Seqlen = 256
    """Tokens per calibration window."""
    recipe: Text | None = None
    """Also write an llm-compressor recipe YAML here."""
    out: Text
    """Schedule YAML to write."""

    _method = field_validator("method")(METHODS.spec_validators()[0])
    _options = field_validator("options", mode="before")(METHODS.spec_validators()[1])

    @model_validator(mode="after")
    def _inputs(self) -> ScheduleSpec:
        if needs_probes(self.method, self.options) and self.probes is None:
            raise SpecError(f"{self.method} with these options needs probes (a probes.csv or its directory)", "probes")
        return self


@JOBS.register("schedule", options=ScheduleSpec,
               description="allocate a global sparsity budget over layers and components; write YAML")  # fmt: skip
def run_schedule(spec: ScheduleSpec, inputs: Inputs, *, overwrite: bool = False, show_progress: bool = True
                 ) -> JobResult:  # fmt: skip
    """Allocate and write the schedule (its ``meta`` holds the job's spec); the schedule is the job's value."""
    if spec.recipe is not None and Path(spec.recipe).expanduser().resolve() == Path(spec.out).expanduser().resolve():
        raise SpecError(f"{spec.recipe} is also where the schedule goes; the schedule and its recipe must be two "
                        "files", "recipe")
    for field, path, header in (("out", spec.out, SCHEDULE_HEADER), ("recipe", spec.recipe, RECIPE_HEADER)):
        try:  # before anything loads
            if path is not None:
                check_file(Path(path), overwrite, starts_with(header))
        except OutputError as e:
            raise SpecError(str(e), field) from None
    from ..data import calibration_windows
    from .allocate import allocate

    corpus, lm = inputs.load(spec)
    windows = None
    if METHODS[spec.method].needs_calibration(spec.options):
        windows = calibration_windows(corpus, lm.tokenizer, spec.calib_windows, spec.seqlen, seed=spec.seed)
    common = {k: getattr(spec, k) for k in AllocateOptions.model_fields if k != "budget"}
    schedule = allocate(lm, spec.method, spec.budget, windows=windows, probes=spec.probes,
                        show_progress=show_progress, **common, **spec.options.to_dict())  # fmt: skip
    meta = {**schedule.meta, "model": lm.name, "data": spec.data, "seed": spec.seed, "versions": versions(),
            "spec": spec.to_dict()}  # fmt: skip
    if windows is not None:
        meta["calibration"] = windows.describe()
    schedule = dataclasses.replace(schedule, meta=meta)
    outputs = {"schedule": Path(spec.out), **({"recipe": Path(spec.recipe)} if spec.recipe else {})}
    texts = {outputs["schedule"]: schedule.to_yaml(), **({outputs["recipe"]: schedule.to_recipe()} if spec.recipe
                                                         else {})}  # fmt: skip
    atomic_write_texts(texts)  # both or neither
    return JobResult(spec, outputs, schedule)

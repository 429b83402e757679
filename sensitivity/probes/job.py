"""The ``probe`` job: the ablation sweep of one model, written to ``DIR/probes.csv`` and ``DIR/manifest.json``."""

from __future__ import annotations

from typing import ClassVar, Literal

from ..core.jobs import JOBS, Inputs, JobResult, ModelData
from ..core.methods import Methods
from ..core.output import OutputDir
from ..core.spec import Text
from .options import KINDS, ProbeOptions

__all__ = ["ProbeSpec", "run_probe"]


class ProbeSpec(ProbeOptions, ModelData):
    """The ``probe`` job."""

    name_tables: ClassVar[dict[str, Methods]] = {"kinds": KINDS}

    job: Literal["probe"] = "probe"
    out: Text
    """Output directory (rerunning into it resumes)."""


@JOBS.register("probe", options=ProbeSpec, description="ablate each component of each layer; write probes.csv")
def run_probe(spec: ProbeSpec, inputs: Inputs, *, overwrite: bool = False, show_progress: bool = True) -> JobResult:
    """Run the sweep ``spec`` asks for; the probes frame is the job's value."""
    from .sweep import probe

    out = OutputDir(spec.out, "probe", spec, overwrite=overwrite).check()
    if spec.streamed:  # the checkpoint is read one block at a time by the sweep
        corpus, model = inputs.corpus(spec.data, spec.text_field), spec.model
    else:
        corpus, model = inputs.load(spec)
    df = probe(model, corpus, options=spec, out=out, show_progress=show_progress)  # opens out once all is checked
    return JobResult(spec, {"probes": out.file("probes.csv"), "manifest": out.file("manifest.json")}, df)

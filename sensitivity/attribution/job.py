"""The ``attribute`` and ``agreement`` jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

from ..core.jobs import JOBS, Inputs, JobResult, JobSpec, ModelData
from ..core.methods import Methods
from ..core.objective import TaskOptions, objective_windows
from ..core.output import OutputDir, OutputError, atomic_write_text, check_file, has_manifest, versions, write_manifest
from ..core.spec import Count, Seqlen, SpecError, Text
from .options import METHODS, AttributeOptions, default_methods

__all__ = ["AgreementSpec", "AttributeSpec", "run_agreement", "run_attribute"]


class AttributeSpec(AttributeOptions, TaskOptions, ModelData):
    """The ``attribute`` job (a task objective attributes the log-likelihood of its answers, on its items)."""

    name_tables: ClassVar[dict[str, Methods]] = {"methods": METHODS}

    job: Literal["attribute"] = "attribute"
    windows: Count = 8
    """Calibration windows (random offsets of the train split, seeded)."""
    seqlen: Seqlen = 256
    """Tokens per window."""
    out: Text
    """Output directory for attribution.csv and manifest.json."""


@JOBS.register("attribute", options=AttributeSpec,
               description="activation, gradient and captum attribution; write attribution.csv")  # fmt: skip
def run_attribute(spec: AttributeSpec, inputs: Inputs, *, overwrite: bool = False, show_progress: bool = True
                  ) -> JobResult:  # fmt: skip
    """Score every (layer, component); the table is the job's value."""
    from ..data import calibration_windows
    from .api import attribute

    out = OutputDir(spec.out, "attribute", spec, overwrite=overwrite).check()
    corpus, lm = inputs.load(spec)
    windows = objective_windows(spec, lm.tokenizer) or calibration_windows(corpus, lm.tokenizer, spec.windows,
                                                                            spec.seqlen, seed=spec.seed)  # fmt: skip
    with out:
        started = time.perf_counter()
        out.manifest(status="running")  # a run killed from here on is this job's: rerunning it starts it again
        df = attribute(lm, windows, options=spec, show_progress=show_progress)
        out.write_text("attribution.csv", df.to_csv(index=False))
        out.manifest(status="complete", arch=lm.arch, windows=windows.describe(), seed=spec.seed,
                     methods=list(spec.methods or default_methods()),
                     timings={"total_s": time.perf_counter() - started})  # fmt: skip
    return JobResult(spec, {"attribution": out.file("attribution.csv")}, df)


class AgreementSpec(JobSpec):
    """The ``agreement`` job."""

    job: Literal["agreement"] = "agreement"
    probes: Text
    """probes.csv or the directory holding it."""
    attribution: Text
    """attribution.csv or the directory holding it."""
    metric: Literal["delta_nll", "kl", "ppl_ratio"] = "delta_nll"
    """Probe damage metric to rank by."""
    out: Text | None = None
    """CSV to write (default: agreement.csv next to the probes); its manifest goes next to it."""


@JOBS.register("agreement", options=AgreementSpec,
               description="rank correlation of each attribution with each ablation's damage")  # fmt: skip
def run_agreement(spec: AgreementSpec, inputs: Inputs, *, overwrite: bool = False, show_progress: bool = True
                  ) -> JobResult:  # fmt: skip
    """Rank-correlate the two tables; the agreement table is the job's value. Writes the CSV and, next to it,
    ``<name>.manifest.json`` (atomically; the CSV is replaced whole)."""
    from ..core.tables import PROBE_COLUMNS, read_table
    from .agreement import ATTRIBUTION_COLUMNS, agreement

    probes, probes_file = read_table(spec.probes, "probes.csv", "probes", PROBE_COLUMNS)
    attribution, _ = read_table(spec.attribution, "attribution.csv", "attribution", ATTRIBUTION_COLUMNS)
    out = Path(spec.out) if spec.out else probes_file.parent / "agreement.csv"
    manifest = out.with_name(f"{out.stem}.manifest.json")
    try:
        check_file(out, overwrite, has_manifest(manifest, "agreement"))
    except OutputError as e:
        raise SpecError(str(e), "out") from None
    table = agreement(probes, attribution, probe_metric=spec.metric)
    atomic_write_text(out, table.to_csv(index=False))
    write_manifest(manifest, {"job": "agreement", "spec": spec.to_dict(), "status": "complete",
                              "versions": versions()})  # fmt: skip
    return JobResult(spec, {"agreement": out, "manifest": manifest}, table)

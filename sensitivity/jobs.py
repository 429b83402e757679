"""Run any job from its spec: ``evaluate``, ``probe``, ``attribute``, ``agreement``, ``schedule``, ``prune``,
``explain``, ``report``, ``grid`` (and jobs registered from user code).

Examples:
    >>> from sensitivity.jobs import load_spec, run
    >>> spec = load_spec("job.yaml")             # a spec file, or a manifest.json a job wrote
    >>> result = run(spec.replace(out="runs/again"))
    >>> result.outputs
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .allocation import job as _schedule  # noqa: F401 (each job module registers its job)
from .attribution import job as _attribute  # noqa: F401
from .core.execution import Execution
from .core.jobs import JOBS, Inputs, JobResult, JobSpec
from .core.spec import SpecError, load_yaml
from .eval import job as _evaluate  # noqa: F401
from .explain import job as _explain  # noqa: F401
from .probes import job as _probe  # noqa: F401
from .pruning import job as _prune  # noqa: F401
from .report import job as _report  # noqa: F401

__all__ = ["JOBS", "JobResult", "JobSpec", "load_plugins", "load_spec", "run", "spec_of"]

PLUGINS_ENV = "SENSITIVITY_PLUGINS"
"""Environment variable naming modules to import before a command runs (comma-separated), so that the methods,
kinds and allocators they register appear in the command line; packages can instead declare an entry point in the
``sensitivity.plugins`` group."""


def load_plugins() -> list[str]:
    """Import the plugin modules named by ``$SENSITIVITY_PLUGINS`` and the ``sensitivity.plugins`` entry points.

    The working directory is searched first, as ``python -m`` does, so a ``my_methods.py`` beside the user's data is
    found without setting ``PYTHONPATH``.

    Returns:
        The names imported.

    Raises:
        SpecError: For a module that cannot be imported (naming it).
    """
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    loaded = []
    if names and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise SpecError(f"cannot import plugin module {name!r} named in ${PLUGINS_ENV} ({e})") from None
        loaded.append(name)
    for point in entry_points(group="sensitivity.plugins"):
        point.load()
        loaded.append(point.value)
    return loaded


def spec_of(data: dict) -> JobSpec:
    """The job spec a mapping describes (its ``job`` names which)."""
    if not isinstance(data, dict) or "job" not in data:
        raise SpecError(f"a job spec is a mapping with a 'job' key; allowed jobs: {', '.join(JOBS)}")
    return JOBS[data["job"]].options.from_dict(data)


def load_spec(source: str | os.PathLike) -> JobSpec:
    """A job spec from a YAML/JSON spec file, a ``manifest.json`` (or ``pruning_manifest.json``) a job wrote, or a
    schedule YAML (its ``meta.spec``).

    Raises:
        SpecError: For a missing or malformed file, or one that holds no job spec.
    """
    data = load_yaml(Path(source) if not isinstance(source, Path) else source)
    if data is None:
        raise SpecError(f"{str(source)!r} is empty; allowed: a job spec (a mapping with a 'job' key)")
    if not isinstance(data, dict):
        raise SpecError(f"{str(source)!r} holds a {type(data).__name__}, not a job spec; allowed: a mapping with a "
                        f"'job' key naming one of {', '.join(JOBS)}")  # fmt: skip
    if isinstance(data, dict) and isinstance(data.get("spec"), dict):  # a manifest
        data = data["spec"]
    elif isinstance(data, dict) and isinstance(data.get("schedule"), dict):  # a schedule YAML
        data = (data["schedule"].get("meta") or {}).get("spec")
        if data is None:
            raise SpecError(f"{source} is a schedule without the spec that made it (meta.spec)")
    return spec_of(data)


def run(spec: JobSpec, *, overwrite: bool = False, show_progress: bool = True, inputs: Inputs | None = None
        ) -> JobResult:  # fmt: skip
    """Run the job ``spec`` describes.

    Args:
        spec: A job spec (:func:`load_spec`, or a spec class such as ``sensitivity.probes.job.ProbeSpec``).
        overwrite: Replace an output that holds another run.
        show_progress: Show tqdm bars.
        inputs: Loaded models and corpora to reuse across jobs.

    Returns:
        A :class:`~sensitivity.core.jobs.JobResult`: the spec, the files written and the job's value.
    """
    from .core.distributed import cluster
    from .core.loading import resolve_device

    inputs = inputs or Inputs()
    if (device := getattr(spec, "device", None)) is not None:
        try:
            resolve_device(device)
        except ValueError as e:
            raise SpecError(str(e), "device") from None
        inputs.device = device
    with cluster(spec) if isinstance(spec, Execution) else contextlib.nullcontext():  # workers it can place
        return JOBS[spec.job].fn(spec, inputs, overwrite=overwrite, show_progress=show_progress)

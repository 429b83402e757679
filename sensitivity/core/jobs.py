"""Jobs: one validated, serialisable spec per job, and the table that runs them.

Every stage defines its job next to its code (``probes/job.py``, ``pruning/job.py``...): a :class:`JobSpec`
subclass (the stage's options plus what to load and where to write) and a function that runs it, registered in
:data:`JOBS`. :mod:`sensitivity.jobs` runs any spec; the command line builds specs from flags and runs them there.

A spec serialises to YAML and JSON with ``job`` first; every output's manifest stores the full spec it ran, so
``sensitivity run DIR/manifest.json`` runs it again.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..data.corpus import DEFAULT_CORPUS
from .methods import Methods
from .names import DEFAULT_MODEL, DEVICES, DTYPE_NAMES
from .spec import Spec, SpecError, Text

if TYPE_CHECKING:
    from ..data import Corpus
    from .loading import LoadedModel

__all__ = ["JOBS", "Inputs", "JobResult", "JobSpec", "ModelData"]

logger = logging.getLogger(__name__)

JOBS = Methods("job")
"""Job name -> its spec class (``options``) and runner (``fn(spec, inputs, overwrite, show_progress)``)."""


class JobSpec(Spec):
    """Base of every job spec; subclasses set ``job`` to a ``Literal`` of their name.

    ``method_table`` is the table a ``method`` field names an entry of (whose options the ``options`` field holds);
    ``name_tables`` maps fields holding names of table entries (``kinds``, ``methods``) to their tables. Front ends
    read both (the command line lists the names and every method's options as flags).

    Attributes:
        method_table: The table the ``method`` field names an entry of; None for jobs without a ``method`` field.
        name_tables: Field holding names of table entries -> that table, e.g. ``{"kinds": KINDS}``.
        job: The job's name, its key in :data:`JOBS`.
    """

    method_table: ClassVar[Methods | None] = None
    name_tables: ClassVar[dict[str, Methods]] = {}

    job: str

    def to_dict(self) -> dict:
        """Plain data with ``job`` first."""
        data = super().to_dict()
        return {"job": data.pop("job"), **data}


class ModelData(JobSpec):
    """A job on one model and one corpus."""

    model: Text = DEFAULT_MODEL
    """Zoo model (default, default-mamba1, default-hybrid, recall), checkpoint directory, HF hub id, or a built-in tiny
    model: tiny:mamba|mamba2|falcon-mamba|bamba|granitemoehybrid|nemotron-h|jamba|falcon-h1|zamba2."""
    dtype: Literal[DTYPE_NAMES] = "float32"  # type: ignore[valid-type]
    """Weights dtype."""
    device: Literal[DEVICES] = "cpu"  # type: ignore[valid-type]
    """Where the model runs: cpu, cuda, or auto (CUDA when there is a GPU). On CUDA the forwards without hooks
    (perplexity) use the mamba-ssm and causal-conv1d kernels when they are installed (the [cuda] extra)."""
    data: Text = DEFAULT_CORPUS
    """The built-in corpus austen-kjv (default), 'sample', a text/JSONL file, a directory, or hf:NAME[:CONFIG] (a local
    Hugging Face dataset)."""
    text_field: str = "text"
    """JSONL/HF field holding the text."""
    allow_nonfinite: bool = False
    """Load a model whose weights hold NaN or infinity (refused by default, naming the tensors)."""


@dataclass
class JobResult:
    """What a job produced: its spec, the files it wrote and an in-memory value for the caller to show.

    Attributes:
        spec: The spec the job ran.
        outputs: Name -> path of each file or directory it wrote.
        value: What the job computed (a table, a report...), for the caller to show; None when there is nothing.
    """

    spec: JobSpec
    outputs: dict[str, Path] = field(default_factory=dict)
    value: Any = None


class Inputs:
    """Loads what jobs read, once: corpora and models by name (a report or grid runs many jobs on one model).

    ``model(spec)`` returns the cached model; ``fresh(spec)`` a deep copy for jobs that modify it (pruning).
    """

    def __init__(self, device: str = "cpu") -> None:
        self._corpora: dict[tuple[str, str], Corpus] = {}
        self._models: dict[tuple[str, str, str], LoadedModel] = {}
        self.device = device
        """Where models load (a :data:`~sensitivity.core.loading.DEVICES` name); jobs set it from their spec."""

    def corpus(self, data: str, text_field: str = "text") -> Corpus:
        """The corpus ``data`` (loaded once, see :func:`~sensitivity.load_corpus`), its text in ``text_field``."""
        key = (data, text_field)
        if key not in self._corpora:
            from ..data import load_corpus

            self._corpora[key] = load_corpus(data, text_field=text_field)
        return self._corpora[key]

    def model(self, name: str, dtype: str = "float32", *, tokenizer: bool = True, allow_nonfinite: bool = False,
              field: str = "model") -> LoadedModel:  # fmt: skip
        """The model ``name`` on :attr:`device` (loaded once); errors name the spec ``field`` that gave it."""
        key = (name, dtype, self.device)
        if key not in self._models:
            from .loading import load_model

            try:
                self._models[key] = load_model(name, dtype=dtype, allow_nonfinite=allow_nonfinite, device=self.device)
            except SpecError:
                raise
            except ValueError as e:
                raise SpecError(str(e), field) from None
        lm = self._models[key]
        if tokenizer and lm.tokenizer is None:
            raise SpecError(f"{name!r} has no tokenizer; save one next to its config", field)
        return lm

    def add(self, name: str, lm: LoadedModel, dtype: str = "float32") -> None:
        """Use ``lm`` wherever a job asks for the model ``name`` (a Ray worker's own copy of it)."""
        self._models[(name, dtype, self.device)] = lm

    def fresh(self, name: str, dtype: str = "float32", *, allow_nonfinite: bool = False) -> LoadedModel:
        """A deep copy of the model :meth:`model` returns, for jobs that modify it (pruning)."""
        from .loading import LoadedModel

        lm = self.model(name, dtype, allow_nonfinite=allow_nonfinite)
        return LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.registry, lm.name)

    def load(self, spec: ModelData) -> tuple[Corpus, LoadedModel]:
        """The spec's corpus (first: bad data fails before any model loads) and model."""
        return self.corpus(spec.data, spec.text_field), self.model(spec.model, spec.dtype,
                                                                   allow_nonfinite=spec.allow_nonfinite)

"""sensitivity: where a state-space LM can be pruned, and why some pruning methods collapse it.

Stages, one subpackage each: ``models`` (loading, component registry, instrumented forward) -> ``data`` (corpora
and token windows) -> ``probes`` (ablation damage per layer and component) and ``attribution`` (activation,
gradient and captum scores; agreement with the probes) -> ``allocation`` (sparsity schedules) -> ``pruning``
(magnitude, WANDA, state, head, head-dim) -> ``eval`` (perplexity, KL). ``zoo`` holds the trained
models shipped with the package, and ``data`` the corpus they were trained on.
"""

from .allocation import Schedule, allocate
from .attribution import agreement, attribute
from .core import (
    Component,
    LoadedModel,
    Registry,
    build_registry,
    capture,
    hooks,
    instrument,
    load_model,
    uninstrument,
)
from .data import Corpus, Windows, byte_tokenizer, calibration_windows, eval_windows, load_corpus
from .eval import KLDivergence, Perplexity, kl_divergence, perplexity
from .probes import ProbeOptions, ablation_table, probe
from .pruning import prune, sparsity_report
from .zoo import list_models, zoo_path

__version__ = "0.1.0"

__all__ = [
    "Component", "Corpus", "KLDivergence", "LoadedModel", "Perplexity", "ProbeOptions", "Registry", "Schedule",
    "Windows", "ablation_table", "agreement", "allocate", "attribute", "build_registry", "byte_tokenizer",
    "calibration_windows", "capture", "eval_windows", "hooks", "instrument", "kl_divergence", "list_models",
    "load_corpus", "load_model", "perplexity", "probe", "prune", "sparsity_report", "uninstrument", "zoo_path",
]

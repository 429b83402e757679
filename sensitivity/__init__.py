"""sensitivity: where a state-space LM can be pruned, and why some pruning methods collapse it.

``core`` is the layer every stage sits on (loading, the component registry, the instrumented forward, the layer
runner, statistics, pure scores, specs, method tables, the output layer); ``data`` holds corpora and token
windows. Stages, one subpackage each: ``eval`` (perplexity, KL) -> ``probes`` (ablation damage per layer and
component) and ``attribution`` (activation, gradient and captum scores; agreement with the probes) ->
``allocation`` (sparsity schedules) -> ``pruning`` (magnitude, WANDA, state, head, head-dim) -> ``explain`` (why a
pruned model degrades) -> ``report``. Every stage defines its job (a validated spec and a runner);
:mod:`sensitivity.jobs` runs any of them. ``zoo`` holds the trained models shipped with the package.
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

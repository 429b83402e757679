"""sensitivity: where a state-space LM can be pruned, and why some pruning methods collapse it.

``core`` is the layer every stage sits on (loading, the component registry, the instrumented forward, the layer
runner, statistics, pure scores, specs, method tables, the output layer); ``data`` holds corpora and token
windows. Stages, one subpackage each: ``eval`` (perplexity, KL) -> ``probes`` (ablation damage per layer and
component) and ``attribution`` (activation, gradient and captum scores; agreement with the probes) ->
``allocation`` (sparsity schedules) -> ``pruning`` (magnitude, WANDA, state, head, head-dim) -> ``explain`` (why a
pruned model degrades) -> ``report``. Every stage defines its options and method table (``options.py``) and its
job (a validated spec and a runner, ``job.py``), all importable without torch so that a bad spec is refused before
any heavy import; :mod:`sensitivity.jobs` runs any of them. ``zoo`` holds the trained models shipped with the
package. Names are exported lazily: ``import sensitivity`` loads nothing heavy until a name is used.
"""

from ._lazy import exports

__version__ = "0.1.0"

__all__ = [
    "Component", "Corpus", "KLDivergence", "LoadedModel", "Perplexity", "ProbeOptions", "Registry", "Schedule",
    "Windows", "ablation_table", "agreement", "allocate", "attribute", "build_registry", "byte_tokenizer",
    "calibration_windows", "capture", "eval_windows", "hooks", "instrument", "kl_divergence", "list_models",
    "load_corpus", "load_model", "perplexity", "probe", "prune", "sparsity_report", "uninstrument", "zoo_path",
]

_EXPORTS = {
    "Schedule": ".allocation",
    "allocate": ".allocation",
    "agreement": ".attribution",
    "attribute": ".attribution",
    "Component": ".core",
    "LoadedModel": ".core",
    "Registry": ".core",
    "build_registry": ".core",
    "capture": ".core",
    "hooks": ".core",
    "instrument": ".core",
    "load_model": ".core",
    "uninstrument": ".core",
    "Corpus": ".data",
    "Windows": ".data",
    "byte_tokenizer": ".data",
    "calibration_windows": ".data",
    "eval_windows": ".data",
    "load_corpus": ".data",
    "KLDivergence": ".eval",
    "Perplexity": ".eval",
    "kl_divergence": ".eval",
    "perplexity": ".eval",
    "ProbeOptions": ".probes",
    "ablation_table": ".probes",
    "probe": ".probes",
    "prune": ".pruning",
    "sparsity_report": ".pruning",
    "list_models": ".zoo",
    "zoo_path": ".zoo",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)

"""The core layer every stage sits on: loading and the zoo index, the component registry, the instrumented forward,
hooks and scans, the layer runner, activation and gradient statistics, pure scores and masks, validated specs,
method tables, job specs and the output layer."""

from .hooks import capture, hook_name, hooks
from .instrumented import GroupedRMSNormGated, HookPoint, instrument, is_instrumented, uninstrument
from .jobs import JOBS, Inputs, JobResult, JobSpec, ModelData
from .loading import DEFAULT_MODEL, TINY_MODELS, LoadedModel, load_model, tiny_config, unwrap
from .methods import Method, Methods
from .output import OutputDir, OutputError, atomic_write_text, publish_dir
from .registry import ARCHITECTURES, DEFAULT_EXCLUDE, Component, HookSpec, Registry, TensorSlice, build_registry
from .runner import LayerRunner
from .scan import selective_scan_chunked, selective_scan_ref, ssd_scan
from .spec import Spec, SpecError

__all__ = [
    "ARCHITECTURES", "DEFAULT_EXCLUDE", "DEFAULT_MODEL", "JOBS", "TINY_MODELS", "Component", "GroupedRMSNormGated",
    "HookPoint", "HookSpec", "Inputs", "JobResult", "JobSpec", "LayerRunner", "LoadedModel", "Method", "Methods",
    "ModelData", "OutputDir", "OutputError", "Registry", "Spec", "SpecError", "TensorSlice", "atomic_write_text",
    "build_registry", "capture", "hook_name", "hooks", "instrument", "is_instrumented", "load_model", "publish_dir",
    "selective_scan_chunked", "selective_scan_ref", "ssd_scan", "tiny_config", "uninstrument", "unwrap",
]

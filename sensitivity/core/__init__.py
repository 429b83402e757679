"""Models: loading, the component registry, the instrumented forward, hooks and scans."""

from .hooks import capture, hook_name, hooks
from .instrumented import HookPoint, instrument, is_instrumented, uninstrument
from .loading import DEFAULT_MODEL, TINY_MODELS, LoadedModel, load_model, tiny_config, unwrap
from .registry import ARCHITECTURES, Component, HookSpec, Registry, TensorSlice, build_registry
from .scan import selective_scan_chunked, selective_scan_ref, ssd_scan

__all__ = [
    "ARCHITECTURES", "DEFAULT_MODEL", "TINY_MODELS", "Component", "HookPoint", "HookSpec", "LoadedModel", "Registry",
    "TensorSlice", "build_registry", "capture", "hook_name", "hooks", "instrument", "is_instrumented", "load_model",
    "selective_scan_chunked", "selective_scan_ref", "ssd_scan", "tiny_config", "uninstrument", "unwrap",
]

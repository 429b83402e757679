"""The non-public surfaces of other libraries this package still uses, why, and a check that they are there.

transformers regenerates its ``modeling_*`` files between minor releases (5.25 renamed Mamba-2's gated norm class
and rewrote every SSM family from modular sources), so the package imports no HF mixer or norm class by name: the
instrumented forward finds them on the model, where the registry says each layer holds them, and derives its
subclasses from the classes it finds (:mod:`sensitivity.core.instrumented`). What is left below has no public
equivalent. ``tests/core/test_surfaces.py`` fails when a new non-public import or attribute appears in the package
that this table does not list (or an entry here is no longer used), and :func:`missing_surfaces` is part of the
compatibility subset ``make test-latest`` runs against new releases.

Not listed, because they are module attributes rather than private names: the HF mixer attributes the instrumented
forward reads (``time_step_limit``, ``chunk_size``, ``intermediate_size``, ``num_heads``, ``head_dim``,
``n_groups``, ``ssm_state_size``, ``act``, Falcon-H1's ``ssm_in_multiplier``, ``mup_vector``, ``mamba_rms_norm`` and
its norm's ``norm_before_gate``, the norm's ``variance_epsilon``). It reads them off the mixer, not the config, so
it follows whatever the installed transformers does (5.25 changed Nemotron-H's ``time_step_limit``); the
forward-equality tests on every family check them under each tested version.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["PRIVATE_SURFACES", "Surface", "missing_surfaces"]


@dataclass(frozen=True)
class Surface:
    """One non-public name of another library.

    Attributes:
        name: ``module:attribute`` for an imported name, ``module:Class.attribute`` for an attribute read off an
            object of that class.
        used_in: The package module using it.
        why: Why there is no public way.
    """

    name: str
    used_in: str
    why: str

    @property
    def distribution(self) -> str:
        """The PyPI distribution that owns it."""
        top = self.name.split(".")[0].split(":")[0]
        return {"lm_eval": "lm-eval"}.get(top, top)


_CONVERSIONS = ("streaming a checkpoint block by block must rename and fuse tensors exactly as from_pretrained and "
                "save_pretrained do (Granite's and Jamba's per-expert tensors, Nemotron-H's backbone prefix); "
                "transformers exposes these conversions only here")
_MODULE = ("hook points are registered and removed on HF modules in place (instrument, uninstrument) and streamed "
           "blocks swap parameters on and off the meta device; torch offers no public mutation for these")

PRIVATE_SURFACES: tuple[Surface, ...] = (
    Surface("transformers.masking_utils:create_causal_mask", "sensitivity.core.runner",
            "a block run alone needs the causal mask its attention implementation expects (None under SDPA, an "
            "additive 4-D mask under eager, a BlockMask under flex); this is the dispatch the models' own forwards "
            "call, and a copy would miss a new implementation"),
    Surface("transformers.conversion_mapping:get_model_conversion_mapping", "sensitivity.core.streamed", _CONVERSIONS),
    *(Surface(f"transformers.core_model_loading:{name}", "sensitivity.core.streamed", _CONVERSIONS)
      for name in ("PrefixChange", "WeightConverter", "WeightRenaming", "apply_converters", "apply_renamings",
                   "dot_natural_key", "revert_weight_conversion")),
    Surface("transformers:PretrainedConfig._attn_implementation", "sensitivity.pruning._config",
            "a config rebuilt with fewer heads or layers keeps the attention implementation the model was loaded "
            "with; it is not part of to_dict() and has no public setter on a config"),
    Surface("lm_eval.tasks._yaml_loader:load_yaml", "sensitivity.eval.tasks",
            "a task YAML is validated and its data paths resolved exactly as lm-eval reads it (include and "
            "!function resolved) before lm-eval runs; lm-eval 0.4 exposes no public loader"),
    *(Surface(f"torch.nn:Module.{name}", "sensitivity.core.instrumented", _MODULE)
      for name in ("_modules", "_forward_hooks", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")),
    Surface("torch.nn:Module._parameters", "sensitivity.core.streamed", _MODULE),
    Surface("torch.nn:Module._buffers", "sensitivity.pruning.structured", _MODULE),
)  # fmt: skip
"""Every non-public name of another library the package uses (checked by ``tests/core/test_surfaces.py``)."""


def missing_surfaces() -> list[str]:
    """The listed surfaces the installed libraries no longer have, each as ``"name (distribution version)"``.

    Attributes read off instances (``Module._modules``) are looked up on a fresh instance of the class.
    """
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for surface in PRIVATE_SURFACES:
        module_name, _, attr = surface.name.partition(":")
        try:
            owner = importlib.import_module(module_name)
            *classes, last = attr.split(".")
            for cls in classes:
                owner = getattr(owner, cls)
            if classes:
                owner = _instance(owner)
            getattr(owner, last)
        except (ImportError, AttributeError):
            try:
                where = f"{surface.distribution} {version(surface.distribution)}"
            except PackageNotFoundError:
                where = f"{surface.distribution} not installed"
            missing.append(f"{surface.name} ({where})")
    return missing


def _instance(cls: type) -> object:
    """A default instance of ``cls`` (an ``nn.Module`` or a HF config) to read instance attributes from."""
    return cls()

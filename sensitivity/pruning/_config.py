"""Rewriting a HF config the way ``from_pretrained`` will read it back."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

__all__ = ["derived_fields", "rewrite_config"]


def derived_fields(config: PretrainedConfig) -> set[str]:
    """The keys of ``config.to_dict()`` its ``__post_init__`` computes from the declared fields (Zamba2's
    ``hybrid_layer_ids``, ``mamba_headdim``, ``attention_head_dim``...): not declared, and recomputed to the same
    value from the declared ones."""
    values = config.to_dict()
    if not dataclasses.is_dataclass(config):
        return set()
    declared = {f.name for f in dataclasses.fields(config)}
    again = type(config).from_dict({k: v for k, v in values.items() if k in declared}).to_dict()
    return {k for k, v in values.items() if k not in declared and k in again and again[k] == v}


def rewrite_config(config: PretrainedConfig, changes: dict) -> PretrainedConfig:
    """A new config of ``config``'s class with ``changes`` and every derived field recomputed from them (a config
    built from ``to_dict()`` keeps stale derived values, which ``from_dict`` sets after ``__post_init__``).

    Raises:
        Exception: Whatever the config class raises for values it refuses (strict HF configs raise
            ``huggingface_hub`` validation errors).

    Examples:
        >>> rewrite_config(tiny_config("zamba2"), {"layers_block_type": ["hybrid", "mamba"]}).hybrid_layer_ids
        [0]
    """
    derived = derived_fields(config)
    values = {k: v for k, v in config.to_dict().items() if k not in derived}
    new = type(config).from_dict({**values, **changes})
    new._attn_implementation = config._attn_implementation
    return new

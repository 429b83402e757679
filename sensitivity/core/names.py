"""The names specs are validated against, importable without torch: devices, dtypes, the default model, the
architectures, unit kinds and the components kept dense by default. :mod:`~sensitivity.core.loading` and
:mod:`~sensitivity.core.registry` re-export them with what they mean there."""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "DEFAULT_EXCLUDE", "DEFAULT_MODEL", "DEVICES", "DTYPE_NAMES", "ENGINES", "MAMBA2_ARCHS",
           "OBJECTIVES", "UNIT_KINDS"]

DEVICES = ("cpu", "cuda", "auto")
"""Where a job puts its model: the CPU, the (first visible) CUDA GPU, or auto (CUDA when there is one)."""
DEFAULT_MODEL = "default"
"""The embedded Mamba-2 of :mod:`sensitivity.zoo`, used when no model is named."""
DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Weight dtypes a model loads in (:data:`sensitivity.core.loading.DTYPES` maps them to torch dtypes)."""
ARCHITECTURES = ("mamba", "mamba2", "falcon_mamba", "bamba", "granitemoehybrid", "nemotron_h", "jamba", "falcon_h1",
                 "zamba2")  # fmt: skip
"""HF ``model_type`` values the registry maps."""
MAMBA2_ARCHS = ("mamba2", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "zamba2")
"""The architectures whose SSM mixers are Mamba-2 (heads: ``Registry.ssm_style == "mamba2"``; a test checks it
against the registry), where head pruning applies."""
UNIT_KINDS = ("ssm", "attention", "mlp", "moe")
"""Kinds of unit a block may hold: an SSM mixer, an attention mixer, an MLP or a mixture of experts."""
DEFAULT_EXCLUDE = ("conv1d",)
"""Components kept dense unless asked for: the depthwise convolution has only K taps per channel."""
OBJECTIVES = ("loss", "logprob")
"""What a gradient differentiates: the mean next-token loss per window, or the summed target log-probabilities."""
ENGINES = ("auto", "builtin", "lm-eval")
"""Who scores an evaluation's tasks: auto (the toolkit its built-in ones, lm-eval the rest), builtin, lm-eval."""

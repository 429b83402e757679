"""Load a Mamba, Mamba2 or FalconMamba causal LM (local directory, hub id, or a built-in tiny model)."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    FalconMambaConfig,
    Mamba2Config,
    MambaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from .instrumented import hf_norm_is_grouped, is_instrumented
from .instrumented import instrument as _instrument
from .registry import ARCHITECTURES, Registry, build_registry
from .zoo import ZOO_MODELS, zoo_path

__all__ = ["DEFAULT_MODEL", "DTYPES", "TINY_MODELS", "LoadedModel", "as_loaded", "load_model", "tiny_config"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
"""The embedded Mamba-2 of :mod:`sensitivity.zoo`, used when no model is named."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_SEED = 0
_TINY_VOCAB = 257  # the byte tokenizer: 256 bytes + <|endoftext|>
_TINY_COMMON = dict(vocab_size=_TINY_VOCAB, num_hidden_layers=2, hidden_size=64, state_size=8, conv_kernel=4,
                    bos_token_id=256, eos_token_id=256, pad_token_id=256, tie_word_embeddings=True, use_cache=False)


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """Config of a tiny random model of ``arch`` (``mamba``, ``mamba2`` or ``falcon_mamba``) for tests and demos.

    Mamba-2 defaults to 8 heads of 16 channels with 2 B/C groups, so group and head slicing are exercised.
    """
    if arch == "mamba":
        return MambaConfig(**{**_TINY_COMMON, "expand": 2, "time_step_rank": 8, **overrides})
    if arch == "falcon_mamba":
        return FalconMambaConfig(**{**_TINY_COMMON, "expand": 2, "time_step_rank": 8, **overrides})
    if arch == "mamba2":
        base = {**_TINY_COMMON, "state_size": 16, "expand": 2, "num_heads": 8, "head_dim": 16, "n_groups": 2,
                "chunk_size": 32}
        return Mamba2Config(**{**base, **overrides})
    raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")


TINY_MODELS = {"tiny:mamba": "mamba", "tiny:mamba2": "mamba2", "tiny:falcon-mamba": "falcon_mamba"}


@dataclass
class LoadedModel:
    """A model ready for analysis.

    Attributes:
        model: The HF ``*ForCausalLM`` in eval mode (instrumented unless loaded with ``instrument=False``).
        tokenizer: Its tokenizer, or None when the checkpoint ships none.
        registry: Component registry of its architecture.
        name: What the user asked for (path, hub id or built-in name).
    """

    model: PreTrainedModel
    tokenizer: object | None
    registry: Registry
    name: str

    @property
    def arch(self) -> str:
        return self.registry.arch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_params(self) -> int:
        """Unique parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def _check_arch(config: PretrainedConfig, name: str) -> None:
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        raise ValueError(
            f"{name!r} is a {getattr(config, 'model_type', 'unknown')!r} model; allowed model types: "
            f"{', '.join(ARCHITECTURES)}"
        )


def _from_pretrained(name: str, dtype: torch.dtype, revision: str | None) -> tuple[PreTrainedModel, object | None]:
    path = Path(name).expanduser()
    is_local = path.is_dir()
    if not is_local and (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ValueError(f"model path {name!r} is not a directory with a config.json")
    if is_local and not (path / "config.json").is_file():
        raise ValueError(f"model directory {name!r} has no config.json")
    source = str(path) if is_local else name
    offline = is_local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:  # the local cache first; the hub only when the cache lacks it and the hub answers
        config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=True)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:160]
        if offline or not _hub_reachable():
            raise ValueError(
                f"could not load model {name!r}: it is not a local directory, not in the Hugging Face cache, and "
                f"the hub is {'disabled (HF_HUB_OFFLINE)' if offline else 'not reachable'} ({reason})"
            ) from None
        try:
            config = AutoConfig.from_pretrained(source, revision=revision)
        except (OSError, ValueError) as e2:
            raise ValueError(f"could not load model {name!r} from the hub ({str(e2).splitlines()[0][:160]})") from None
    else:
        offline = True
    _check_arch(config, name)
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, local_files_only=offline)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, local_files_only=offline)
    except (OSError, ValueError, TypeError):
        logger.info("no tokenizer found for %s", name)
        tokenizer = None
    return model, tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF endpoint accepts a TCP connection (avoids minutes of retries when offline)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _tiny(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    from ..data import byte_tokenizer

    config = tiny_config(TINY_MODELS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype), byte_tokenizer()


def _warn_ungrouped_norm(config: PretrainedConfig, instrumented: bool) -> None:
    """Say when the installed transformers would compute a grouped Mamba-2 model's gated norm differently."""
    groups = getattr(config, "n_groups", 1)
    if config.model_type != "mamba2" or groups <= 1 or hf_norm_is_grouped():
        return
    import transformers

    how = ("sensitivity's instrumented forward normalises per group as Mamba-2 does, but plain transformers "
           "forwards of this model give other numbers" if instrumented else
           "this model was loaded with instrument=False, so its forward gives other numbers than Mamba-2's")
    logger.warning("transformers %s normalises Mamba-2's gated RMS norm over all channels instead of per group "
                   "(n_groups=%d; fixed in transformers 5.23): %s", transformers.__version__, groups, how)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    instrument: bool = True,
    revision: str | None = None,
) -> LoadedModel:
    """Load a state-space LM with its tokenizer and component registry.

    Args:
        name_or_path: A zoo model shipped with the package (``default`` = the trained Mamba-2, ``default-mamba1``;
            see ``sensitivity.zoo``), a local checkpoint directory, a HF hub id (used when the hub is reachable or
            the files are cached; set ``HF_HUB_OFFLINE=1`` to use the cache only), or a built-in tiny random model
            (``tiny:mamba``, ``tiny:mamba2``, ``tiny:falcon-mamba``). None loads ``DEFAULT_MODEL``.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (or the torch dtype).
        device: Where to put the model.
        instrument: Replace the mixer forwards with the instrumented, hookable ones (needed by probes).
        revision: Hub revision.

    Returns:
        A :class:`LoadedModel` in eval mode.

    Raises:
        ValueError: Unknown name, unreadable path, unsupported architecture or dtype, unreachable hub.

    Example:
        >>> lm = load_model("tiny:mamba2")
        >>> lm.registry.component_names
        ('z', 'x', 'B', 'C', 'dt', 'conv1d', 'A_log', 'D', 'norm', 'out_proj')
    """
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    elif dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; allowed: {', '.join(DTYPES)}")
    if name.startswith("tiny:"):
        if name not in TINY_MODELS:
            raise ValueError(f"unknown built-in model {name!r}; allowed: {', '.join(TINY_MODELS)}")
        model, tokenizer = _tiny(name, dtype)
    elif name in ZOO_MODELS:
        model, tokenizer = _from_pretrained(str(zoo_path(name)), dtype, None)
    else:
        model, tokenizer = _from_pretrained(name, dtype, revision)
    model = model.to(device).eval()
    _warn_ungrouped_norm(model.config, instrument)
    if instrument:
        _instrument(model)
    logger.info("loaded %s (%s, %d layers)", name, model.config.model_type, model.config.num_hidden_layers)
    return LoadedModel(model=model, tokenizer=tokenizer, registry=build_registry(model.config), name=name)


def as_loaded(model: LoadedModel | nn.Module, *, instrumented: bool = False) -> LoadedModel:
    """A ``LoadedModel`` as it is, or a bare HF Mamba causal LM wrapped in one (no tokenizer, its registry).

    Raises:
        ValueError: If ``model`` is neither, or ``instrumented`` is asked for and its mixers are not instrumented.
    """
    if isinstance(model, LoadedModel):
        lm = model
    elif isinstance(model, nn.Module) and hasattr(model, "config"):
        lm = LoadedModel(model=model, tokenizer=None, registry=build_registry(model.config), name=type(model).__name__)
    else:
        raise ValueError(f"model must be a LoadedModel or a HF Mamba causal LM, got {type(model).__name__}")
    if instrumented and not is_instrumented(lm.model):
        raise ValueError("model is not instrumented (its hook points are missing); load it with "
                         "sensitivity.load_model or call sensitivity.instrument(model) first")  # fmt: skip
    return lm


def unwrap(model: LoadedModel | nn.Module) -> nn.Module:
    """The torch module behind a ``LoadedModel`` (or the module itself)."""
    return model.model if isinstance(model, LoadedModel) else model

"""Load a Mamba, Mamba2, FalconMamba or hybrid (Bamba, Granite 4, Nemotron-H, Jamba, Falcon-H1, Zamba2) causal LM
(local directory, hub id, or a built-in tiny model)."""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BambaConfig,
    FalconH1Config,
    FalconMambaConfig,
    GraniteMoeHybridConfig,
    JambaConfig,
    Mamba2Config,
    MambaConfig,
    NemotronHConfig,
    PretrainedConfig,
    PreTrainedModel,
    Zamba2Config,
)

from .finite import check_weights
from .instrumented import hf_norm_is_grouped, is_instrumented
from .instrumented import instrument as _instrument
from .names import DEFAULT_MODEL, DEVICES, DTYPE_NAMES
from .registry import ARCHITECTURES, Registry, build_registry
from .zoo import ZOO_MODELS, zoo_path

__all__ = ["DEFAULT_MODEL", "DEVICES", "DTYPES", "TINY_MODELS", "LoadedModel", "as_loaded", "check_source",
           "checkpoint_dtype", "load_model", "resolve_device", "tiny_config"]

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
TINY_SEED = 0
_TINY_VOCAB = 257  # the byte tokenizer: 256 bytes + <|endoftext|>
_TINY_COMMON = dict(vocab_size=_TINY_VOCAB, num_hidden_layers=2, hidden_size=64, state_size=8, conv_kernel=4,
                    bos_token_id=256, eos_token_id=256, pad_token_id=256, tie_word_embeddings=True, use_cache=False)


_TINY_HYBRID = dict(vocab_size=_TINY_VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    bos_token_id=256, eos_token_id=256, pad_token_id=256, tie_word_embeddings=True, use_cache=False,
                    initializer_range=0.1)
_TINY_M2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2, mamba_expand=2, mamba_d_conv=4,
                mamba_chunk_size=32)


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """Config of a tiny random model of ``arch`` (a ``model_type`` of :data:`ARCHITECTURES`) for tests and demos.

    Mamba-2 mixers (also those of the hybrids) default to 8 heads of 16 channels with 2 B/C groups, so group and
    head slicing are exercised. The hybrids have 4 or 5 layers mixing every unit kind the family has: Bamba
    ``SASS`` (attention at layer 1), Granite 4 ``SASS`` with a 4-expert MoE next to each MLP, Nemotron-H ``M*-EM``
    (Mamba-2, attention, MLP, MoE, Mamba-2), Jamba ``SASA`` (Mamba-1) with a 4-expert MoE at odd layers, Falcon-H1
    with 4 parallel Mamba-2 + attention layers (gated norm after the gate, every µP multiplier away from 1), Zamba2
    ``MHMH`` (Mamba-2, hybrid) whose two hybrid layers share one transformer block (with LoRA adapters and RoPE).
    """
    if arch == "mamba":
        return MambaConfig(**{**_TINY_COMMON, "expand": 2, "time_step_rank": 8, **overrides})
    if arch == "falcon_mamba":
        return FalconMambaConfig(**{**_TINY_COMMON, "expand": 2, "time_step_rank": 8, **overrides})
    if arch == "mamba2":
        base = {**_TINY_COMMON, "state_size": 16, "expand": 2, "num_heads": 8, "head_dim": 16, "n_groups": 2,
                "chunk_size": 32}
        return Mamba2Config(**{**base, **overrides})
    if arch == "bamba":
        base = {**_TINY_HYBRID, **_TINY_M2, "num_hidden_layers": 4, "attn_layer_indices": [1], "intermediate_size": 96}
        return BambaConfig(**{**base, **overrides})
    if arch == "granitemoehybrid":
        base = {**_TINY_HYBRID, **_TINY_M2, "layer_types": ["mamba", "attention", "mamba", "mamba"],
                "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
                "shared_intermediate_size": 96, "embedding_multiplier": 2.0, "logits_scaling": 4.0,
                "residual_multiplier": 0.5, "attention_multiplier": 0.25}  # fmt: skip
        base["num_hidden_layers"] = len(overrides.get("layer_types", base["layer_types"]))
        return GraniteMoeHybridConfig(**{**base, **overrides})
    if arch == "nemotron_h":
        base = {**_TINY_HYBRID, "hybrid_override_pattern": "M*-EM", "mamba_num_heads": 8, "mamba_head_dim": 16,
                "ssm_state_size": 16, "n_groups": 2, "expand": 2, "chunk_size": 32, "head_dim": 16,
                "intermediate_size": 96, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                "moe_shared_expert_intermediate_size": 32, "n_group": 1, "topk_group": 1}  # fmt: skip
        return NemotronHConfig(**{**base, **overrides})
    if arch == "jamba":
        base = {**_TINY_HYBRID, "num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1,
                "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 4, "num_experts_per_tok": 2,
                "mamba_d_state": 8, "mamba_expand": 2, "mamba_dt_rank": 8, "mamba_d_conv": 4, "intermediate_size": 96,
                "use_mamba_kernels": False}  # fmt: skip
        return JambaConfig(**{**base, **overrides})
    if arch == "falcon_h1":
        base = {**_TINY_HYBRID, **_TINY_M2, "num_hidden_layers": 4, "intermediate_size": 96, "mamba_d_ssm": None,
                "mamba_rms_norm": True, "mamba_norm_before_gate": False, "embedding_multiplier": 2.0,
                "lm_head_multiplier": 0.5, "key_multiplier": 0.5, "attention_in_multiplier": 0.75,
                "attention_out_multiplier": 1.25, "ssm_in_multiplier": 0.5, "ssm_out_multiplier": 1.5,
                "mlp_multipliers": [0.8, 1.2], "ssm_multipliers": [0.5, 1.5, 0.8, 1.2, 2.0]}  # fmt: skip
        return FalconH1Config(**{**base, **overrides})
    if arch == "zamba2":  # its q/k/v LoRA adapters output 2·D channels: as many key/value heads as heads
        base = {**_TINY_HYBRID, "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"],
                "n_mamba_heads": 8, "mamba_d_state": 16, "mamba_ngroups": 2, "mamba_expand": 2, "mamba_d_conv": 4,
                "chunk_size": 32, "intermediate_size": 96, "num_mem_blocks": 1, "use_shared_attention_adapter": True,
                "adapter_rank": 8, "use_mem_rope": True, "num_key_value_heads": 4}  # fmt: skip
        base["num_hidden_layers"] = len(overrides.get("layers_block_type", base["layers_block_type"]))
        return Zamba2Config(**{**base, **overrides})
    raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")


TINY_MODELS = {"tiny:mamba": "mamba", "tiny:mamba2": "mamba2", "tiny:falcon-mamba": "falcon_mamba",
               "tiny:bamba": "bamba", "tiny:granitemoehybrid": "granitemoehybrid", "tiny:nemotron-h": "nemotron_h",
               "tiny:jamba": "jamba", "tiny:falcon-h1": "falcon_h1", "tiny:zamba2": "zamba2"}  # fmt: skip
"""Built-in tiny random models (fixed seed, built in about a second) by name -> ``model_type``."""


@dataclass
class LoadedModel:
    """A model ready for analysis.

    Attributes:
        model: The HF ``*ForCausalLM`` in eval mode (instrumented unless loaded with ``instrument=False``).
        tokenizer: Its tokenizer, or None when the checkpoint ships none.
        registry: Component registry of its architecture.
        name: What the user asked for (path, hub id or built-in name).
        source: The :func:`load_model` arguments that load it again (name, dtype, revision, allow_nonfinite); None
            for a model wrapped by :func:`as_loaded`. Workers of a distributed run load their copy from it.
    """

    model: PreTrainedModel
    tokenizer: object | None
    registry: Registry
    name: str
    source: dict | None = None

    @property
    def arch(self) -> str:
        """The architecture's ``model_type`` (that of :attr:`registry`)."""
        return self.registry.arch

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's first parameter."""
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


_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


def _shards(path: Path, name: str) -> list[str]:
    """The safetensors files of a checkpoint directory: its index's shards, or ``model.safetensors``, or none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{os.path.join(name, index.name)} is not a safetensors index (a JSON object with a "
                             "weight_map)") from None  # fmt: skip
    return ["model.safetensors"] if (path / "model.safetensors").is_file() else []


def _check_checkpoint(path: Path, name: str) -> None:
    """Refuse a local checkpoint directory transformers would fail on with a traceback (or unpickle), naming the
    file and what is wrong: its config.json, and that its weights are complete safetensors files."""
    config = path / "config.json"
    shown = os.path.join(name, "config.json")
    if not config.is_file():
        raise ValueError(f"model directory {name!r} has no config.json; allowed: a checkpoint directory "
                         "(config.json and model.safetensors)")  # fmt: skip
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{shown} is not UTF-8 text; allowed: a JSON object") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{shown} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{shown} is not a JSON object ({type(data).__name__}); allowed: a model config")
    if data.get("model_type") not in ARCHITECTURES:
        what = f"model_type {data['model_type']!r}" if "model_type" in data else "no model_type"
        raise ValueError(f"{shown} has {what}; allowed model types: {', '.join(ARCHITECTURES)}")
    shards = _shards(path, name)
    if not shards:
        pickles = [p for p in _PICKLES if (path / p).exists()] + sorted(p.name for p in path.glob("*.bin"))
        if pickles:
            raise ValueError(f"{os.path.join(name, pickles[0])} is a pickle checkpoint; pickles are never loaded "
                             "(loading one can run code): convert it to safetensors (model.safetensors)")  # fmt: skip
        raise ValueError(f"model directory {name!r} has no weights; allowed: model.safetensors or "
                         "model.safetensors.index.json with its shards")  # fmt: skip
    for shard in shards:
        file = path / shard
        if not file.is_file():
            raise ValueError(f"{os.path.join(name, shard)} does not exist (listed in the safetensors index)")
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError, a base Exception)
            reason = str(e).splitlines()[0].removeprefix("Error while deserializing header: ")
            if "unable to mmap" in reason:  # larger than this machine lets one file be mapped
                raise ValueError(f"{os.path.join(name, shard)} ({file.stat().st_size:,} bytes) cannot be mapped into "
                                 "memory on this machine; allowed: shards that fit (save_pretrained's "
                                 "max_shard_size, default 5 GB)") from None  # fmt: skip
            raise ValueError(f"{os.path.join(name, shard)} is not a complete safetensors file ({reason}); "
                             "allowed: a file save_pretrained wrote, whole") from None  # fmt: skip


_FLOATING = ("F64", "F32", "F16", "BF16")


def _described(config: PretrainedConfig) -> str:
    """What a config builds, in the words a message names it by: ``mamba2, num_hidden_layers=2``."""
    return f"{config.model_type}, num_hidden_layers={config.num_hidden_layers}"


def available_memory() -> int:
    """Bytes of memory this process can still take: ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the
    physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: nothing is refused


def _meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model ``config`` builds, on the meta device (shapes and dtypes, no memory)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_fits(name: str, config: PretrainedConfig, dtype: torch.dtype, *, streamed: bool = False) -> None:
    """Refuse, from the config alone (a meta-device build), a model whose weights at ``dtype`` would not fit in the
    memory available; ``streamed``: its largest block plus what stays resident (embeddings, head, norms).

    Raises:
        ValueError: Naming the model, its size, the memory available and what is allowed.
    """
    model = _meta_model(config)
    size = torch.empty((), dtype=dtype).element_size()
    params = {id(p): p.numel() for p in model.parameters()}  # tied parameters once
    need, what = sum(params.values()) * size, "its weights"
    if streamed:
        blocks = build_registry(config).blocks(model)
        inside = [{id(p): p.numel() for p in block.parameters()} for block in blocks]
        outside = sum(n for i, n in params.items() if not any(i in b for b in inside))
        need, what = (outside + max((sum(b.values()) for b in inside), default=0)) * size, "its largest block"
    free = available_memory()
    if need > free:
        dims = ", ".join(f"{k}={getattr(config, k)}" for k in ("hidden_size", "num_hidden_layers", "vocab_size")
                         if hasattr(config, k))  # fmt: skip
        hint = "" if streamed else " (or --streamed, which holds one block at a time)"
        raise ValueError(f"model {name!r} needs {_gb(need)} for {what} as {str(dtype).removeprefix('torch.')} "
                         f"({config.model_type}: {dims}); this machine has {_gb(free)} of memory available; "
                         f"allowed: a model whose weights fit{hint}")  # fmt: skip


def _check_shapes(path: Path, name: str, config: PretrainedConfig) -> None:
    """Refuse weights whose shapes do not match what the config builds, or that are not floating point, naming the
    first tensor that differs."""
    expected = dict(_meta_model(config).state_dict())
    for shard in _shards(path, name):
        with safe_open(path / shard, framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                shape = tuple(piece.get_shape())
                if key in expected and shape != tuple(expected[key].shape):
                    raise ValueError(f"{os.path.join(name, shard)}: {key} has shape {list(shape)}; the config "
                                     f"needs {list(expected[key].shape)}")  # fmt: skip
                integer_buffer = key in expected and not expected[key].is_floating_point()
                if not integer_buffer and piece.get_dtype() not in _FLOATING:  # under any name (Nemotron-H renames)
                    raise ValueError(f"{os.path.join(name, shard)}: {key} is stored as {piece.get_dtype()}; weights "
                                     f"must be floating point ({', '.join(_FLOATING)})")  # fmt: skip


def tensors_mismatch(name: str, config: PretrainedConfig, *, missing: list[str] = (), extra: list[str] = ()
                     ) -> ValueError:  # fmt: skip
    """The error for a checkpoint whose tensors are not its config's model's: the first ``missing`` one (the
    config builds it, the files lack it), else the first ``extra`` one (the files hold it, the model has none)."""
    names = missing or extra
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    what = (f"has no tensor {names[0]!r}{more}, which its config.json ({_described(config)}) builds" if missing else
            f"holds tensor {names[0]!r}{more}, which the model its config.json describes ({_described(config)}) does "
            "not have")  # fmt: skip
    return ValueError(f"model {name!r} {what}; allowed: a checkpoint holding exactly the tensors of its config's model")


def _check_loading_info(info: dict, name: str, config: PretrainedConfig) -> None:
    """Refuse a checkpoint whose tensors are not the ones its config builds: transformers' missing and unexpected
    keys (after its weight conversions) are errors here, never warnings (a missing tensor would hold random
    values)."""
    if missing := sorted(info.get("missing_keys") or ()):
        raise tensors_mismatch(name, config, missing=missing)
    if unexpected := sorted(info.get("unexpected_keys") or ()):
        raise tensors_mismatch(name, config, extra=unexpected)
    if mismatched := info.get("mismatched_keys"):
        key = mismatched[0][0] if isinstance(mismatched[0], (tuple, list)) else mismatched[0]
        raise ValueError(f"model {name!r}: tensor {key!r} does not have the shape its config.json "
                         f"({_described(config)}) needs")  # fmt: skip


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device a :data:`DEVICES` name (or a torch device) means here.

    Raises:
        ValueError: For an unknown name, or CUDA asked for where there is none.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(DEVICES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available here (torch.cuda.is_available() is False); allowed: "
                         "cpu, auto")  # fmt: skip
    return torch.device(device)


def check_source(name: str) -> None:
    """Check, without loading weights, that ``name`` names a loadable model: a built-in tiny or zoo model, a local
    checkpoint directory with a readable config and complete safetensors weights, or a hub id.

    Raises:
        ValueError: Naming the path or file and what is wrong.
    """
    if name.startswith("tiny:"):
        if name not in TINY_MODELS:
            raise ValueError(f"unknown built-in model {name!r}; allowed: {', '.join(TINY_MODELS)}")
        return
    if name in ZOO_MODELS:
        return
    path = Path(name).expanduser()
    if not path.is_dir() and (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1):
        what = "is not a directory" if path.exists() else "does not exist"
        raise ValueError(f"model path {name!r} {what}; allowed: a checkpoint directory, a zoo model, a hub id or "
                         f"{', '.join(TINY_MODELS)}")  # fmt: skip
    if path.is_dir():
        _check_checkpoint(path, name)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_dtype(name: str) -> torch.dtype | None:
    """The dtype a checkpoint's floating-point weights are stored in (read from its safetensors header: the most
    common among them), or None for built-in tiny models and hub ids."""
    path = zoo_path(name) if name in ZOO_MODELS else Path(name).expanduser()
    if name.startswith("tiny:") or not path.is_dir():
        return None
    shards = _shards(path, name)
    if not shards:
        return None
    counts: dict[torch.dtype, int] = {}
    with safe_open(path / shards[0], framework="pt") as f:
        for key in f.keys():
            dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else None


def _from_pretrained(name: str, dtype: torch.dtype, revision: str | None) -> tuple[PreTrainedModel, object | None]:
    path = Path(name).expanduser()
    is_local = path.is_dir()
    check_source(name)
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
    if is_local:
        _check_shapes(path, name, config)
    check_fits(name, config, dtype)
    model, info = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype,
                                                       local_files_only=offline, output_loading_info=True)
    _check_loading_info(info, name, model.config)
    return model, load_tokenizer(source, name, revision=revision, local_files_only=offline)


def load_tokenizer(source: str | os.PathLike, name: str, **kwargs) -> object | None:
    """The tokenizer saved with a checkpoint, or None when it has none: transformers builds an empty one (no
    vocabulary: every text is zero tokens) for a directory without tokenizer files, which counts as none."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is not None and not tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"]:
        tokenizer = None
    if tokenizer is None:
        logger.info("no tokenizer found for %s", name)
    return tokenizer


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


def _warn_ungrouped_norm(model: PreTrainedModel, instrumented: bool) -> None:
    """Say when the installed transformers would compute a grouped Mamba-2 model's gated norm differently."""
    config = model.config
    groups = getattr(config, "n_groups", 1)
    if config.model_type != "mamba2" or groups <= 1:
        return
    registry = build_registry(config)
    norm = registry.mixer(model, next(i for i in range(registry.n_layers) if "ssm" in registry.units[i])).norm
    if hf_norm_is_grouped(norm, groups):
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
    allow_nonfinite: bool = False,
) -> LoadedModel:
    """Load a state-space LM with its tokenizer and component registry.

    Args:
        name_or_path: A zoo model shipped with the package (``default`` = the trained Mamba-2, ``default-mamba1``;
            see ``sensitivity.zoo``), a local checkpoint directory, a HF hub id (used when the hub is reachable or
            the files are cached; set ``HF_HUB_OFFLINE=1`` to use the cache only), or a built-in tiny random model
            (``tiny:mamba``, ``tiny:mamba2``, ``tiny:falcon-mamba``, and the hybrids ``tiny:bamba``,
            ``tiny:granitemoehybrid``, ``tiny:nemotron-h``, ``tiny:jamba``, ``tiny:falcon-h1``, ``tiny:zamba2``).
            None loads ``DEFAULT_MODEL``.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (or the torch dtype).
        device: Where to put the model: ``cpu``, ``cuda``, ``auto`` (CUDA when available) or a torch device.
        instrument: Replace the mixer forwards with the instrumented, hookable ones (needed by probes).
        revision: Hub revision.
        allow_nonfinite: Load weights that hold NaN or infinity (refused by default, naming the tensors: such a
            model evaluates to NaN and prunes to nothing).

    Returns:
        A :class:`LoadedModel` in eval mode.

    Raises:
        ValueError: Unknown name, unreadable path, a broken or pickle-only checkpoint (naming the file),
            unsupported architecture or dtype, unreachable hub.
        NonFiniteError: Weights holding NaN or infinity, without ``allow_nonfinite``.

    Examples:
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
        check_source(name)
        model, tokenizer = _tiny(name, dtype)
    elif name in ZOO_MODELS:
        model, tokenizer = _from_pretrained(str(zoo_path(name)), dtype, None)
    else:
        model, tokenizer = _from_pretrained(name, dtype, revision)
    if not allow_nonfinite:
        check_weights(model, name)
    model = model.to(resolve_device(device)).eval()
    _warn_ungrouped_norm(model, instrument)
    if instrument:
        _instrument(model)
    logger.info("loaded %s (%s, %d layers)", name, model.config.model_type, model.config.num_hidden_layers)
    local = not name.startswith("tiny:") and name not in ZOO_MODELS and Path(name).expanduser().is_dir()
    source = {"name": str(Path(name).expanduser().absolute()) if local else name,  # a worker's directory differs
              "dtype": str(dtype).removeprefix("torch."), "revision": revision, "allow_nonfinite": allow_nonfinite}
    return LoadedModel(model=model, tokenizer=tokenizer, registry=build_registry(model.config), name=name,
                       source=source)  # fmt: skip


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

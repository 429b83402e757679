"""Checkpoints larger than memory: a model read one block at a time from its safetensors shards.

:class:`StreamedCheckpoint` builds the model on the meta device (no memory), keeps the parts outside the blocks
(embeddings, final norm, head) in memory, and loads one block's tensors at a time (``with ckpt.block(i)``) from the
shards, lazily, releasing them on exit. Stages run block by block on the residual stream of their windows
(:class:`~sensitivity.core.runner.LayerRunner` works unchanged on the loaded block), and :class:`ShardWriter` writes
the result one shard per block, with the same tensor names as the source and its own index. The source is only
read.

Supported: Mamba, Mamba-2, FalconMamba, Bamba and Falcon-H1, whose checkpoints name their tensors as their modules
do. transformers renames the tensors of the other hybrids as it loads them (GraniteMoeHybrid's and Jamba's experts
are fused, Nemotron-H's prefix differs) and Zamba2 shares one transformer's tensors between layers; they are refused.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .instrumented import instrument
from .loading import LoadedModel, _check_checkpoint, _shards
from .registry import build_registry

__all__ = ["STREAMED_ARCHS", "ShardWriter", "StreamedCheckpoint"]

logger = logging.getLogger(__name__)

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ELEMENT = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
STREAMED_ARCHS = ("mamba", "mamba2", "falcon_mamba", "bamba", "falcon_h1")
"""Families a checkpoint can be streamed of."""


class StreamedCheckpoint:
    """A local safetensors checkpoint, its blocks loaded one at a time.

    Args:
        path: The checkpoint directory (``config.json`` and ``model.safetensors`` or an index with its shards).

    Attributes:
        lm: The model: parameters of the blocks on the meta device except inside ``block(i)``; everything else in
            memory. Instrumented; ``lm.tokenizer`` is the checkpoint's (None when it ships none).
        files: Tensor name -> the shard file holding it.

    Raises:
        ValueError: For a directory that is not a complete safetensors checkpoint, or a family not in
            :data:`STREAMED_ARCHS`.

    Example:
        >>> ckpt = StreamedCheckpoint("checkpoints/mamba2-1.3b")
        >>> with ckpt.block(0) as block:
        ...     hidden = block(hidden)  # (B, L, D)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, name = Path(path), str(path)
        if not self.path.is_dir():
            raise ValueError(f"streamed mode reads a local checkpoint directory; {name!r} is not one")
        _check_checkpoint(self.path, name)
        config = AutoConfig.from_pretrained(self.path)
        if config.model_type not in STREAMED_ARCHS:
            raise ValueError(f"{name!r} is a {config.model_type!r} model; streamed mode supports "
                             f"{', '.join(STREAMED_ARCHS)}")  # fmt: skip
        self.files: dict[str, Path] = {}
        for shard in _shards(self.path, name):
            with safe_open(self.path / shard, framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), self.path / shard))
        with safe_open(next(iter(self.files.values())), framework="pt") as f:
            dtype = _DTYPES[f.get_slice(next(iter(f.keys()))).get_dtype()]
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        registry = build_registry(config)
        blocks = registry.blocks(model)
        self.prefix = next(n for n, m in model.named_modules() if m is blocks)  # e.g. backbone.layers
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        self.lm = LoadedModel(model, tokenizer, registry, name)
        outer = [n for n in self.files if not n.startswith(self.prefix + ".")]
        for module_name in sorted({n.rsplit(".", 1)[0] for n in outer}):
            self._load(module_name, model.get_submodule(module_name))
        model.tie_weights()
        instrument(model)
        if missing := [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(self.prefix + ".")]:
            raise ValueError(f"{name!r} has no tensor {missing[0]!r}")

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors ``names`` from their shards (each shard opened once)."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out

    def keys(self, prefix: str) -> list[str]:
        """The checkpoint's tensor names under module ``prefix``, in file order."""
        return [n for n in self.files if n.startswith(prefix + ".")]

    def _load(self, prefix: str, module: nn.Module) -> None:
        """Give ``module`` (named ``prefix`` in the model) its tensors from the checkpoint."""
        state = {k[len(prefix) + 1 :]: v for k, v in self._read(self.keys(prefix)).items()}
        module.load_state_dict(state, strict=True, assign=True)  # buffers the checkpoint lacks: built on the CPU

    @contextmanager
    def block(self, layer: int) -> Iterator[nn.Module]:
        """Block ``layer`` with its tensors loaded (in place in the model), released to the meta device on exit."""
        block = self.lm.registry.blocks(self.lm.model)[layer]
        self._load(f"{self.prefix}.{layer}", block)
        try:
            yield block
        finally:
            _release(block)
            _trim()

    def block_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The loaded block ``layer``'s tensors under their checkpoint names (call inside ``block(layer)``)."""
        prefix = f"{self.prefix}.{layer}"
        block = self.lm.registry.blocks(self.lm.model)[layer]
        return {f"{prefix}.{k}": v for k, v in block.state_dict().items() if f"{prefix}.{k}" in self.files}

    def pieces(self, name: str, rows_bytes: int = 64 << 20) -> Iterator[torch.Tensor]:
        """Tensor ``name`` read from its shard in pieces of about ``rows_bytes`` (along its first axis)."""
        with safe_open(self.files[name], framework="pt") as f:
            part = f.get_slice(name)
            shape = part.get_shape()
            if not shape:
                yield f.get_tensor(name)
                return
            row = max(1, math.prod(shape[1:]) * _ELEMENT[part.get_dtype()])
            step = max(1, rows_bytes // row)
            for i in range(0, shape[0], step):
                yield part[i : i + step]

    def outer_names(self) -> list[str]:
        """The checkpoint's tensor names outside the blocks."""
        return [n for n in self.files if not n.startswith(self.prefix + ".")]


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (each one moved there as it is registered) and their
    buffers (rotary frequencies, constant norm weights) on the CPU, computed as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _release(module: nn.Module) -> None:
    """Move ``module``'s parameters back to the meta device (freeing them); its buffers stay."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}  # fmt: skip
_CHUNK = 64 << 20


def _header(path: Path) -> tuple[int, dict]:
    """A safetensors file's header: (where its data starts, the JSON header)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def _write_safetensors(path: Path, entries: list[tuple[str, str, list[int], int, Callable]]) -> None:
    """Write a safetensors file from ``(name, dtype, shape, nbytes, write)`` entries, each ``write(file)`` writing
    its ``nbytes`` raw bytes: no tensor is copied into a bytes object first."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, nbytes, _ in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for *_, nbytes, write in entries:
            start = f.tell()
            write(f)
            if f.tell() - start != nbytes:
                raise RuntimeError(f"{path}: wrote {f.tell() - start} bytes of {nbytes}")
        f.flush()
        os.fsync(f.fileno())


def _trim() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing). Without it a
    block's freed intermediates stay in the heap, scattered, and peak memory creeps up block after block (measured
    on a 1.3B Mamba-2: 1.6 GB at the head instead of 1.1 GB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ShardWriter:
    """Writes a checkpoint shard by shard into ``directory``: ``model-0000i.safetensors`` files, then (``close``) the
    index ``model.safetensors.index.json``, the source's config and tokenizer files. Tensors in memory are written
    from their buffers, tensors copied unchanged from the source in chunks of 64 MB, so a shard never needs a second
    copy of itself in memory."""

    def __init__(self, directory: Path, source: Path) -> None:
        self.dir, self.source = directory, source
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.shards = 0

    def _name(self) -> str:
        self.shards += 1
        return f"model-{self.shards:05d}.safetensors"

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """One shard holding ``tensors`` (name -> CPU tensor)."""
        name, entries = self._name(), []
        for key, t in tensors.items():
            t = t.detach().contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
            entries.append((key, _ST_DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size(),
                            lambda f, data=data: data is not None and f.write(memoryview(data))))  # fmt: skip
        _write_safetensors(self.dir / name, entries)
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total += sum(e[3] for e in entries)

    def copy(self, ckpt: StreamedCheckpoint, names: list[str]) -> None:
        """One shard holding the source's tensors ``names`` byte for byte, read in chunks."""
        name, entries = self._name(), []
        for key in names:
            file = ckpt.files[key]
            start, header = _header(file)
            begin, end = header[key]["data_offsets"]

            def write(f, file=file, lo=start + begin, hi=start + end) -> None:
                with open(file, "rb") as src:
                    src.seek(lo)
                    while lo < hi:
                        chunk = src.read(min(_CHUNK, hi - lo))
                        f.write(chunk)
                        lo += len(chunk)

            entries.append((key, header[key]["dtype"], header[key]["shape"], end - begin, write))
        _write_safetensors(self.dir / name, entries)
        self.weight_map.update(dict.fromkeys(names, name))
        self.total += sum(e[3] for e in entries)

    def close(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for f in self.source.iterdir():
            if f.is_file() and (f.name == "config.json" or f.name.startswith(("tokenizer", "special_tokens"))
                                or f.name in ("vocab.json", "merges.txt", "generation_config.json")):
                shutil.copyfile(f, self.dir / f.name)

"""Checkpoints larger than memory: a model read one block at a time from its safetensors shards.

:class:`StreamedCheckpoint` builds the model on the meta device (no memory), keeps the parts outside the blocks
(embeddings, final norm, head) in memory, and loads one block's tensors at a time (``with ckpt.block(i)``) from the
shards, lazily, releasing them on exit. Stages run block by block on the residual stream of their windows
(:class:`~sensitivity.core.runner.LayerRunner` works unchanged on the loaded block), and :class:`ShardWriter` writes
the result one shard per block, with the same tensor names as the source and its own index. The source is only
read.

Every family of the registry streams. Where a checkpoint names its tensors otherwise than the model does
(GraniteMoeHybrid's and Jamba's experts are stored one by one and fused in the model, Nemotron-H's prefix is
``backbone``), transformers' own weight conversions translate, both ways, as ``from_pretrained`` and
``save_pretrained`` do. Tensors several blocks share (Zamba2's shared transformer) stay in memory with the parts
outside the blocks (:meth:`StreamedCheckpoint.resident_tensors`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    PrefixChange,
    WeightConverter,
    WeightRenaming,
    apply_converters,
    apply_renamings,
    dot_natural_key,
    revert_weight_conversion,
)

from ..data import Windows
from .finite import check_loss
from .hooks import hooks
from .instrumented import instrument
from .loading import (
    LoadedModel,
    _check_checkpoint,
    _check_shapes,
    _shards,
    check_fits,
    load_tokenizer,
    tensors_mismatch,
)
from .registry import ARCHITECTURES, build_registry
from .runner import LayerRunner
from .stats import ChannelStats, GradStats, grad_state, window_objective

__all__ = ["STREAMED_ARCHS", "ResidualCache", "ShardWriter", "StreamedCheckpoint", "streamed_channel_stats",
           "streamed_window_gradients"]

logger = logging.getLogger(__name__)

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ELEMENT = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
STREAMED_ARCHS = ARCHITECTURES
"""Families a checkpoint can be streamed of: every one of the registry."""


class StreamedCheckpoint:
    """A local safetensors checkpoint, its blocks loaded one at a time.

    Args:
        path: The checkpoint directory (``config.json`` and ``model.safetensors`` or an index with its shards).

    Attributes:
        lm: The model: parameters of the blocks on the meta device except inside ``block(i)``; everything else in
            memory. Instrumented; ``lm.tokenizer`` is the checkpoint's (None when it ships none).
        files: Tensor name -> the shard file holding it.

    Raises:
        ValueError: For a directory that is not a complete safetensors checkpoint of a family in
            :data:`STREAMED_ARCHS`.

    Examples:
        >>> ckpt = StreamedCheckpoint("checkpoints/mamba2-1.3b")
        >>> with ckpt.block(0) as block:
        ...     hidden = block(hidden)  # (B, L, D)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, name = Path(path), str(path)
        if not self.path.is_dir():
            raise ValueError(f"streamed mode reads a local checkpoint directory; {name!r} is not one")
        _check_checkpoint(self.path, name)
        config = AutoConfig.from_pretrained(self.path)  # a family of STREAMED_ARCHS: _check_checkpoint says so
        self.files: dict[str, Path] = {}
        for shard in _shards(self.path, name):
            with safe_open(self.path / shard, framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), self.path / shard))
        with safe_open(next(iter(self.files.values())), framework="pt") as f:
            dtype = _DTYPES[f.get_slice(next(iter(f.keys()))).get_dtype()]
        _check_shapes(self.path, name, config)  # before anything is built at the checkpoint's sizes
        check_fits(name, config, dtype, streamed=True)
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        registry = build_registry(config)
        blocks = registry.blocks(model)
        self.prefix = next(n for n, m in model.named_modules() if m is blocks)  # e.g. backbone.layers
        tokenizer = load_tokenizer(self.path, name)
        self.lm = LoadedModel(model, tokenizer, registry, name)
        self._conversions = _conversions(model)
        # Parameters several blocks share (Zamba2's shared transformer) stay in memory, loaded with the parts
        # outside the blocks; the checkpoint's names of each block's own tensors are its names on meta as
        # save_pretrained would write them.
        model.tie_weights()  # on meta: which parameters are one
        uses = Counter(id(p) for block in blocks for p in block.parameters())
        self._shared: list[set[str]] = [
            {n for n, p in block.named_parameters(remove_duplicate=False) if uses[id(p)] > 1} for block in blocks]
        self._block_files: list[list[str]] = []
        shared_meta = {}
        for i, block in enumerate(blocks):
            state = {f"{self.prefix}.{i}.{k}": v for k, v in block.state_dict(keep_vars=True).items()}
            own = {k: v.detach() for k, v in state.items() if k.removeprefix(f"{self.prefix}.{i}.") not in
                   self._shared[i]}  # fmt: skip
            shared_meta.update({k: v.detach() for k, v in state.items() if k not in own})
            names = list(self.to_checkpoint(own))
            if absent := [n for n in names if n not in self.files]:
                raise tensors_mismatch(name, config, missing=absent[:1])
            self._block_files.append(names)
        inside = {n for names in self._block_files for n in names}
        self._resident = [n for n in self.to_checkpoint(shared_meta) if n in self.files]
        self._outer = [n for n in self.files if n not in inside and n not in self._resident]
        self._loaded: dict[int, set[str]] = {}
        known = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
        state = self.to_model(self._read(self._outer + self._resident))
        if extra := sorted(n for n in state if n not in known):
            raise tensors_mismatch(name, config, extra=extra[:1])
        self._resident_names = sorted(self.to_model({n: torch.empty(0) for n in self._resident}))
        for module_name in sorted({n.rsplit(".", 1)[0] for n in state}):
            module = model.get_submodule(module_name)
            module.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in state.items()
                                    if k.rsplit(".", 1)[0] == module_name}, strict=True, assign=True)  # fmt: skip
        model.tie_weights()
        instrument(model)
        if missing := [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(self.prefix + ".")]:
            raise ValueError(f"{name!r} has no tensor {missing[0]!r}")

    def to_model(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors under the model's names (transformers' conversions applied: fused experts, renamed
        prefixes), as ``from_pretrained`` loads them."""
        return _convert(self.lm.model, tensors, self._conversions) if self._conversions else tensors

    def to_checkpoint(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model tensors under the checkpoint's names, as ``save_pretrained`` writes them."""
        return revert_weight_conversion(self.lm.model, tensors) if self._conversions else tensors

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

    @contextmanager
    def block(self, layer: int) -> Iterator[nn.Module]:
        """Block ``layer`` with its tensors loaded (in place in the model), released to the meta device on exit."""
        block = self.lm.registry.blocks(self.lm.model)[layer]
        prefix = f"{self.prefix}.{layer}."
        state = self.to_model(self._read(self._block_files[layer]))
        self._loaded[layer] = set(state)
        got = block.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, strict=False, assign=True)
        if got.unexpected_keys or set(got.missing_keys) - self._shared[layer]:
            raise ValueError(f"{self.path}: block {layer} does not match its tensors (missing "
                             f"{sorted(set(got.missing_keys) - self._shared[layer])[:3]}, unexpected "
                             f"{got.unexpected_keys[:3]})")  # fmt: skip
        try:
            yield block
        finally:
            _release(block, keep={id(p) for p in self.resident_tensors().values()})
            _trim()

    def resident_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors several blocks share (in memory throughout; empty but on Zamba2), under the model's names
        of the block the checkpoint stores them with. Pruned in place by whichever block prunes them."""
        return {n: self.lm.model.get_parameter(n) for n in self._resident_names}

    def block_tensors(self, layer: int, extra: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The loaded block ``layer``'s tensors under the model's names (call inside ``block(layer)``): the ones
        the checkpoint holds, and those named in ``extra`` (parameters the caller added to the block).
        :meth:`to_checkpoint` renames them for writing."""
        prefix, keep = f"{self.prefix}.{layer}", self._loaded[layer] | set(extra)
        block = self.lm.registry.blocks(self.lm.model)[layer]
        return {f"{prefix}.{k}": v for k, v in block.state_dict().items() if f"{prefix}.{k}" in keep}

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
        return list(self._outer)


def _conversions(model: nn.Module) -> list:
    """transformers' weight conversions between ``model``'s names and its checkpoints' (empty for most families)."""
    return [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]


def _convert(model: nn.Module, tensors: dict[str, torch.Tensor], conversions: list) -> dict[str, torch.Tensor]:
    """``tensors`` (checkpoint names) under the model's names: transformers' ``revert_weight_conversion`` run
    forwards (renamings on every key, converters on the keys they match, many-to-one ones given all their pieces)."""
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {k: c for c in converters for k in c.source_patterns}
    pending: dict[str, WeightRenaming | WeightConverter] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        renamed = apply_renamings(key, renamings)
        target, pattern = apply_converters(renamed, converters)
        if pattern is None:
            pending.setdefault(renamed, WeightRenaming(key, renamed)).add_tensor(renamed, key, key, tensor)
        else:
            pending.setdefault(target, deepcopy(by_pattern[pattern])).add_tensor(target, key, pattern, tensor)
    out = {}
    for first, conversion in pending.items():
        for name, value in conversion.convert(first, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out


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


def _release(module: nn.Module, keep: set[int] = frozenset()) -> None:
    """Move ``module``'s parameters back to the meta device (freeing them) but those whose ``id`` is in ``keep``;
    its buffers stay."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) not in keep:
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

    def close(self, config=None) -> None:
        """Write the index and copy the source's config and tokenizer files (``config``: a changed config to
        write instead of the source's)."""
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for f in self.source.iterdir():
            if f.is_file() and (f.name == "config.json" or f.name.startswith(("tokenizer", "special_tokens"))
                                or f.name in ("vocab.json", "merges.txt", "generation_config.json")):
                shutil.copyfile(f, self.dir / f.name)
        if config is not None:
            config.save_pretrained(self.dir)


class ResidualCache:
    """Residual streams of ``n`` windows entering a range of layers, in a file on disk, memory-mapped: a
    (layers, n, L, D) tensor whose pages the OS reads in and drops as needed, so a sweep over many layers of a large
    model holds one layer's stream at a time in memory.

    Args:
        directory: Where the file goes (deleted by :meth:`close`); None: a new temporary directory.
        shape: (layers, n, L, D).
        dtype: The stream's dtype.

    Examples:
        >>> with ResidualCache(None, (n_layers + 1, n, L, D), torch.float32) as cache:
        ...     cache[0][k] = embeds  # (L, D)
    """

    def __init__(self, directory: str | os.PathLike | None, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="residuals-", dir=directory)
        self.path = Path(self._tmp.name) / "residuals.bin"
        numel = math.prod(shape)
        with open(self.path, "wb") as f:
            f.truncate(numel * torch.empty((), dtype=dtype).element_size())  # sparse: no pages written yet
        self.data = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(shape)

    def __getitem__(self, i):
        return self.data[i]

    def close(self) -> None:
        """Unmap and delete the file."""
        self.data = None
        self._tmp.cleanup()

    def __enter__(self) -> ResidualCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def streamed_channel_stats(ckpt: StreamedCheckpoint, windows: Windows, points: Iterable[str], *, batch_size: int = 8,
                           show_progress: bool = True) -> dict[str, ChannelStats]:  # fmt: skip
    """:func:`~sensitivity.core.stats.channel_stats` of a streamed checkpoint: the same statistics at hook points
    (``"layers.{i}.{point}"``), computed block by block (one block in memory) on the windows' residual stream.

    Args:
        ckpt: The checkpoint.
        windows: Calibration windows (n, L).
        points: Hook names.
        batch_size: Windows per forward.
        show_progress: Show a tqdm bar over the blocks.

    Returns:
        Hook name -> statistics accumulated over every window.
    """
    stats = {name: ChannelStats() for name in points}
    by_layer: dict[int, list[str]] = {}
    for name in stats:
        by_layer.setdefault(int(name.split(".")[1]), []).append(name)
    run = LayerRunner(ckpt.lm, windows, batch_size)
    hidden = [run.embed(b) for b in run.batches]  # (B, L, D) each
    for layer in tqdm(range(max(by_layer, default=-1) + 1), desc="stats (streamed)", disable=not show_progress):
        with ckpt.block(layer), hooks(ckpt.lm, {n: stats[n].add_batch for n in by_layer.get(layer, ())}):
            hidden = [run.run(h, layer, layer + 1, rows=b) for h, b in zip(hidden, run.batches)]
    return stats


def streamed_window_gradients(
    ckpt: StreamedCheckpoint,
    windows: Windows,
    params: Callable[[int, nn.Module], Mapping[Hashable, nn.Parameter]],
    layers: Iterable[int],
    *,
    objective: str = "loss",
    reduce: Callable[[Hashable, GradStats], Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> dict[Hashable, Any]:
    """:func:`~sensitivity.core.stats.window_gradients` of a streamed checkpoint: per-window gradients of the
    objective with respect to parameters of the blocks ``layers``, one block in memory at a time.

    A forward pass over the blocks stores the residual stream entering each of them in a memory-mapped
    :class:`ResidualCache`; the backward pass then loads the blocks from the last to the first of ``layers``, and
    for each window runs the block again from its cached input and back-propagates the gradient arriving from the
    block after it (the head's, for the last block).

    Args:
        ckpt: The checkpoint.
        windows: Calibration windows (n, L).
        params: ``params(layer, block)``: key -> parameter of the loaded block, the ones to collect.
        layers: Blocks whose parameters are collected.
        objective: See :func:`~sensitivity.core.stats.window_objective`.
        reduce: ``reduce(key, stats)``, applied as soon as a block's windows are done; its result is kept instead
            of the :class:`~sensitivity.core.stats.GradStats` (e.g. only the rows a score reads: whole-parameter
            sums over every layer of a large model would not fit in memory).
        cache_dir: Directory of the residual cache file (default: the system's temporary directory).
        show_progress: Show tqdm bars over the blocks.

    Returns:
        Key -> :class:`~sensitivity.core.stats.GradStats` (or what ``reduce`` made of it).
    """
    lm, layers = ckpt.lm, sorted(set(layers))
    run = LayerRunner(lm, windows, batch_size=1)
    (n, L), first, last = windows.ids.shape, min(layers), lm.registry.n_layers
    head = [lm.registry.final_norm(lm.model), lm.model.get_output_embeddings()]
    stats: dict[Hashable, GradStats] = {}
    with ResidualCache(cache_dir, (last + 1 - first, n, L, lm.model.config.hidden_size), lm.dtype) as cache:
        hidden = [run.embed(slice(k, k + 1)) for k in range(n)]  # (1, L, D) each
        with torch.no_grad():
            for layer in tqdm(range(last), desc="forward (streamed)", disable=not show_progress):
                with ckpt.block(layer):
                    for k in range(n):
                        if layer >= first:
                            cache[layer - first][k] = hidden[k][0]
                        hidden[k] = run.run(hidden[k], layer, layer + 1, rows=slice(k, k + 1))
        grads = []
        with ExitStack() as stack:
            for module in head:
                stack.enter_context(grad_state(module))
            for k in range(n):
                h = hidden[k].detach().requires_grad_(True)  # (1, L, D)
                labels = None if windows.labels is None else windows.labels[k : k + 1]  # (1, L)
                loss = window_objective(run.logits(h), run.ids[k : k + 1], objective, labels).sum()
                check_loss(lm.model, loss.item(), run.ids[k : k + 1], f"the {objective} objective of window {k}")
                loss.backward()
                grads.append(h.grad)  # (1, L, D)
        del hidden
        for layer in tqdm(range(last - 1, first - 1, -1), desc="backward (streamed)", disable=not show_progress):
            with ckpt.block(layer) as block:
                wanted = dict(params(layer, block)) if layer in layers else {}
                with grad_state(block, wanted.values()):
                    for key, p in wanted.items():
                        stats.setdefault(key, GradStats(0, torch.zeros_like(p, dtype=torch.float32),
                                                        torch.zeros_like(p, dtype=torch.float32)))  # fmt: skip
                    for k in range(n):
                        h = cache[layer - first][k : k + 1].clone().requires_grad_(layer > first)  # (1, L, D)
                        out = run.run(h, layer, layer + 1, rows=slice(k, k + 1))  # (1, L, D)
                        out.backward(grads[k])
                        for key, p in wanted.items():
                            stats[key].add(p.grad if p.grad is not None else torch.zeros_like(p))
                            p.grad = None
                        grads[k] = h.grad
                    if reduce is not None:
                        stats.update({key: reduce(key, stats[key]) for key in wanted})
    return stats

"""Save a pruned model next to (never into) its source: ``save_pretrained`` files plus ``pruning_manifest.json``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..core.loading import LoadedModel
from ..core.output import write_manifest
from ..core.zoo import ZOO_MODELS, zoo_path

__all__ = ["MANIFEST", "save_pruned", "source_dir"]

logger = logging.getLogger(__name__)

MANIFEST = "pruning_manifest.json"


def source_dir(name: str) -> Path | None:
    """The checkpoint directory a model was loaded from (zoo models included), or None (tiny or hub models)."""
    if name in ZOO_MODELS:
        return zoo_path(name).resolve()
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() else None


def _check_out(out: Path, source: Path | None, overwrite: bool) -> None:
    if source is not None and (out == source or source in out.parents):
        raise ValueError(f"--out {str(out)!r} is inside the source checkpoint {str(source)!r}; "
                         "pruned models are never written into their source")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {str(out)!r} is not empty; choose another directory or pass overwrite=True")
    if not out.parent.is_dir():
        raise ValueError(f"the parent directory of --out {str(out)!r} does not exist")


def save_pruned(lm: LoadedModel, out, manifest: dict, *, overwrite: bool = False) -> Path:
    """Write ``save_pretrained`` of the model and tokenizer plus ``pruning_manifest.json`` into ``out``.

    Everything is written into a temporary sibling directory first and renamed into place, so ``out`` holds either
    nothing new or a complete checkpoint. The result reloads with ``load_model(out)`` / ``from_pretrained``.

    Args:
        lm: The pruned model.
        out: Target directory (created; must not be inside the source checkpoint).
        manifest: JSON-able description of the pruning run.
        overwrite: Replace a non-empty ``out``.

    Returns:
        The resolved output directory.

    Raises:
        ValueError: ``out`` inside the source checkpoint, not a directory, non-empty without ``overwrite``, or
            its parent missing.
    """
    out = Path(out).expanduser().resolve()
    _check_out(out, source_dir(lm.name), overwrite)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        lm.model.save_pretrained(tmp)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        write_manifest(tmp / MANIFEST, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved pruned model to %s", out)
    return out

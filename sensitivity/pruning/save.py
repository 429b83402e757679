"""Save a pruned model next to (never into) its source: ``save_pretrained`` files plus ``pruning_manifest.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..core.loading import LoadedModel
from ..core.output import OutputError, check_publish, publish_dir, shown, write_manifest
from ..core.zoo import ZOO_MODELS, zoo_path
from .methods import MANIFEST

__all__ = ["MANIFEST", "check_out", "save_pruned", "source_dir"]

logger = logging.getLogger(__name__)



def source_dir(name: str) -> Path | None:
    """The checkpoint directory a model was loaded from (zoo models included), or None (tiny or hub models)."""
    if name in ZOO_MODELS:
        return zoo_path(name).resolve()
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() else None


def check_out(out: str | Path, model_name: str, overwrite: bool = False) -> Path:
    """Where a pruned checkpoint of ``model_name`` may go: never inside its source checkpoint, and a new or empty
    directory unless ``overwrite``. Returns the absolute path.

    Raises:
        OutputError: Naming the directory and what is wrong.
    """
    out = Path(out).expanduser().absolute()
    source = source_dir(model_name)
    if source is not None and (out.resolve() == source or source in out.resolve().parents):
        raise OutputError(f"{shown(out)} is inside the source checkpoint {source}; pruned models are never written "
                          "into their source")  # fmt: skip
    check_publish(out, overwrite, MANIFEST)
    return out


def save_pruned(lm: LoadedModel, out, manifest: dict, *, overwrite: bool = False, dtype: torch.dtype | None = None
                ) -> Path:  # fmt: skip
    """Write ``save_pretrained`` of the model and tokenizer plus ``pruning_manifest.json`` into ``out``.

    Everything is written into a locked staging sibling first and renamed into place
    (:func:`~sensitivity.core.output.publish_dir`), so ``out`` holds either nothing new or a complete checkpoint.
    The result reloads with ``load_model(out)`` / ``from_pretrained``.

    Args:
        lm: The pruned model.
        out: Target directory (created; must not be inside the source checkpoint).
        manifest: JSON-able description of the pruning run.
        overwrite: Replace a checkpoint this function wrote before (a directory holding anything else is never
            replaced).
        dtype: Store the floating-point weights in this dtype (e.g. the source checkpoint's; the model in memory is
            left as it is); None: as they are.

    Returns:
        The absolute output directory.

    Raises:
        OutputError: ``out`` inside the source checkpoint, not a directory, non-empty without ``overwrite``, its
            parent missing, or another process writing it.
    """
    out = check_out(out, lm.name, overwrite)
    with publish_dir(out, overwrite=overwrite, marker=MANIFEST) as tmp:
        if dtype is None or dtype == lm.dtype:
            lm.model.save_pretrained(tmp)
        else:  # a cast copy of each tensor (tied ones stay one tensor); the config records the stored dtype
            cast: dict[int, torch.Tensor] = {}
            state = {k: cast.setdefault(v.data_ptr(), v.to(dtype)) if v.is_floating_point() else v
                     for k, v in lm.model.state_dict().items()}  # fmt: skip
            lm.model.save_pretrained(tmp, state_dict=state)
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            config["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        write_manifest(tmp / MANIFEST, manifest)
    logger.info("saved pruned model to %s", out)
    return out

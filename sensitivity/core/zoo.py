"""The index of the embedded model zoo: small Mamba-2 and Mamba-1 LMs trained here, shipped as package data.

Each model lives in ``sensitivity/zoo/models/<name>/`` as a Hugging Face checkpoint (``config.json``,
``model.safetensors`` stored in float16, tokenizer files) with a model card (``README.md``), its measurements
(``card.json``) and its training loss curve (``training_log.jsonl``). ``load_model("default")`` or
``AutoModelForCausalLM.from_pretrained(zoo_path("default"))`` load them offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ZOO_DIR", "ZOO_MODELS", "ZooModel", "list_models", "zoo_path"]

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo" / "models"
"""The directory holding the zoo's checkpoints (``sensitivity/zoo/models`` in the installed package)."""
ZOO_MODELS = {"default": "default", "default-mamba2": "default", "default-mamba1": "default-mamba1",
              "default-hybrid": "default-hybrid", "recall": "recall"}
"""Zoo names (and aliases) mapped to their directory under :data:`ZOO_DIR`."""


@dataclass(frozen=True)
class ZooModel:
    """One shipped model.

    Attributes:
        name: Zoo name (``"default"``, ``"default-mamba1"``, ``"default-hybrid"``, ``"recall"``).
        path: Checkpoint directory.
        card: The measurements of ``card.json`` (architecture, parameters, tokens seen, test perplexity, ...).
    """

    name: str
    path: Path
    card: dict

    @property
    def size_mb(self) -> float:
        """Size of the checkpoint directory on disk in MB (10^6 bytes)."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file()) / 1e6


def zoo_path(name: str) -> Path:
    """Directory of the zoo model ``name``.

    Args:
        name: A key of :data:`ZOO_MODELS`.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: If ``name`` is not a zoo model or its files are missing.
    """
    if name not in ZOO_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; allowed: {', '.join(ZOO_MODELS)}")
    path = ZOO_DIR / ZOO_MODELS[name]
    if not (path / "config.json").is_file():
        raise ValueError(f"zoo model {name!r} is missing its files in {path} (rebuild with sensitivity.zoo.train)")
    return path


def list_models() -> list[ZooModel]:
    """Every shipped model (aliases excluded), default first.

    Returns:
        One :class:`ZooModel` per checkpoint directory.
    """
    seen, models = set(), []
    for name, directory in ZOO_MODELS.items():
        if directory in seen:
            continue
        seen.add(directory)
        path = zoo_path(name)
        models.append(ZooModel(name=name, path=path, card=json.loads((path / "card.json").read_text())))
    return models

"""Versions and seeds recorded next to every output."""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_PACKAGES = ("sensitivity", "torch", "transformers", "tokenizers", "captum", "pandas", "numpy")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers, plus Python's."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename, so readers and
    interrupted runs only ever see the old or the new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(path, manifest: dict) -> None:
    """Write a run manifest as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")

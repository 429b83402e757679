"""Versions and seeds recorded next to every output."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

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

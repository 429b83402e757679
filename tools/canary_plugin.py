"""pytest plugin of the canary (``tools/canary.py``): records each failure with the distribution it points at.

Loaded with ``-p canary_plugin`` when ``$CANARY_REPORT`` names a file; writes one JSON line per failure:
``{"where", "error", "blame", "version"}``. It first imports every module of the package, so a name a new release
removed is reported against its owner before pytest's collection buries it in a traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import re
import sys
import traceback
from pathlib import Path

import pytest

_IGNORED = {"sensitivity", "pytest", "_pytest", "pluggy", "importlib", "tests", "canary_plugin"}


def _distribution(module: str | None) -> str | None:
    """The installed distribution owning top-level module ``module`` (None for the package itself, stdlib...)."""
    if not module:
        return None
    top = module.split(".")[0]
    if top in _IGNORED or top in sys.stdlib_module_names:
        return None
    names = importlib.metadata.packages_distributions().get(top)
    return names[0].lower().replace("_", "-") if names else None


def _module_of_file(path: str) -> str | None:
    """The top-level module a file in site-packages (or on sys.path) belongs to."""
    parts = Path(path).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            rest = parts[parts.index(marker) + 1 :]
            return rest[0].removesuffix(".py") if rest else None
    return None


def blame(exc: BaseException) -> str | None:
    """The distribution an exception points at: its own owner where it names one, else the library it was raised in
    (None when raised in the package or the tests: a wrong call or a changed number names no owner)."""
    if isinstance(exc, ImportError) and (dist := _distribution(exc.name)):
        return dist
    if isinstance(exc, AttributeError) and getattr(exc, "obj", None) is not None:
        obj = exc.obj
        owner = obj.__name__ if isinstance(obj, type(sys)) else type(obj).__module__
        if dist := _distribution(owner):
            return dist
    frames = traceback.extract_tb(exc.__traceback__)
    return _distribution(_module_of_file(frames[-1].filename)) if frames else None  # raised inside a library


def package_root() -> str:
    """The directory of the package being tested (found without importing it)."""
    return str(Path(importlib.util.find_spec("sensitivity").origin).parent)


def _record(where: str, exc: BaseException) -> None:
    dist = blame(exc)
    try:
        version = importlib.metadata.version(dist) if dist else None
    except importlib.metadata.PackageNotFoundError:
        version = None
    error = re.sub(r" \((?:/|[A-Za-z]:\\)[^)]*\)", "", " ".join(f"{type(exc).__name__}: {exc}".split()))[:400]
    with open(os.environ["CANARY_REPORT"], "a") as f:
        f.write(json.dumps({"where": where, "error": error, "blame": dist, "version": version}) + "\n")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """Before ``tests/conftest.py`` is imported (it imports the package)."""
    if not os.environ.get("CANARY_REPORT"):
        return
    current = "sensitivity"
    try:
        package = importlib.import_module(current)
        for info in pkgutil.walk_packages(package.__path__, "sensitivity."):
            if not info.name.endswith("__main__"):
                current = info.name
                importlib.import_module(current)
    except Exception as e:  # noqa: BLE001 (any import-time failure is the finding)
        ours = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}sensitivity{os.sep}" in f.filename]
        where = f"{Path(ours[-1].filename).relative_to(Path(package_root()).parent)}:{ours[-1].lineno}" if ours else ""
        _record(f"import {current}" + (f" ({where})" if where else ""), e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if os.environ.get("CANARY_REPORT") and report.failed and call.excinfo is not None:
        _record(item.nodeid, call.excinfo.value)
    return report

"""The canary: the compatibility subset against the newest release of every dependency, ranges' upper ends lifted.

``make test-latest`` (and ``.ci/run`` after the locked suite) runs::

    .venv/bin/python tools/canary.py --venv .venv-latest

It builds ``--venv`` from ``pyproject.toml`` alone (no lock; every upper bound of the runtime and ``dev``
dependencies dropped, floors kept, so a release the ranges do not admit yet is installed too), then runs the tests
marked ``compat`` there (forward equality on every family, one CLI run of every job, the notebooks' imports,
streamed conversions, a Ray run, the private surfaces). On success it prints the versions it ran on and which of
them the ranges do not admit yet (raise those bounds). On failure it prints one line naming the package and version
that broke and what broke, and exits 1. ``--no-install --python PY`` runs the subset in an existing environment.

Which package broke: the exception's own owner where it names one (an ``ImportError``'s module, an
``AttributeError``'s object), else the library the exception was raised in; when neither points at a
library (say, numbers that no longer match), the line names every package whose version differs from the lock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "canary_plugin"  # tools/canary_plugin.py, loaded into the pytest run inside the canary environment
TRANSITIVE = ("huggingface-hub", "accelerate", "pydantic", "kernels", "numpy")
"""Packages the package does not declare whose releases have broken it or its test stack before (reported by
name when they change, with the declared ones)."""


def _requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The runtime and ``dev`` requirements of ``pyproject.toml``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def _written(req: Requirement, specifiers: list[str]) -> str:
    """``req`` written back with ``specifiers`` in place of its own (extras and marker kept)."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    out = f"{req.name}{extras}{','.join(specifiers)}"
    return f"{out}; {req.marker}" if req.marker else out


def _ordered(req: Requirement) -> list[str]:
    return sorted((str(s) for s in req.specifier), key=lambda s: (not s.startswith(">"), s))


def unbounded(requirement: str) -> str:
    """A PEP 508 requirement with its upper bounds (``<``, ``<=``, ``==``, ``~=``) dropped, floors and extras
    kept: ``transformers>=5.21,<5.26`` -> ``transformers>=5.21``."""
    req = Requirement(requirement)
    return _written(req, [s for s in _ordered(req) if s.startswith((">", "!="))])


def floor(requirement: str) -> str:
    """A requirement pinned to its floor: ``transformers>=5.21,<5.26`` -> ``transformers==5.21``."""
    req = Requirement(requirement)
    floors = [s.version for s in req.specifier if s.operator == ">="]
    return _written(req, [f"=={floors[0]}"] if floors else [])


def oldest_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Runtime and ``dev`` requirements of the package pinned to their floors."""
    return [floor(str(r)) for r in _requirements(pyproject)]


def latest_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Runtime and ``dev`` requirements of the package with their upper bounds dropped."""
    return [unbounded(str(r)) for r in _requirements(pyproject)]


def lock_versions(lock: Path) -> dict[str, str]:
    """Package -> version pinned by a pip-compile lock (``name==version`` lines)."""
    pins = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            req = Requirement(line.split("#")[0].strip())
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


def admitted(requirement_upper: dict[str, str], package: str, version: str) -> bool:
    """Whether ``version`` is below the declared upper bound of ``package`` (True when it has none)."""
    spec = requirement_upper.get(package)
    return spec is None or SpecifierSet(spec).contains(version, prereleases=True)


def declared_ranges(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Package -> its declared specifier set (runtime and ``dev``), e.g. ``{"transformers": ">=5.21,<5.26"}``."""
    return {canonicalize_name(r.name): ",".join(_ordered(r)) for r in _requirements(pyproject)}


def direct(pyproject: Path = ROOT / "pyproject.toml") -> tuple[str, ...]:
    """The packages whose versions a verdict reports: every declared one, then :data:`TRANSITIVE`."""
    return tuple(dict.fromkeys([*(canonicalize_name(r.name) for r in _requirements(pyproject)), *TRANSITIVE]))


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], check=True, cwd=ROOT)


def build(venv: Path, oldest: bool = False) -> Path:
    """An environment with the newest releases the unbounded ranges admit (or every floor, ``oldest``), and the
    package (editable)."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(python, "--upgrade", "pip")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(oldest_requirements() if oldest else latest_requirements()) + "\n")
    try:
        _pip(python, *(() if oldest else ("--upgrade", "--upgrade-strategy", "eager")), "-r", f.name)
    finally:
        os.unlink(f.name)
    _pip(python, "--no-deps", "-e", ".")
    return python


def installed(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): "
            "d.version for d in m.distributions()}))")  # fmt: skip
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def run_subset(python: Path, tests: list[str], report: Path) -> int:
    env = {**os.environ, "CANARY_REPORT": str(report)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT / "tools")) if p)
    cmd = [str(python), "-m", "pytest", "-q", "-m", "compat", "-p", PLUGIN, "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def verdict(rc: int, report: Path, versions: dict[str, str], locked: dict[str, str]) -> tuple[int, list[str]]:
    """(exit code, lines to print) from the pytest exit code and the plugin's failure records."""
    changed = [f"{p} {locked[p]} -> {versions[p]}" for p in direct() if p in versions and p in locked
               and versions[p] != locked[p]]  # fmt: skip
    failures = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    if rc == 0 and not failures:
        ranges = declared_ranges()
        ahead = [f"{p} {versions[p]}" for p in direct() if p in versions and not admitted(ranges, p, versions[p])]
        lines = ["canary: the compatibility subset passed on "
                 + ", ".join(f"{p} {versions[p]}" for p in direct() if p in versions)]
        if ahead:
            lines.append("canary: passed on releases the ranges do not admit yet (raise their bounds in "
                         "pyproject.toml, then make lock): " + ", ".join(ahead))
        return 0, lines
    if not failures:
        what = f"pytest exited {rc} with no failing test recorded"
        return 1, [f"canary: the compatibility subset failed on the newest releases ({what}); changed since the "
                   f"lock: {', '.join(changed) or 'nothing'}"]
    first = next((f for f in failures if f["blame"]), failures[0])
    more = f" (+{len(failures) - 1} more failures)" if len(failures) > 1 else ""
    if first["blame"]:
        dist = first["blame"]
        was = f" (lock: {locked[dist]})" if dist in locked and locked[dist] != versions.get(dist) else ""
        who = f"{dist} {versions.get(dist, first['version'])}{was} breaks sensitivity"
    else:
        who = f"the newest releases break sensitivity (changed since the lock: {', '.join(changed) or 'nothing'})"
    return 1, [f"canary: {who}: {first['error']} [{first['where']}]{more}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-latest", help="environment to build and use")
    parser.add_argument("--python", type=Path, help="run in this interpreter's environment instead (no install)")
    parser.add_argument("--no-install", action="store_true", help="use --venv as it is")
    parser.add_argument("--oldest", action="store_true", help="install every range's floor instead of the newest")
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements" / "lock.txt")
    parser.add_argument("tests", nargs="*", default=["tests"], help="test paths (default: tests; -m compat selects)")
    args = parser.parse_args(argv)
    if args.python is not None:
        python = args.python
    elif args.no_install:
        python = args.venv / "bin" / "python"
    else:
        python = build(args.venv, oldest=args.oldest)
    versions = installed(python)
    locked = lock_versions(args.lock) if args.lock.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "failures.jsonl"
        rc = run_subset(python, args.tests, report)
        code, lines = verdict(rc, report, versions, locked)
    for line in lines:
        print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())

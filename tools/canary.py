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
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "canary_plugin"  # tools/canary_plugin.py, loaded into the pytest run inside the canary environment
DIRECT = ("torch", "transformers", "captum", "pandas", "seaborn", "tqdm", "safetensors", "scipy", "pyyaml",
          "tokenizers", "jinja2", "lm-eval", "ray", "numpy", "huggingface-hub", "accelerate", "pydantic",
          "kernels", "pytest", "nbclient", "hypothesis")  # fmt: skip


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def unbounded(requirement: str) -> str:
    """A PEP 508 requirement with its upper bounds (``<``, ``<=``, ``==``, ``~=``) dropped, floors and extras
    kept: ``transformers>=5.21,<5.26`` -> ``transformers>=5.21``."""
    req, _, marker = requirement.partition(";")
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*(.*)$", req)
    head, specs = match.group(1), match.group(2)
    kept = [s.strip() for s in specs.split(",") if s.strip().startswith((">", "!="))]
    out = head + ",".join(kept)
    return f"{out}; {marker.strip()}" if marker else out


def floor(requirement: str) -> str:
    """A requirement pinned to its floor: ``transformers>=5.21,<5.26`` -> ``transformers==5.21``."""
    req, _, marker = requirement.partition(";")
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*(.*)$", req)
    floors = [s.strip()[2:] for s in match.group(2).split(",") if s.strip().startswith(">=")]
    out = f"{match.group(1)}=={floors[0]}" if floors else match.group(1)
    return f"{out}; {marker.strip()}" if marker else out


def oldest_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Runtime and ``dev`` requirements of the package pinned to their floors."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [floor(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def latest_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Runtime and ``dev`` requirements of the package with their upper bounds dropped."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [unbounded(r) for r in reqs]


def lock_versions(lock: Path) -> dict[str, str]:
    """Package -> version pinned by a pip-compile lock (``name==version`` lines)."""
    pins = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, _, version = line.split(";")[0].strip().partition("==")
            pins[_name(name)] = version.strip()
    return pins


def admitted(requirement_upper: dict[str, str], package: str, version: str) -> bool:
    """Whether ``version`` is below the declared upper bound of ``package`` (True when it has none)."""
    from packaging.specifiers import SpecifierSet

    spec = requirement_upper.get(package)
    return spec is None or SpecifierSet(spec).contains(version, prereleases=True)


def declared_ranges(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Package -> its declared specifier set (runtime and ``dev``), e.g. ``{"transformers": ">=5.21,<5.26"}``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    out = {}
    for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = r.split(";")[0]
        out[_name(req)] = re.sub(r"^[A-Za-z0-9_.\-]+(\[[^\]]*\])?", "", req.strip()).strip()
    return out


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
    changed = [f"{p} {locked[p]} -> {versions[p]}" for p in DIRECT if p in versions and p in locked
               and versions[p] != locked[p]]  # fmt: skip
    failures = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    if rc == 0 and not failures:
        ranges = declared_ranges()
        ahead = [f"{p} {versions[p]}" for p in DIRECT if p in versions and not admitted(ranges, p, versions[p])]
        lines = ["canary: the compatibility subset passed on "
                 + ", ".join(f"{p} {versions[p]}" for p in DIRECT if p in versions)]
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

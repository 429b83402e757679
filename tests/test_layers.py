"""The package's layers: stages sit on the core and import each other only downwards, only through a package's
public surface, and never a private name of another package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sensitivity"

# Lower rank = lower layer. A package may import its own modules and any package of lower rank.
RANK = {"data": 0, "core": 1, "eval": 2, "zoo": 3, "probes": 3, "attribution": 3, "allocation": 4, "pruning": 5,
        "explain": 6, "report": 7, "jobs": 8, "cli": 9, "__init__": 9, "__main__": 10}  # fmt: skip
FOUNDATION = {"data", "core"}  # whose modules anyone may import; stages are imported through their package only
ANYONE = {("core", "spec")}  # imports nothing of the package itself, so even data may use its field types
STAGES = {"eval", "probes", "attribution", "allocation", "pruning", "explain", "report"}


def _package(module: Path) -> str:
    parts = module.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def _imports(path: Path):
    """(target package, target module path within it, imported names, line) of every sensitivity import."""
    module_parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_init = module_parts[-1] == "__init__"
    here = module_parts[:-1] if not is_init else module_parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "sensitivity":
                target = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            if not target:  # ``from .. import jobs``: each name is a package or module
                for name in names:
                    yield name, [name], [], node.lineno
            else:
                yield target[0], target[1:], names, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "sensitivity" and len(a.name.split(".")) > 1:
                    parts = a.name.split(".")[1:]
                    yield parts[0], parts[1:], [], node.lineno


def test_stages_import_only_lower_layers_through_their_public_surface():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        own = _package(path)
        for target, rest, names, line in _imports(path):
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            if target == own or target not in RANK or (target, *rest[:1]) in ANYONE:
                continue
            if RANK[target] >= RANK[own]:
                problems.append(f"{where}: {own} (layer {RANK[own]}) imports {target} (layer {RANK[target]})")
            if target in STAGES and rest and own in STAGES:
                problems.append(f"{where}: {own} reaches into {target}.{'.'.join(rest)}; import from {target}")
            if any(part.startswith("_") for part in rest) or any(n.startswith("_") for n in names):
                problems.append(f"{where}: {own} imports a private name of {target}: {rest} {names}")
    assert problems == []


def test_the_spec_module_imports_nothing_of_the_package():
    assert list(_imports(ROOT / "core" / "spec.py")) == []


def test_the_core_does_not_depend_on_any_stage():
    for path in sorted((ROOT / "core").rglob("*.py")):
        targets = {t for t, *_ in _imports(path)}
        assert not targets & (STAGES | {"zoo", "jobs", "cli"}), path

"""The package uses no non-public name of another library that ``PRIVATE_SURFACES`` does not list."""

import ast
from pathlib import Path

import pytest

import sensitivity
from sensitivity.core.surfaces import PRIVATE_SURFACES, Surface, missing_surfaces

pytestmark = pytest.mark.compat  # the compatibility subset (make test-latest)

PACKAGE = Path(sensitivity.__file__).parent


def _private_import(module: str) -> bool:
    """transformers: anything below the top-level namespace but its logging utilities; elsewhere a ``_`` part."""
    parts = module.split(".")
    if parts[0] == "transformers":
        return len(parts) > 1 and parts[:3] != ["transformers", "utils", "logging"]
    return any(p.startswith("_") for p in parts)


def scan(root: Path = PACKAGE) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(imported non-public names, ``.attr`` reads of non-public attributes this package does not define), each
    with the places they occur."""
    trees = {p: ast.parse(p.read_text()) for p in sorted(root.rglob("*.py"))}
    own = set()  # private names the package defines: functions, classes, attributes of its own objects
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and (
                    node.attr.startswith("_sensitivity") or getattr(node.value, "id", None) in ("self", "cls")):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                own.add(node.target.id)
    imports, attributes = {}, {}
    for path, tree in trees.items():
        where = lambda node: f"{path.relative_to(root.parent)}:{node.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] != "__future__":
                for alias in node.names:
                    if _private_import(node.module) or alias.name.startswith("_"):
                        imports.setdefault(f"{node.module}:{alias.name}", []).append(where(node))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _private_import(alias.name):
                        imports.setdefault(alias.name, []).append(where(node))
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                receiver = node.value.id if isinstance(node.value, ast.Name) else None
                if receiver not in ("self", "cls") and node.attr not in own:
                    attributes.setdefault(node.attr, []).append(where(node))
    return imports, attributes


def test_every_non_public_name_used_is_listed():
    imports, attributes = scan()
    listed = {s.name for s in PRIVATE_SURFACES}
    listed_attrs = {s.name.rsplit(".", 1)[1] for s in PRIVATE_SURFACES if "." in s.name.split(":")[1]}
    unlisted = [f"{name} at {places[0]}" for name, places in imports.items() if name not in listed]
    unlisted += [f".{attr} at {places[0]}" for attr, places in attributes.items() if attr not in listed_attrs]
    assert not unlisted, "non-public names not in sensitivity.core.surfaces.PRIVATE_SURFACES: " + "; ".join(unlisted)
    used = set(imports) | {s.name for s in PRIVATE_SURFACES if s.name.rsplit(".", 1)[-1] in attributes}
    assert listed <= used, f"listed but no longer used: {sorted(listed - used)}"


def test_no_hf_mixer_or_norm_class_is_imported_by_name():
    imports, _ = scan()
    assert not [name for name in imports if name.startswith("transformers.models.")]


def test_scan_catches_a_new_private_import_and_attribute(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer\n"
                              "from transformers import AutoConfig\nimport transformers.utils.logging\n"
                              "def f(m, config):\n    m._sensitivity_x = 1\n    config._set = 2\n"
                              "    return m._sensitivity_x, config._secret\n")
    imports, attributes = scan(pkg)
    assert imports == {"transformers.models.mamba2.modeling_mamba2:Mamba2Mixer": ["pkg/a.py:1"]}
    assert attributes == {"_set": ["pkg/a.py:6"], "_secret": ["pkg/a.py:7"]}


def test_listed_surfaces_exist_in_the_installed_libraries():
    assert missing_surfaces() == []


def test_a_missing_surface_is_named_with_its_distribution_and_version(monkeypatch):
    import transformers

    from sensitivity.core import surfaces

    fake = Surface("transformers.masking_utils:create_causal_mask_v2", "x", "y")
    monkeypatch.setattr(surfaces, "PRIVATE_SURFACES", (fake,))
    assert missing_surfaces() == [f"transformers.masking_utils:create_causal_mask_v2 (transformers "
                                  f"{transformers.__version__})"]


@pytest.mark.parametrize("surface", PRIVATE_SURFACES, ids=lambda s: s.name)
def test_each_surface_says_where_and_why(surface):
    module = surface.used_in.replace(".", "/") + ".py"
    assert (PACKAGE.parent / module).is_file(), surface.used_in
    assert len(surface.why) > 40

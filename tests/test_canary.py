"""The canary (tools/canary.py): unbounded ranges, its verdict lines, and a real run that a broken release fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import canary  # noqa: E402


@pytest.mark.parametrize("declared,latest", [
    ("transformers>=5.21,<5.26", "transformers>=5.21"),
    ("lm-eval[hf]>=0.4.13,<0.4.14", "lm-eval[hf]>=0.4.13"),
    ("torch>=2.13,<=2.14.1", "torch>=2.13"),
    ("pandas>=2.2,!=3.0.0,<3.2", "pandas>=2.2,!=3.0.0"),
    ("captum~=0.9", "captum"),
    ("ray==2.60.0; python_version < '3.14'", 'ray; python_version < "3.14"'),
])  # fmt: skip
def test_upper_bounds_are_dropped_and_floors_kept(declared, latest):
    assert canary.unbounded(declared) == latest


def test_every_declared_dependency_has_a_floor_and_an_upper_bound():
    ranges = canary.declared_ranges()
    assert {"torch", "transformers", "lm-eval", "ray", "pandas", "captum"} <= set(ranges)
    for package, spec in ranges.items():
        assert ">=" in spec and "<" in spec, f"{package}{spec}"
    assert all("<" not in r for r in canary.latest_requirements())


def _verdict(tmp_path, rc, failures, versions, locked):
    report = tmp_path / "f.jsonl"
    report.write_text("".join(json.dumps(f) + "\n" for f in failures))
    return canary.verdict(rc, report, versions, locked)


def test_a_failure_names_the_package_its_version_and_the_lock(tmp_path):
    failure = {"where": "tests/core/test_hybrid.py::test_x", "error": "AttributeError: no attribute 'chunk_size'",
               "blame": "transformers", "version": "5.26.0"}
    code, lines = _verdict(tmp_path, 1, [failure, {**failure, "blame": None}], {"transformers": "5.26.0"},
                           {"transformers": "5.25.0"})
    assert code == 1
    assert lines == ["canary: transformers 5.26.0 (lock: 5.25.0) breaks sensitivity: AttributeError: no attribute "
                     "'chunk_size' [tests/core/test_hybrid.py::test_x] (+1 more failures)"]


def test_a_failure_inside_the_package_names_what_changed_since_the_lock(tmp_path):
    failure = {"where": "tests/t.py::test_y", "error": "AssertionError: 1e-3 > 1e-5", "blame": None, "version": None}
    code, lines = _verdict(tmp_path, 1, [failure], {"torch": "2.14.1", "pandas": "3.1.1"},
                           {"torch": "2.13.0", "pandas": "3.1.1"})
    assert code == 1 and lines == ["canary: the newest releases break sensitivity (changed since the lock: torch "
                                   "2.13.0 -> 2.14.1): AssertionError: 1e-3 > 1e-5 [tests/t.py::test_y]"]


def test_a_pass_on_a_release_beyond_the_ranges_says_to_raise_the_bound(tmp_path):
    code, lines = _verdict(tmp_path, 0, [], {"transformers": "9.0.0", "torch": "2.13.0"}, {})
    assert code == 0
    assert lines[0] == "canary: the compatibility subset passed on torch 2.13.0, transformers 9.0.0"
    assert lines[1].endswith("raise their bounds in pyproject.toml, then make lock): transformers 9.0.0")


def test_the_canary_fails_with_one_line_on_a_release_missing_a_name(tmp_path):
    """A transformers whose masking_utils lost ``create_causal_mask`` (as a release that renames it would be)."""
    (tmp_path / "sitecustomize.py").write_text("import transformers.masking_utils as m\ndel m.create_causal_mask\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "canary.py"), "--python", sys.executable,
                          "tests/core/test_surfaces.py"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)  # fmt: skip
    import transformers

    assert run.returncode == 1
    assert run.stdout.splitlines()[-1] == (
        f"canary: transformers {transformers.__version__} breaks sensitivity: ImportError: cannot import name "
        "'create_causal_mask' from 'transformers.masking_utils' [import sensitivity.core.runner "
        "(sensitivity/core/runner.py:23)] (+1 more failures)")

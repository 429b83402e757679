"""The tutorial notebooks: they equal what ``notebooks/build_notebooks.py`` builds, and each one runs top to bottom.

Execution (``slow``) runs every ``notebooks/*.ipynb`` in a fresh ``python3`` kernel whose working directory is a
temporary directory, so whatever a notebook writes (``runs/...``) lands there, never in the repository.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

from sensitivity import zoo_path

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_MARK = "KERNEL-INTERPRETER"


def _build_module():
    """notebooks/build_notebooks.py as a module (without leaving a __pycache__ in notebooks/)."""
    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOK_DIR / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = write_bytecode
    return module


def _n_layers() -> int:
    return json.loads((zoo_path("default") / "config.json").read_text())["num_hidden_layers"]


def _text(nb: nbformat.NotebookNode) -> str:
    """Every stdout stream and ``text/plain`` result of the executed notebook, in cell order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stdout":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _listing() -> list[str]:
    """Entries of the repository root and of notebooks/ (where a notebook with the wrong cwd would write)."""
    return sorted(str(p.relative_to(REPO)) for d in (REPO, NOTEBOOK_DIR) for p in d.iterdir())


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no output matching {pattern!r}"
    return float(m.group(1))


def _check_01(text: str) -> None:
    assert f"default: mamba2, {_n_layers()} layers" in text
    assert _number(r"max \|instrumented - transformers\| logits: (\S+)", text) <= 1e-5
    assert _number(r"tiny:mamba max \|instrumented - transformers\| logits: (\S+)", text) <= 1e-5
    assert "a view of in_proj.weight: True" in text


def _check_02(text: str) -> None:
    assert _number(r"(\d+) probes of default", text) > 0
    assert "spearman" in text and "grad_x_act" in text


def _check_03(text: str) -> None:
    assert "schedule YAML round trip equal: True" in text
    assert "(same as in memory: True)" in text
    assert (Path.cwd() / "runs" / "wanda-sensitivity50" / "pruning_manifest.json").is_file()  # written in the tmp dir
    for name in ("uniform", "owl", "sensitivity"):
        assert re.search(rf"^{name}\s+overall 0\.5000, 48 entries", text, re.M), name


def _check_04(text: str) -> None:
    assert "wanda at 50% sparsity: healthy." in text
    assert "head at 50% sparsity: collapsed." in text
    assert _number(r"worst: head \(x(\S+) perplexity\)", text) >= 2.0
    assert "live heads (mean over layers): {'wanda': 1.0, 'magnitude': 1.0, 'head': 0.5}" in text
    assert "head, no bias compensation at 50% sparsity:" in text
    # both planted faults are named by the top restoration, each recovering the whole loss gap
    found = re.findall(r"^(\w+): .*; top restoration .* \((\d+)% recovered\) -> found: (\w+)$", text, re.M)
    assert found == [("conv1d_zeroed", "100", "True"), ("dt_bias_shifted", "100", "True")], found


def _check_05(text: str) -> None:
    assert "default-hybrid: bamba, 8 layers" in text and "2 attention+mlp" in text
    assert "most damaging removal: ('0 ssm+mlp', 'mixer')" in text
    assert "most WANDA-sensitive unit: ssm" in text
    assert re.search(r"^ranking at 50%: wanda .* < SSM heads$", text, re.M)


def _check_06(text: str) -> None:
    assert re.search(r"^dense recall@8: (0\.9\d|1\.00); head 50% recall@8: 0\.[0-2]\d$", text, re.M)
    assert "least damaged on perplexity: state; on recall@16: wanda" in text
    assert re.search(r"^recall damage peaks in layer 0; text damage in layer [1-8]$", text, re.M)


# Concrete outputs to check, by notebook prefix; a notebook without an entry is only checked to run without error.
CHECKS = {"01": _check_01, "02": _check_02, "03": _check_03, "04": _check_04, "05": _check_05, "06": _check_06}


def test_at_least_three_notebooks():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


def test_notebooks_match_their_build_script(tmp_path):
    """The committed notebooks are exactly what build_notebooks.py writes (sources, ids, metadata, no outputs)."""
    build = _build_module()
    written = build.build(tmp_path)
    assert sorted(p.name for p in written) == [p.name for p in NOTEBOOKS], (
        "notebooks/*.ipynb and build_notebooks.NOTEBOOKS list different notebooks; run "
        "`python notebooks/build_notebooks.py`"
    )
    for path in written:
        built, committed = json.loads(path.read_text()), json.loads((NOTEBOOK_DIR / path.name).read_text())
        sources = lambda nb: [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]
        assert sources(committed) == sources(built), (
            f"{path.name} differs from its source in build_notebooks.py; edit the script and rerun "
            "`python notebooks/build_notebooks.py` (do not edit the .ipynb by hand)"
        )
        assert committed == built, f"{path.name}: outputs, ids or metadata differ from a fresh build; rerun the script"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(path, as_version=4)
    # Which interpreter did "python3" resolve to? It must be this test's environment (the package under test).
    probe_cell = f"import sys\nprint({KERNEL_MARK!r}, sys.executable, sys.prefix, sep='|')"
    nb.cells.append(nbformat.v4.new_code_cell(probe_cell, id="interpreter-check"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    repo_before = _listing()
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError (naming the cell) if any cell fails
    print(f"{path.name} executed in {time.perf_counter() - started:.1f} s")

    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors, errors
    text = _text(nb)
    line = next(li for li in text.splitlines() if li.startswith(KERNEL_MARK))
    _, executable, prefix = line.split("|")
    assert Path(prefix) == Path(sys.prefix), f"kernel ran {executable} (prefix {prefix}), tests run in {sys.prefix}"
    assert Path(executable).is_relative_to(sys.prefix), executable
    assert _listing() == repo_before, "the notebook wrote into the repository instead of its working directory"
    check = CHECKS.get(path.name[:2])
    if check is not None:
        check(text)

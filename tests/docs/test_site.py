"""The documentation: a short README, generated content that is current, an API reference with no empty entry, and
a site checker that finds what a reader would (the examples themselves run through ``conftest.py``)."""

from __future__ import annotations

import csv
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))
sys.path.insert(0, str(ROOT / "tools"))
import hooks  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python", "console", "sh", "text", "yaml", "bibtex"}


def _fences(text: str) -> list[tuple[int, str, str]]:
    """(line, language, body) of every fenced block."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, language = i, lines[i][3:].strip()
            i += 1
            while not lines[i].startswith("```"):
                i += 1
            out.append((start + 1, language, "\n".join(lines[start + 1 : i])))
        i += 1
    return out


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().split("\n")
    assert len(lines) <= 200
    headings = [line for line in lines if line.startswith("## ")]
    assert {"## Two commands", "## Documentation", "## Citation"} <= set(headings)


def test_the_readme_generated_blocks_are_current():
    text = (ROOT / "README.md").read_text()
    assert "<!-- /gen -->" in text
    assert hooks.refresh(text) == text, "run `python docs/hooks.py README.md` and commit the result"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_says_what_it_is_and_every_skip_why(page):
    text = page.read_text()
    for line, language, _ in _fences(text):
        assert language in LANGUAGES, f"{page.name}:{line}: fence language {language!r}; allowed: {sorted(LANGUAGES)}"
    for skip in re.findall(r"<!-- skip:([^>]*)-->", text):
        assert re.search(r'"[^"]{10,}"', skip), f"{page.name}: a skip without its reason: {skip!r}"


def test_report_transcripts_show_the_kept_results():
    """The report's printed verdict table, shown (not run: 4-5 minutes) in the README and the CLI reference, matches
    ``benchmarks/results/report/verdicts.csv`` row for row."""
    with (ROOT / "benchmarks/results/report/verdicts.csv").open() as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    for page in (ROOT / "README.md", ROOT / "docs/reference/cli.md"):
        blocks = [b for _, lang, b in _fences(page.read_text()) if "report of default ->" in b]
        assert blocks, page
        shown = [line.split() for line in blocks[0].split("\n") if line.split() and line.split()[0] in rows]
        assert [s[0] for s in shown] == list(rows), page
        for label, sparsity, ratio, verdict, first, top, component in shown:
            r = rows[label]
            assert (float(sparsity), float(ratio)) == (float(r["sparsity"]), round(float(r["ppl_ratio"]), 3))
            assert (verdict, int(first), int(top), component) == (
                r["verdict"], int(r["first_layer"]), int(r["top_layer"]), r["top_component"])  # fmt: skip


def test_the_api_reference_has_no_empty_entry():
    """Every object the API pages document, and every public member rendered with it, has a docstring (or, for an
    attribute, an entry in its class's ``Attributes:`` section)."""
    griffe = pytest.importorskip("griffe")
    package = griffe.load("sensitivity", search_paths=[str(ROOT)], docstring_parser="google")
    documented = lambda obj: obj.docstring is not None and obj.docstring.value.strip()  # noqa: E731
    empty = []
    for ident in hooks._owners():
        obj = package[ident.removeprefix("sensitivity.")]
        obj = obj.final_target if obj.is_alias else obj
        if not documented(obj):
            empty.append(ident)
        if not obj.is_class:
            continue
        listed = {a.name for s in (obj.docstring.parse("google") if obj.docstring else ())
                  if s.kind.value == "attributes" for a in s.value}  # fmt: skip
        for name, member in obj.members.items():
            if name.startswith("_") or member.is_alias or (member.is_attribute and name in listed):
                continue
            if not documented(member):
                empty.append(f"{ident}.{name}")
    assert not empty, f"{len(empty)} API entries without a docstring: {', '.join(empty)}"


def test_exports_are_followed_to_their_definition_without_importing():
    exports = hooks._exports("sensitivity")
    assert exports["prune"] == "sensitivity.pruning.api"
    assert exports["Schedule"] == "sensitivity.allocation.schedule"
    assert hooks._exports("sensitivity.jobs")["JobSpec"] == "sensitivity.core.jobs"
    assert hooks._owners()["sensitivity.pruning.api.prune"] == "sensitivity.pruning"


def test_generated_tables_come_from_the_results_and_the_specs(tmp_path):
    results = tmp_path / "r.csv"
    results.write_text("label,ratio\na,1.23456\nb,2.5\n")
    table = hooks._table(str(results), "| label | x |\n| {label} | {ratio:.2f} |\nwhere ratio > 2")
    assert table == "| label | x |\n|---|---|\n| b | 2.50 |"
    nested = tmp_path / "n.json"
    nested.write_text('{"models": {"m1": {"s": {"exact": 10.0, "fast": 0.5}}}}')
    nested_table = hooks._table(f"{nested} models", "| model | x |\n| {key} | {s[exact]:.0f}/{s[fast]} |")
    assert nested_table.endswith("| m1 | 10/0.5 |")
    escaped = hooks._table(str(results), "| a \\| b | x |\n| {label} | {ratio:.1f} |")
    assert escaped.split("\n")[1] == "|---|---|"
    spec = hooks.generate("spec", " prune", None)
    assert re.search(r"^\| `sparsity` \| .* \| `null` \|", spec, re.M)
    assert "--sparsity" in hooks.generate("cli", " prune", None)
    with pytest.raises(hooks.GenError, match=r"unknown directive gen:nope; allowed: table, cli"):
        hooks.generate("nope", "", None)
    with pytest.raises(hooks.GenError, match=r"gen:spec: no job 'prunes'; allowed: .*prune"):
        hooks.generate("spec", "prunes", None)


def test_the_site_checker_finds_broken_links_missing_images_and_anchors(tmp_path):
    pytest.importorskip("playwright")
    import check_site

    if shutil.which("chromium") is None and not __import__("os").environ.get("CHROMIUM"):
        pytest.skip("no Chromium here (make docs-check installs it)")
    (tmp_path / "index.html").write_text(
        '<h1 id="top">Site</h1><a href="other.html#there">ok</a> <a href="other.html#nowhere">bad anchor</a> '
        '<a href="missing.html">missing page</a> <img src="missing.png"> <a href="https://example.org">outside</a>'
    )
    (tmp_path / "other.html").write_text('<p id="there">here</p><a href="index.html#top">back</a>')
    problems, pages = check_site.check(tmp_path)
    assert pages == 2
    assert sorted(problems) == sorted([
        f"index.html: {(tmp_path / 'missing.png').as_uri()} failed to load (net::ERR_FILE_NOT_FOUND)",
        f"index.html: image {(tmp_path / 'missing.png').as_uri()} does not decode",
        f"index.html: link to {(tmp_path / 'other.html').as_uri()}#nowhere (no anchor #nowhere)",
        f"index.html: link to {(tmp_path / 'missing.html').as_uri()} (no such file)",
    ])  # fmt: skip


def test_the_grid_table_is_the_grid_csv():
    table = hooks.generate("grid", " benchmarks/results/grid/grid.csv default", None)
    with (ROOT / "benchmarks/results/grid/grid.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == "default"]
    wanda = next(r for r in rows if r["label"] == "wanda" and float(r["sparsity"]) == 0.5)
    removed = (5_820_864 - int(wanda["nonzero"])) / (5_820_864 - 8192 * 256)  # the default: vocab 8192, width 256
    row = next(line for line in table.split("\n") if line.startswith("| wanda |"))
    assert row.split(" | ")[2] == f"{float(wanda['perplexity']):.1f} (x{float(wanda['ppl_ratio']):.2f}, {removed:.0%})"
    assert table.split("\n")[0] == "| method | 0.25 | 0.5 | 0.75 |"
    with pytest.raises(hooks.GenError, match="no rows of model 'nope'"):
        hooks.generate("grid", "benchmarks/results/grid/grid.csv nope", None)


def test_the_site_checker_refuses_a_folder_without_a_site(tmp_path, capsys):
    import check_site

    assert check_site.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"check_site: {tmp_path} holds no index.html; build it first (make docs)\n"


def test_transcripts_match_elisions_durations_and_numbers_within_tolerance():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_runner", ROOT / "conftest.py")  # the root conftest
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    _matches = runner._matches

    assert _matches(["pruned in 4.07 s -> out", "...", "perplexity  63.298"],
                    ["pruned in 0.12 s -> out", "a", "b", "perplexity  63.300"])  # fmt: skip
    assert not _matches(["perplexity  63.298"], ["perplexity  63.400"])
    assert not _matches(["--method METHOD"], ["--methods METHOD"])
    assert not _matches(["a", "b"], ["a"])

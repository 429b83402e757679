"""Every example in the docs runs (collected by pytest from ``README.md`` and ``docs/**/*.md`` through Sybil).

Each page runs top to bottom in a fresh working directory (with an empty ``runs/``), so a later block may use what an
earlier one wrote:

- ``python`` blocks are executed, in one namespace per page. A block whose first line is ``# NAME.py`` is instead
  written to ``NAME.py`` in the working directory and compiled (a module the page's commands import and run).
- ``console`` blocks are transcripts: each ``$ COMMAND`` line runs in bash and its output must match the lines below
  it. In the expected text a line ``...`` stands for any number of lines and ``...`` inside a line for any text;
  numbers match within 2 units of their last shown digit or 0.05%, and durations (``2.19 s``) match any duration.
  Standard error counts only when the command fails.
- ``sh`` blocks are commands to type (set-up, a multi-node cluster, training runs of hours): their ``sensitivity``
  job commands are checked with ``--print-spec``, which validates every flag without running the job.

A fence language outside these (``text``, ``yaml``, ``bibtex``) marks output shown for reading, and no block is
left without one. ``<!-- skip: next "reason" -->`` skips one block; ``tests/docs/test_site.py`` checks that every
skip gives its reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, SkipParser

from sensitivity.jobs import JOBS  # the job names the command line has (torch-free)

ROOT = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?")
_DURATION = re.compile(r"\d+(?:\.\d+)? (?:s|ms|min)\b")


def _env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COLUMNS"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               COLUMNS="80", HOME=str(cwd.parent), PYTHONHASHSEED="0")  # fmt: skip
    return env


def _setup(namespace: dict) -> None:
    cwd = Path(tempfile.mkdtemp(prefix="sensitivity-docs-")) / "work"
    (cwd / "runs").mkdir(parents=True)
    namespace["__cwd__"], namespace["__old_cwd__"] = cwd, os.getcwd()
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))


def _teardown(namespace: dict) -> None:
    if (namespace["__cwd__"] / "ray-start.log").exists():  # a page that started a Ray cluster stops it, even failing
        subprocess.run([str(BIN / "ray"), "stop"], capture_output=True, timeout=120, env=_env(namespace["__cwd__"]))
    os.chdir(namespace["__old_cwd__"])
    sys.path.remove(str(namespace["__cwd__"]))
    shutil.rmtree(namespace["__cwd__"].parent, ignore_errors=True)


def _pattern(line: str) -> re.Pattern:
    """A regular expression for one expected line: ``...`` any text, durations any duration, numbers any number
    (compared afterwards within tolerance)."""
    out, pos = [], 0
    for m in re.finditer(r"\.\.\.|" + _DURATION.pattern + "|" + _NUMBER.pattern, line):
        out.append(re.escape(line[pos:m.start()]))
        text = m.group(0)
        out.append(".*?" if text == "..." else r"\d+(?:\.\d+)? (?:s|ms|min)" if _DURATION.fullmatch(text)
                   else r"(-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?)")  # fmt: skip
        pos = m.end()
    out.append(re.escape(line[pos:]))
    return re.compile("".join(out) + r"\s*$")


def _close(expected: str, actual: str) -> bool:
    e, a = float(expected.replace(",", "")), float(actual.replace(",", ""))
    decimals = len(expected.split(".")[1]) if "." in expected and "e" not in expected else 0
    return abs(e - a) <= max(2 * 10.0**-decimals, 5e-4 * abs(e))


def _line_matches(expected: str, actual: str) -> bool:
    if expected.rstrip() == actual.rstrip():
        return True
    m = _pattern(expected.rstrip()).match(actual)
    if m is None:
        return False
    wanted = [t for t in re.findall(r"\.\.\.|" + _DURATION.pattern + "|" + _NUMBER.pattern, expected)
              if t != "..." and not _DURATION.fullmatch(t)]  # fmt: skip
    return all(_close(w, g) for w, g in zip(wanted, m.groups()))


def _matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` lines match ``expected`` (a ``...`` line matches any run of lines)."""
    if not expected:
        return not actual
    if expected[0].strip() == "...":
        return any(_matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and _line_matches(expected[0], actual[0]) and _matches(expected[1:], actual[1:])


def _trim(lines: list[str]) -> list[str]:
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _commands(source: str) -> list[tuple[str, list[str]]]:
    """``$ COMMAND`` lines (with ``\\`` continuations) and the expected output under each."""
    runs: list[tuple[str, list[str]]] = []
    lines = source.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            runs.append((command, []))
        elif runs:
            runs[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"a console block starts with {line!r}, not a '$ ' command")
        i += 1
    return runs


def _run(command: str, cwd: Path, timeout: float = 900) -> tuple[int, str, str]:
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=_env(cwd), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    return done.returncode, done.stdout, done.stderr


_UPDATES: list[tuple[str, str, str]] = []
"""(file, old block, new block) to write when ``SENSITIVITY_DOCS_UPDATE=1`` (a maintainer refreshing transcripts)."""


def evaluate_console(example) -> str | None:
    """Run a transcript's commands; a mismatch names the command and shows both outputs.

    With ``SENSITIVITY_DOCS_UPDATE=1`` a mismatching transcript without ``...`` elisions is rewritten with what the
    commands printed (review the diff before committing it).
    """
    cwd = example.namespace["__cwd__"]
    update = os.environ.get("SENSITIVITY_DOCS_UPDATE") == "1" and "..." not in example.parsed
    fresh, failure = [], None
    for command, expected in _commands(example.parsed):
        rc, out, err = _run(command, cwd)
        shown = out + (err if rc else "")
        fresh += [f"$ {command}", *_trim(shown.split("\n"))]
        if failure is None and not _matches(_trim(expected), _trim(shown.split("\n"))):
            failure = (f"$ {command}\n(exit {rc})\n--- expected\n" + "\n".join(_trim(expected)) + "\n--- got\n"
                       + shown + ("" if rc else "--- stderr\n" + err[-2000:]))  # fmt: skip
            if not update:
                return failure
    if failure and update:
        _UPDATES.append((str(example.path), str(example.parsed), "\n".join(fresh) + "\n"))
    return failure


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: D103
    for path, old, new in _UPDATES:
        text = Path(path).read_text()
        Path(path).write_text(text.replace(old, new, 1))


def evaluate_sh(example) -> str | None:
    """Check the job commands of a block of commands to type: every flag valid (``--print-spec``)."""
    cwd = example.namespace["__cwd__"]
    source = re.sub(r"\\\n\s*", " ", example.parsed)
    for line in source.split("\n"):
        line = re.sub(r"^\S+\$\s+", "", line).split("#")[0].strip()
        words = shlex.split(line) if line else []
        while words and re.fullmatch(r"\w+=\S*", words[0]):
            words.pop(0)
        if len(words) >= 2 and words[0] == "sensitivity" and words[1] in JOBS:
            rc, _, err = _run(shlex.join([*words, "--print-spec"]), cwd, timeout=120)
            if rc:
                return f"{line}\n{err}"
    return None


def evaluate_python(example) -> None:
    first = example.parsed.split("\n", 1)[0]
    if m := re.fullmatch(r"# (\w+\.py)", first.strip()):  # a module file: written, compiled, run by the page's commands
        (example.namespace["__cwd__"] / m.group(1)).write_text(example.parsed)
        compile(example.parsed, m.group(1), "exec")  # not executed here: its registrations would outlive the page
        return None
    return _PYTHON(example)


_PYTHON = PythonEvaluator()

pytest_collect_file = Sybil(
    parsers=[
        CodeBlockParser("python", evaluate_python),
        CodeBlockParser("console", evaluate_console),
        CodeBlockParser("sh", evaluate_sh),
        SkipParser(),
    ],
    patterns=["README.md", "docs/*.md", "docs/**/*.md"],
    setup=_setup,
    teardown=_teardown,
).pytest()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:  # noqa: D103
    for item in items:
        if Path(str(getattr(item, "path", ""))).suffix == ".md":
            item.add_marker(pytest.mark.docs)

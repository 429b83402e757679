"""The generated matrix: every field of every job spec (each method's options under that method) given each value of
a fixed pool that its spec refuses, on the command line and in a spec file run by ``sensitivity run``. Each case
must be refused cleanly: exit 2, one line naming the job, no traceback, nothing written.

Which values are bad is not listed by hand: a value is a case when validating the spec the flags make refuses it
(``jobs.spec_of``), so every field and every future field is walked. ``test_the_matrix_is_large`` keeps the count
honest (the docs' reliability page quotes it).
"""

from __future__ import annotations

import json

import pytest
import yaml

from sensitivity.cli.main import _build_parser, _spec_data
from sensitivity.core.spec import MAX_COUNT, SpecError
from sensitivity.jobs import JOBS, spec_of

from .conftest import cli, listing

FAST = ["--data", "text.txt", "--seqlen", "16"]
BASE = {  # a valid command per job (its fields then replaced one at a time)
    "evaluate": ["--model", "good", *FAST],
    "probe": ["--model", "good", *FAST, "--out", "new"],
    "attribute": ["--model", "good", *FAST, "--out", "new"],
    "agreement": ["--probes", "tables/p/probes.csv", "--attribution", "tables/a/attribution.csv", "--out", "new.csv"],
    "schedule": ["--model", "good", *FAST, "--budget", "0.5", "--out", "new.yaml"],
    "prune": ["--model", "good", *FAST, "--sparsity", "0.5", "--out", "new"],
    "explain": ["--dense", "good", *FAST, "--sparsity", "0.5", "--out", "new"],
    "report": ["--model", "good", *FAST, "--out", "new"],
    "grid": ["--models", "good", *FAST, "--out", "new"],
}
DEFAULT_METHOD = {"schedule": "uniform", "prune": "magnitude", "explain": "magnitude"}
# Values tried in every field, as a command line would give them (strings).
POOL = ["", "0", "-1", "1.5", "nan", "x", str(MAX_COUNT + 1), "4294967296", ",", "0,1", "3:2"]
# Values tried in every field of a spec file (YAML types a command line cannot give).
TYPED = [None, True, [], {"a": 1}, -1, 1.5, "nope", 2**70]

_parser, _flags = _build_parser()


def _args(job: str, method: str | None) -> list[str]:
    return [job, *BASE[job], *(["--method", method] if method else [])]


def _data(argv: list[str]) -> dict:
    args = _parser.parse_args(argv)
    return _spec_data(args, _flags[argv[0]])


def _refused(data: dict) -> bool:
    try:
        spec_of(data)
    except SpecError:
        return True
    return False


def _fields(job: str):
    """(method, flag, dest) for every field of the job's spec and every option of every method."""
    spec = JOBS[job].options
    dests = _flags[job]
    table = spec.method_table
    for flag, dest in dests.items():
        head, _, option = dest.partition(".")
        if dest in ("job", "method") or (spec.model_fields.get(head) and spec.model_fields[head].annotation is bool):
            continue
        if option:  # a method's option: under the first method that takes it
            method = next(m for m in table if option in table[m].options.model_fields)
            if table[method].options.model_fields[option].annotation is not bool:
                yield method, flag, dest
        else:
            yield DEFAULT_METHOD.get(job), flag, dest


def _flag_cases() -> list:
    cases = []
    for job in BASE:
        for method, flag, _ in _fields(job):
            base = _args(job, method)
            for value in POOL:
                argv = [*base, flag, value]
                try:
                    data = _data(argv)
                except SystemExit:  # argparse refused it (one line, tested in test_bad_inputs)
                    continue
                if _refused(data):
                    cases.append(pytest.param(argv, flag, id=f"{job}-{method or '-'}-{flag}={value!r}"))
    return cases


def _file_cases() -> list:
    cases = []
    for job in BASE:
        spec = JOBS[job].options
        table, default = spec.method_table, DEFAULT_METHOD.get(job)
        fields = [(default, n) for n in spec.model_fields if n not in ("job", "options")]
        if "options" in spec.model_fields:  # each option under the first method that takes it
            options = dict.fromkeys(o for m in table for o in table[m].options.model_fields)
            fields += [(next(m for m in table if o in table[m].options.model_fields), f"options.{o}") for o in options]
        for method, name in fields:
            data = _data(_args(job, method))
            for value in TYPED:
                head, _, option = name.partition(".")
                bad = json.loads(json.dumps(data, default=str))
                if option:
                    bad.setdefault("options", {})[option] = value
                else:
                    bad[head] = value
                if _refused(bad):
                    cases.append(pytest.param(bad, name, id=f"{job}-{method or '-'}-{name}={value!r}"))
    return cases


FLAG_CASES = _flag_cases()
FILE_CASES = _file_cases()


def _clean(workspace, argv: list[str], job: str) -> str:
    before = listing(workspace)
    code, _, err = cli(*argv)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err[-2000:]
    assert code == 2, f"exit {code}: {err.strip()[-500:]}"
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sensitivity {job}: error: "), lines[0]
    assert listing(workspace) == before
    return lines[0]


@pytest.fixture(scope="module")
def tables(workspace):
    """A probes and an attribution table for agreement (made once, then part of the workspace)."""
    import os

    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        if not (workspace / "tables").exists():
            (workspace / "tables").mkdir()
            for args in (["probe", "--windows", "2", "--calib-windows", "2", "--kinds", "zero", "--top", "0"],
                         ["attribute", "--windows", "2", "--methods", "act_norm"]):  # fmt: skip
                code, _, err = cli(args[0], "--model", "good", *FAST, *args[1:], "--out", f"tables/{args[0][0]}")
                assert code == 0, err
    finally:
        os.chdir(cwd)
    return workspace / "tables"


@pytest.mark.parametrize("argv,flag", FLAG_CASES)
def test_every_bad_flag_value_is_refused_cleanly(workspace, tables, monkeypatch, argv, flag):
    monkeypatch.chdir(workspace)
    line = _clean(workspace, argv, argv[0])
    assert f"argument {flag}" in line or "argument --" in line or flag.removeprefix("--") in line, line


@pytest.mark.parametrize("data,field", FILE_CASES)
def test_every_bad_spec_file_value_is_refused_cleanly(workspace, tables, monkeypatch, tmp_path, data, field):
    monkeypatch.chdir(workspace)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    line = _clean(workspace, ["run", str(spec_file)], "run")
    assert field.rpartition(".")[2] in line, line


def test_the_matrix_is_large():
    """Every job is walked, and the cases number at least 400 (the docs quote this count)."""
    jobs = {c.values[0][0] for c in FLAG_CASES} | {c.values[0]["job"] for c in FILE_CASES}
    assert jobs == set(BASE) == set(JOBS)
    assert len(FLAG_CASES) + len(FILE_CASES) >= 400, (len(FLAG_CASES), len(FILE_CASES))

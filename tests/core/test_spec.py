"""The shared field types (one home per rule), one-line errors, bounded YAML, and every spec being complete."""

from __future__ import annotations

import importlib
import time

import pytest
from pydantic import ValidationError

from sensitivity.core.spec import (
    Count,
    Exclude,
    Fraction,
    Ints,
    Names,
    Number,
    OpenFraction,
    Seqlen,
    Sparsities,
    Spec,
    SpecError,
    check,
    load_yaml,
)


class _Options(Spec):
    n: Count = 1
    """A count."""
    inner: _Inner | None = None


class _Inner(Spec):
    k: Count = 1


_Options.model_rebuild()


# One row per rule of the shared types: (type, good value -> validated, bad value, message).
RULES = [
    (Count, "8", 8, 0, "0 is out of range; allowed: 1 <= value <= 67,108,864"),
    (Count, 3, 3, True, "True is a boolean; allowed: a number"),
    (Count, 3, 3, 2.5, "2.5 is invalid; allowed: an integer"),
    (Seqlen, 2, 2, 1, "1 is out of range; allowed: 2 <= value <= 67,108,864"),
    (Fraction, 0.0, 0.0, 1.0, "1.0 is out of range; allowed: 0 <= value < 1"),
    (OpenFraction, 0.5, 0.5, 0.0, "0.0 is out of range; allowed: 0 < value < 1"),
    (Number, "1e-3", 1e-3, float("nan"), "nan is invalid; allowed: a finite number"),
    (Names, "dt,B", ("dt", "B"), "dt,,B", "'dt,,B' is not a comma-separated list of names"),
    (Names, ["x"], ("x",), [], "[] is invalid; allowed: at least 1 item(s)"),
    (Ints, 3, (3,), "1,x", "'x' is invalid; allowed: an integer"),
    (Ints, "0,4-7", (0, 4, 5, 6, 7), "7-4", "range '7-4' runs backwards; write low-high"),
    (Ints, " 2 - 3 ", (2, 3), "1-x", "'1-x' is invalid; allowed: an integer"),
    (Sparsities, "0.25,0.5", (0.25, 0.5), "0.5,1", "1.0 is out of range; allowed: 0 < value < 1"),
    (Exclude, "none", (), 3, "3 is invalid; allowed: a list"),
]


@pytest.mark.parametrize("kind,good,expected,bad,message", RULES)
def test_each_shared_type_accepts_and_refuses_naming_the_field(kind, good, expected, bad, message):
    assert check(kind, good, "f", strict=False) == expected  # as a spec read from text converts it
    with pytest.raises(SpecError) as err:
        check(kind, bad, "f", strict=False)
    assert err.value.field.split(".")[0] == "f" and message in str(err.value)
    assert "\n" not in str(err.value)


def test_python_arguments_are_checked_strictly():
    assert check(Count, 8, "n") == 8
    for value in ("8", 8.0):
        with pytest.raises(SpecError, match=rf"^n: {value!r} is invalid; allowed: an integer$"):
            check(Count, value, "n")


def test_errors_name_nested_fields_and_unknown_keys():
    with pytest.raises(SpecError, match=r"^inner\.k: 0 is out of range; allowed: 1 <= value <= 67,108,864$") as err:
        _Options(inner={"k": 0})
    assert err.value.field == "inner.k" and err.value.detail.startswith("0 is out of range")
    with pytest.raises(SpecError, match=r"^colour: unknown field; allowed: n, inner$"):
        _Options(colour="red")
    with pytest.raises(SpecError, match=r"^inner\.q: unknown field; allowed: k$"):
        _Options(inner={"q": 1})


def test_specs_round_trip_through_yaml_and_json_and_are_frozen():
    spec = _Options(n=3, inner={"k": 2})
    assert _Options.from_yaml(spec.to_yaml()) == spec
    assert _Options.from_dict(__import__("json").loads(spec.to_json())) == spec
    assert spec.replace(n=4).n == 4 and spec.n == 3
    with pytest.raises(ValidationError, match="frozen"):
        spec.n = 5


def test_yaml_aliases_are_refused_at_once(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9))  # fmt: skip
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    started = time.perf_counter()
    with pytest.raises(SpecError, match=r"bomb.yaml at line 2, column \d+: aliases \(\*name\) are not allowed"):
        load_yaml(path)
    assert time.perf_counter() - started < 1.0


def test_yaml_never_builds_python_objects(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        load_yaml(path)
    assert not marker.exists()


def test_files_that_are_not_yaml_text_are_named(tmp_path):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecError, match="b.yaml' is not UTF-8 text"):
        load_yaml(binary)
    with pytest.raises(SpecError, match="does not exist"):
        load_yaml(tmp_path / "none.yaml")
    for directory in (tmp_path, str(tmp_path)):
        with pytest.raises(SpecError, match="is a directory; allowed: a YAML or JSON file"):
            load_yaml(directory)


def test_every_spec_is_complete_when_its_module_is_imported():
    """A spec whose annotations cannot be resolved where it is defined breaks in subclasses defined elsewhere."""
    importlib.import_module("sensitivity.jobs")

    def walk(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    incomplete = [c.__qualname__ for c in walk(Spec) if not c.__pydantic_complete__]
    assert incomplete == []

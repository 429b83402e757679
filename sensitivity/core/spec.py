"""Validated, serialisable specs: the base class, the field types every stage shares, bounded YAML and one-line errors.

A :class:`Spec` is a frozen pydantic model that refuses unknown keys and round-trips exactly through YAML and JSON.
Each validation rule lives in one place: a field's type here (``Fraction``, ``Count``, ``Names``...), a field of a
stage's options, or a validator next to it. A bad value raises :class:`SpecError`, a ``ValueError`` whose message
is one line naming the field, the value and what is allowed, and whose ``field`` says which field it was (front
ends map it to their own names, e.g. a command-line flag).

Examples:
    >>> class Options(Spec):
    ...     sparsity: Fraction = 0.5
    >>> Options(sparsity=1.5)
    Traceback (most recent call last):
    SpecError: sparsity: 1.5 is out of range; allowed: 0 <= value < 1
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

__all__ = [
    "COMPARE",
    "Structure",
    "parse_structure",
    "Count",
    "Counts",
    "Exclude",
    "Seqlen",
    "Sparsities",
    "Fraction",
    "Int",
    "MAX_COUNT",
    "MAX_SEED",
    "Ints",
    "Names",
    "Number",
    "OpenFraction",
    "Spec",
    "Seed",
    "SpecError",
    "Text",
    "check",
    "format_error",
    "load_yaml",
    "validate",
]

MAX_YAML_BYTES = 8 << 20
"""Largest YAML or JSON input read (a schedule of a 100-layer model is about 0.5 MB)."""


class SpecError(ValueError):
    """A value a spec does not allow: ``"{field}: {detail}"``, or ``detail`` alone for the whole input.

    Attributes:
        field: Dotted field name (``"options.score"``); ``""`` for the whole input.
        detail: What is wrong, with the value and what is allowed.
    """

    def __init__(self, detail: str, field: str = "") -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.field, self.detail = field, detail

    def within(self, prefix: str) -> SpecError:
        """The same error for a field nested under ``prefix``."""
        return SpecError(self.detail, ".".join(p for p in (prefix, self.field) if p))


def _not_bool(value):
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean; allowed: a number")
    return value


def _split(value):
    """``"a,b"`` -> ``["a", "b"]`` (command lines and hand-written YAML); sequences as they are."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
        if not all(items):
            raise ValueError(f"{value!r} is not a comma-separated list of names")
        return items
    return value


def _range(low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = True):
    """A check that a number lies in the range, naming it when it does not."""
    shown = lambda v: f"{v:,}" if isinstance(v, int) and abs(v) >= 10_000 else f"{v:g}"  # noqa: E731
    if high is None:
        allowed = f"value {'>' if low_open else '>='} {shown(low)}"
    else:
        lo = "" if low is None else f"{shown(low)} {'<' if low_open else '<='} "
        allowed = f"{lo}value {'<' if high_open else '<='} {shown(high)}"

    def check(value: float) -> float:
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise ValueError(f"{value!r} is out of range; allowed: {allowed}")
        return value

    return AfterValidator(check)


MAX_COUNT = 1 << 26
"""The largest count or window length a spec takes (67,108,864): as many tokens as the largest calibration draw
(:data:`sensitivity.data.windows.MAX_CALIBRATION_TOKENS`), so that no count allocates or loops past what any run
can hold; the stages bound counts further by their data (windows x seqlen, items x item length, pairs per pool)."""

Int = Annotated[int, BeforeValidator(_not_bool)]
"""An integer (booleans refused)."""
MAX_SEED = 2**32 - 1
"""The largest seed: numpy's legacy seed range (lm-eval seeds numpy with it), inside torch's."""
Seed = Annotated[int, BeforeValidator(_not_bool), _range(0, MAX_SEED, high_open=False)]
"""A seed: an integer from 0 to :data:`MAX_SEED` (4,294,967,295)."""
Count = Annotated[int, BeforeValidator(_not_bool), _range(1, MAX_COUNT, high_open=False)]
"""An integer from 1 to :data:`MAX_COUNT`."""
Seqlen = Annotated[int, BeforeValidator(_not_bool), _range(2, MAX_COUNT, high_open=False)]
"""Tokens per window: an integer from 2 (the first token is context only) to :data:`MAX_COUNT`."""
Number = Annotated[float, BeforeValidator(_not_bool)]
"""A finite number."""
Fraction = Annotated[float, BeforeValidator(_not_bool), _range(0, 1)]
"""A number in [0, 1)."""
OpenFraction = Annotated[float, BeforeValidator(_not_bool), _range(0, 1, low_open=True)]
"""A number in (0, 1)."""
Names = Annotated[tuple[str, ...], Field(min_length=1), BeforeValidator(_split)]
"""One or more names: a list, or a comma-separated string."""


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError(f"{value!r} is empty; allowed: a path or name")
    return value


Text = Annotated[str, AfterValidator(_not_blank)]
"""A non-empty path or name (``""`` would mean the current directory, or nothing)."""


def _several(value):
    """One number, a sequence, or a comma-separated string -> a sequence."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return value


def _int_ranges(value):
    """:func:`_several`, with ``"a-b"`` pieces of a string standing for ``a, a+1, ..., b``."""
    items = _several(value)
    if not isinstance(value, str):
        return items
    out = []
    for item in items:
        low, dash, high = item.partition("-")
        if dash and low.strip().isdigit() and high.strip().isdigit():
            if int(low) > int(high):
                raise ValueError(f"range {item!r} runs backwards; write low-high")
            out += list(range(int(low), int(high) + 1))
        else:
            out.append(item)
    return out


Ints = Annotated[tuple[Int, ...], Field(min_length=1), BeforeValidator(_int_ranges)]
"""One or more integers: a list, one integer, or a comma-separated string whose pieces may be inclusive ranges
(``"0,4-7"`` is 0, 4, 5, 6, 7)."""
Counts = Annotated[tuple[Count, ...], Field(min_length=1), BeforeValidator(_int_ranges)]
"""One or more counts (each 1 to :data:`MAX_COUNT`), written as :data:`Ints`."""
Sparsities = Annotated[tuple[OpenFraction, ...], Field(min_length=1), BeforeValidator(_several)]
"""One or more numbers in (0, 1): a list, one number, or a comma-separated string."""


def _none_or_names(value):
    if value is None or value == "none" or (isinstance(value, (list, tuple)) and list(value) in ([], ["none"])):
        return ()
    return _split(value)


Exclude = Annotated[tuple[str, ...], BeforeValidator(_none_or_names)]
"""Names kept out (e.g. components kept dense): a list, a comma-separated string, or ``"none"`` for none."""


class Spec(BaseModel):
    """Base of every validated, serialisable spec: frozen, unknown keys refused, non-finite numbers refused,
    field descriptions from the attribute docstrings."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True,
                              validate_default=True)  # fmt: skip
    """Pydantic settings: unknown keys and non-finite numbers refused, instances frozen, defaults validated, field
    descriptions taken from the attribute docstrings."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise format_error(e, type(self)) from None

    @classmethod
    def from_dict(cls, data: Any) -> Spec:
        """Validate plain data (a mapping) into this spec."""
        if not isinstance(data, dict):
            raise SpecError(f"a {cls.__name__} must be a mapping of fields, got {type(data).__name__}")
        return cls(**data)

    def to_dict(self) -> dict:
        """Plain data (JSON types only) that :meth:`from_dict` turns back into an equal spec."""
        return self.model_dump(mode="json")

    @classmethod
    def defaults(cls) -> dict:
        """Each field's default as plain data (as :meth:`to_dict` writes it); fields without one are left out."""
        return {name: to_jsonable_python(f.default) for name, f in cls.model_fields.items()
                if not f.is_required() and f.default_factory is None}  # fmt: skip

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON, with a final newline."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_yaml(self) -> str:
        """One line per field (lists and small mappings inline), in field order."""
        return yaml.dump(self.to_dict(), Dumper=_BlockTop, sort_keys=False, default_flow_style=None, width=120)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> Spec:
        """Read a spec from a YAML (or JSON) file or text."""
        return cls.from_dict(load_yaml(source))

    @classmethod
    def merged(cls, options: Spec | None = None, **overrides: Any) -> Spec:
        """This spec from ``options`` (an instance, or a spec carrying more fields, e.g. a job's; None: the defaults)
        with ``overrides`` applied, validated: how a function taking ``options=`` and keyword overrides reads them."""
        if not overrides and isinstance(options, cls):
            return options
        base = {} if options is None else {k: v for k, v in options.to_dict().items() if k in cls.model_fields}
        return cls(**{**base, **overrides})

    def replace(self, **changes: Any) -> Spec:
        """A validated copy with some fields changed."""
        return type(self)(**{**self.to_dict(), **changes})


@functools.cache
def _adapter(kind) -> TypeAdapter:
    return TypeAdapter(kind, config=ConfigDict(allow_inf_nan=False))


def check(kind, value, field: str, *, strict: bool = True):
    """``value`` validated as one of the types above (e.g. ``check(Fraction, budget, "budget")``), the error naming
    ``field``: for plain functions that take one such value. ``strict`` (the default for Python arguments) refuses
    what specs read from text would convert (``"8"`` for an integer, ``2.0`` for an integer)."""
    try:
        return _adapter(kind).validate_python(value, strict=strict)
    except ValidationError as e:
        raise format_error(e).within(field) from None


def validate(cls: type[Spec], data: dict, where: str = "") -> Spec:
    """``cls(**data)``, errors naming their field under ``where`` (e.g. ``"options"``)."""
    try:
        return cls(**data)
    except SpecError as e:
        raise e.within(where) from None


def format_error(e: ValidationError, cls: type[BaseModel] | None = None) -> SpecError:
    """The first error of a pydantic ``ValidationError`` as one :class:`SpecError`: field, value, what is allowed."""
    errors = e.errors(include_url=False)
    depth = lambda x: len([p for p in x["loc"] if _is_field(p)])  # noqa: E731
    err = min(errors, key=lambda x: (x["loc"][:1] != errors[0]["loc"][:1], -depth(x), _mismatch(x)))
    loc = [str(p) for p in err["loc"] if _is_field(p)]
    field = ".".join(loc)
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), SpecError):  # a nested spec's own error
        return ctx["error"].within(field)
    if kind == "extra_forbidden":
        owner = cls if cls is not None and len(loc) == 1 else None
        return SpecError("unknown field" + (f"; allowed: {', '.join(owner.model_fields)}" if owner else ""), field)
    if kind == "missing":
        return SpecError("required", field)
    if kind == "value_error":
        return SpecError(str(ctx["error"]) if "error" in ctx else err["msg"], field)
    if kind == "finite_number":
        return SpecError(f"{_show(err.get('input'))} is invalid; allowed: a finite number", field)
    if kind in _BOUNDS:
        bound = ctx[_BOUNDS[kind][0]]
        return SpecError(f"{_show(err.get('input'))} is out of range; allowed: value {_BOUNDS[kind][1]} {bound}", field)
    if kind == "literal_error":
        allowed = f"one of {ctx['expected']}"
    elif kind == "too_short":
        allowed = f"at least {ctx.get('min_length', 1)} item(s)"
    else:
        allowed = _KINDS.get(kind.split("_")[0], err["msg"][0].lower() + err["msg"][1:])
    return SpecError(f"{_show(err.get('input'))} is invalid; allowed: {allowed}", field)


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
          "tuple": "a list", "list": "a list", "dict": "a mapping", "model": "a mapping"}


def _mismatch(err: dict) -> bool:
    """Whether an error only says the value is not of one branch's type (a union tries every branch): the error of
    the branch the value was meant for says more."""
    kind = err["type"]
    return kind.endswith(("_type", "_parsing")) or kind == "none_required"


def _is_field(part) -> bool:
    """Whether a pydantic error location part names a field or an index (not a union branch like ``float``)."""
    return isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS)


_TYPE_TAGS = {"float", "int", "str", "bool", "none", "list", "tuple", "dict"}


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _BlockTop(yaml.SafeDumper):
    """The safe dumper with the top-level mapping in block style (one field a line) and nested lists and mappings
    of scalars inline."""

    def represent_dict(self, data):
        if not getattr(self, "_top_done", False):
            self._top_done = True
            return self.represent_mapping("tag:yaml.org,2002:map", data, flow_style=False)
        return super().represent_dict(data)


_BlockTop.add_representer(dict, _BlockTop.represent_dict)


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader with anchors/aliases refused: a few hundred bytes of nested aliases expand to
    gigabytes (a 'billion laughs' document), and no spec or schedule needs them."""

    def compose_node(self, parent, index):  # noqa: D102
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(source: str | os.PathLike) -> Any:
    """Parse a YAML (or JSON) file or YAML text with the safe loader, aliases refused and the size bounded.

    Raises:
        SpecError: For a missing, unreadable, binary or oversized file, or malformed YAML (naming where).
    """
    is_path = isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source
                                                  and source.endswith((".yaml", ".yml", ".json")))  # fmt: skip
    if is_path or (isinstance(source, str) and "\n" not in source and Path(source).exists()):
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"{str(path)!r} is a directory; allowed: a YAML or JSON file" if path.is_dir() else
                            f"{str(path)!r} is not a regular file; allowed: a YAML or JSON file" if path.exists() else
                            f"{str(path)!r} does not exist")  # fmt: skip
        if path.stat().st_size > MAX_YAML_BYTES:
            raise SpecError(f"{str(path)!r} has {path.stat().st_size:,} bytes; at most {MAX_YAML_BYTES:,} are read")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SpecError(f"{str(path)!r} is not UTF-8 text") from None
        where = str(path)
    else:
        text, where = str(source), "the YAML text"
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"malformed YAML in {where}{at}: {problem}") from None


COMPARE = ("row", "tensor")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_structure(structure: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``: keep ``n`` of every ``m`` consecutive weights. None, ``""``, ``"0:0"`` and
    ``"unstructured"`` -> None.

    ``n:m`` follows NVIDIA's and llm-compressor's ``mask_structure`` (``n`` non-zeros per group of ``m``, sparsity
    ``1 - n/m``); for 2:4 and 4:8 this is also WANDA's ``--sparsity_type``.

    Raises:
        ValueError: For anything else, or ``n >= m``, or ``n == 0``.
    """
    if structure in (None, "", "0:0", "unstructured"):
        return None
    m = _NM.match(str(structure))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"{structure!r} is invalid; allowed: 'unstructured' or 'n:m' with 0 < n < m, e.g. '2:4' or "
                         "'4:8'")  # fmt: skip
    return int(m.group(1)), int(m.group(2))


def _structure(value) -> str | None:
    nm = parse_structure(value)
    return None if nm is None else f"{nm[0]}:{nm[1]}"


Structure = Annotated[str | None, BeforeValidator(_structure)]
"""A validated N:M structure ``"n:m"`` (:func:`parse_structure`), or None for unstructured."""

"""MkDocs hook: pages hold directives that the build replaces with text generated from the code and the results.

A directive is an HTML comment on a line of its own, ``<!-- gen:KIND ARGS -->``; what replaces it comes from the
package (the parser, the job specs, the registry, the method tables) or from a results file, never retyped:

- ``gen:cli JOB``: ``sensitivity JOB --help``, from the parser the command line builds from the job specs.
- ``gen:spec JOB``: the job spec's fields (name, type, default, description) from its pydantic schema.
- ``gen:api PACKAGE``: one mkdocstrings entry per name the package exports, at the module that defines it.
- ``gen:components MODEL``: the registry's table for a model (``tiny:<family>`` or a shipped model): each unit's
  components, tensors, packed rows, layout and hook point, one layer per kind of layer.
- ``gen:ablations MODEL``: the ablation kinds that apply to each component of the model's architecture.
- ``gen:grid FILE MODEL``: a pruning grid's results (``grid.csv``) as a method x sparsity table.
- ``gen:table FILE [KEY]`` followed by a header line and a row template (Python format fields over each record of
  ``FILE``'s ``KEY`` list, default ``rows``; a mapping's items are records with its key as ``key``; CSV files are
  records; fields index nested values, ``{seconds[exact]}``), closed by ``-->``: a table from a results file.

An unknown directive, a missing file or a failed generator stops the build (``mkdocs build --strict``).
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import logging
import os
import re
from functools import cache
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parent.parent
_DIRECTIVE = re.compile(r"^<!-- gen:(\w+)([^\n]*?)(?:\n(.*?))?\s*-->$", re.M | re.S)
log = logging.getLogger("mkdocs.hooks.sensitivity")


class GenError(PluginError):
    """A directive that cannot be generated (the build stops)."""


def _cli(job: str) -> str:
    os.environ["COLUMNS"] = "110"
    import sensitivity.jobs  # noqa: F401 (registers every job)
    from sensitivity.cli.main import _build_parser

    parser, _ = _build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    if job == "sensitivity":
        text = parser.format_help()
    elif job not in sub:
        raise GenError(f"gen:cli: no subcommand {job!r}; allowed: {', '.join(sub)}")
    else:
        text = sub[job].format_help()
    return f"```text\n{text.rstrip()}\n```"


def _type(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    bounds = [f"{op} {schema[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                                                 ("exclusiveMaximum", "<")) if k in schema]  # fmt: skip
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _cell(text: object) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def _spec(job: str) -> str:
    from sensitivity.jobs import JOBS

    if job not in JOBS:
        raise GenError(f"gen:spec: no job {job!r}; allowed: {', '.join(JOBS)}")
    cls = JOBS[job].options
    schema = cls.model_json_schema()
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        prop = schema["properties"].get(name, {})
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        default = "required" if field.is_required() else f"`{json.dumps(value, default=str)}`"
        rows.append(f"| `{name}` | {_cell(_type(prop))} | {_cell(default)} | {_cell(field.description or '')} |")
    return "\n".join(rows)


def _exports(package: str) -> dict[str, str]:
    """Name -> the module that defines it, following each package's lazy ``_EXPORTS`` without importing."""
    path = ROOT / Path(*package.split(".")) / "__init__.py"
    if not path.exists():
        path = ROOT / Path(*package.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text())
    table, names = {}, []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level and not path.name == "__init__.py":
            for alias in node.names:  # a module re-exporting another's names: `from .core.jobs import JOBS`
                table[alias.asname or alias.name] = "." * node.level + (node.module or "") + (
                    f":{alias.name}" if alias.asname else "")
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "_EXPORTS":
                table = ast.literal_eval(node.value)
            elif node.targets[0].id == "__all__":
                names = ast.literal_eval(node.value)
    out = {}
    for name in names:
        target = table.get(name)
        if target is None:
            out[name] = package
            continue
        module, _, attribute = target.partition(":")
        dots = len(module) - len(module.lstrip("."))
        parts = package.split(".")
        base = parts[: len(parts) - dots + (1 if path.name == "__init__.py" else 0)]
        full = ".".join([*base, module.lstrip(".")]) if module.lstrip(".") else ".".join(base)
        attribute = attribute or name
        if (ROOT / Path(*full.split(".")) / "__init__.py").exists() and full != package:
            inner = _exports(full)
            out[name] = inner.get(attribute, full) + ("" if attribute == name else f":{attribute}")
        else:
            out[name] = full + ("" if attribute == name else f":{attribute}")
    return out


def _summary(module: str, name: str) -> str:
    """The first line of ``module.name``'s docstring, read without importing."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.name == name:
            return (ast.get_docstring(node) or "").split("\n\n")[0].replace("\n", " ")
    return ""


PAGES = ("sensitivity", "sensitivity.core", "sensitivity.data", "sensitivity.eval", "sensitivity.probes",
         "sensitivity.attribution", "sensitivity.allocation", "sensitivity.pruning", "sensitivity.explain",
         "sensitivity.report", "sensitivity.zoo", "sensitivity.jobs")  # fmt: skip
"""The packages with an API page (``docs/reference/api/``), in the order of the navigation."""


@cache
def _owners() -> dict[str, str]:
    """Object -> the one page that documents it in full: the page of the package defining it when that package
    exports it, else the first page that does."""
    def ident(name: str, where: str) -> str:
        module, _, attribute = where.partition(":")
        return f"{module}.{attribute or name}"

    exported = {page: [ident(n, w) for n, w in _exports(page).items()] for page in PAGES}
    owners: dict[str, str] = {}
    for page, idents in exported.items():
        for obj in idents:
            home = max((p for p in PAGES[1:] if obj.startswith(p + ".")), key=len, default=None)
            owners[obj] = home if home is not None and obj in exported[home] else owners.get(obj, page)
    return owners


def _api(package: str) -> str:
    """Full entries for the names this page documents; a linked table row for names documented on another page
    (each object is documented once)."""
    entries, links = [], []
    for name, where in _exports(package).items():
        module, _, attribute = where.partition(":")
        ident = f"{module}.{attribute or name}"
        if _owners()[ident] == package:
            entries.append(f"::: {ident}\n    options:\n      heading_level: 2\n")
        else:
            links.append(f"| [`{name}`][{ident}] | `{module}` | {_cell(_summary(module, attribute or name))} |")
    if links:
        links = ["| name | defined in | |", "|---|---|---|", *links, ""]
    if not entries and not links:
        raise GenError(f"gen:api: {package} exports nothing")
    return "\n".join([*links, *entries])


@cache
def _load(model: str):
    import transformers

    from sensitivity import load_model

    transformers.logging.set_verbosity_error()  # a tiny model's config notes are not the build's business
    return load_model(model)


def _components(model: str) -> str:
    lm = _load(model)
    table = lm.registry.table(lm.model)
    kinds = [lm.registry.layer_kind(i) for i in range(lm.registry.n_layers)]
    first = {kind: i for i, kind in reversed(list(enumerate(kinds)))}
    shown = table[table["layer"].isin(sorted(first.values()))]
    dims = ", ".join(f"{k}={v}" for k, v in lm.registry.dims.items())
    lines = [f"`{model}` ({lm.arch}; {dims}; layers: {', '.join(kinds)}); one layer of each kind:", "",
             "| layer | unit | component | tensor | rows | shape | layout | hook point |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in shown.to_dict(orient="records"):
        lines.append(f"| {r['layer']} | {r['unit']} | `{r['component']}` | `{r['tensor']}` | {r['rows'] or ''} | "
                     f"{r['shape']} | {r['layout']} | `{r['hook']}` |")  # fmt: skip
    return "\n".join(lines)


def _ablations(model: str) -> str:
    from sensitivity import ablation_table

    table = ablation_table(_load(model).registry)
    lines = ["| component | kind | what it does |", "|---|---|---|"]
    lines += [f"| `{r['component']}` | `{r['kind']}` | {_cell(r['ablation'])} |" for r in table.to_dict("records")]
    return "\n".join(lines)


def _table(args: str, body: str | None) -> str:
    parts = args.split()
    if not parts or body is None:
        raise GenError("gen:table needs FILE [KEY], then a header line and a row template line")
    file = ROOT / parts[0]
    if not file.is_file():
        raise GenError(f"gen:table: {parts[0]} does not exist")
    if file.suffix == ".csv":
        with file.open() as f:
            records = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    else:
        data = json.loads(file.read_text())
        for key in (parts[1] if len(parts) > 1 else "rows").split("."):
            data = data[int(key)] if isinstance(data, list) else data[key]
        records = [{"key": k, **v} for k, v in data.items()] if isinstance(data, dict) else data  # a dict: its items
    lines = body.strip().split("\n")
    header, template = lines[0], lines[1]
    where = lines[2].removeprefix("where ") if len(lines) > 2 else None
    out = [header, "|" + "---|" * (len(re.findall(r"(?<!\\)\|", header)) - 1)]  # escaped pipes are text
    for r in records:
        if where and not eval(where, {}, dict(r)):  # noqa: S307 (the docs' own filter expressions)
            continue
        out.append(template.format(**r))
    return "\n".join(out)


def _number(value: str):
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(value)
    return value


def _grid(args: str) -> str:
    """The pruning grid of one model (``FILE MODEL``) as method x sparsity: perplexity, x dense, and the share of
    non-embedding parameters removed (the embedding is the shipped model's ``vocab_size x hidden_size``)."""
    file, model = args.split()
    with (ROOT / file).open() as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == model]
    if not rows:
        raise GenError(f"gen:grid: no rows of model {model!r} in {file}")
    config = json.loads((ROOT / "sensitivity/zoo/models" / model / "config.json").read_text())
    dense = next(r for r in rows if r["label"] == "dense")
    body = int(dense["params"]) - config["vocab_size"] * config["hidden_size"]
    sparsities = sorted({float(r["sparsity"]) for r in rows if r["label"] != "dense"})
    labels = list(dict.fromkeys(r["label"] for r in rows if r["label"] != "dense"))
    cells = {(r["label"], float(r["sparsity"])): r for r in rows}
    lines = ["| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |", "|---" * (len(sparsities) + 1) + "|"]
    for label in labels:
        out = []
        for sp in sparsities:
            r = cells.get((label, sp))
            removed = (int(dense["params"]) - int(r["nonzero"])) / body if r else 0
            out.append(f"{float(r['perplexity']):.1f} (x{float(r['ppl_ratio']):.2f}, {removed:.0%})" if r else "—")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


_KINDS = {"cli": _cli, "grid": _grid, "spec": _spec, "api": _api, "components": _components, "ablations": _ablations}


def generate(kind: str, args: str, body: str | None) -> str:
    """The text that replaces one directive."""
    if kind == "table":
        return _table(args, body)
    if kind not in _KINDS:
        raise GenError(f"unknown directive gen:{kind}; allowed: table, {', '.join(_KINDS)}")
    with contextlib.redirect_stdout(io.StringIO()):
        return _KINDS[kind](args.strip())


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: D103 (MkDocs event)
    def replace(m: re.Match) -> str:
        try:
            return generate(m.group(1), m.group(2), m.group(3))
        except Exception as e:  # noqa: BLE001 (reported with the page, then the build stops)
            raise GenError(f"{page.file.src_uri}: gen:{m.group(1)}{m.group(2)}: {type(e).__name__}: {e}") from e

    return _DIRECTIVE.sub(replace, markdown)


_KEPT = re.compile(r"^(<!-- gen:(\w+)([^\n]*?)(?:\n(.*?))?\s*-->)\n(.*?)\n?^<!-- /gen -->$", re.M | re.S)


def refresh(text: str) -> str:
    """``text`` (a file read outside the site, the README) with each ``<!-- gen:... -->`` ... ``<!-- /gen -->``
    block regenerated: the directive stays, what follows it up to the end marker is generated anew."""
    return _KEPT.sub(lambda m: f"{m.group(1)}\n{generate(m.group(2), m.group(3), m.group(4))}\n<!-- /gen -->", text)


if __name__ == "__main__":  # `python docs/hooks.py README.md`: regenerate a file's generated blocks in place
    import sys

    for name in sys.argv[1:]:
        path = Path(name)
        path.write_text(refresh(path.read_text()))

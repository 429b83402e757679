"""``sensitivity`` command line: one subcommand per job, built from the job specs, plus ``run``, ``components`` and
``zoo list``.

Each job subcommand's flags are its spec's fields (``--calib-windows`` is ``calib_windows``; a method's options,
e.g. ``--score``, go to ``options``); the flags given become the spec, which is validated, then run through
:func:`sensitivity.jobs.run` and printed. ``--print-spec`` prints the spec as YAML instead of running it;
``sensitivity run FILE`` runs a saved spec or a job's manifest. Bad input exits with status 2 and one line naming
the flag, the value and what is allowed; nothing is written.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import sys
import types
import typing

__all__ = ["main"]

_FORMATS = ("table", "csv", "json")
# Job subcommands in the order --help lists them, with the flags that only change what is printed.
_JOBS = ("evaluate", "probe", "attribute", "agreement", "schedule", "prune", "explain", "report", "grid")
_WRITES = {"evaluate", "probe", "attribute", "agreement", "schedule", "prune", "explain", "report", "grid"}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _literal_choices(annotation) -> tuple | None:
    """The allowed values of a ``Literal`` annotation (also inside ``Optional``/``Annotated``)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            if (found := _literal_choices(arg)) is not None:
                return found
    return None


def _help(field, extra: str = "") -> str:
    text = (field.description or "").replace("\n", " ").replace("%", "%%")
    choices = _literal_choices(field.annotation)
    per_method = extra.startswith("Methods:") and "default" in extra
    if choices and not per_method:
        text += f" Allowed: {', '.join(map(str, choices))}."
    if extra:
        text += f" {extra}"
    if per_method:
        return text.strip()
    if field.is_required():
        text += " (required)"
    elif field.default not in (None, (), {}, ""):
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text += f" (default {shown})"
    return text.strip()


def _add_field(parser, flags: dict, name: str, field, dest: str, extra: str = "") -> None:
    """One flag for one spec field: ``--name VALUE`` (the text is validated by the spec), ``--name`` for a
    boolean that defaults to false, ``--no-name`` for one that defaults to true."""
    if dest in flags.values():
        return
    if field.annotation is bool:
        flag = _flag(name) if not field.default else "--no-" + name.replace("_", "-")
        parser.add_argument(flag, dest=dest, action="store_const", const=not field.default, default=argparse.SUPPRESS,
                            help=_help(field, extra).replace(f" (default {field.default})", ""))  # fmt: skip
    else:
        flag = _flag(name)
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=name.upper(), help=_help(field, extra))
    flags[flag] = dest


def _per_method(table, option: str) -> str:
    """Which methods take ``option``, with their allowed values and defaults where these differ."""
    groups: dict[str, list[str]] = {}
    for method in table:
        field = table[method].options.model_fields.get(option)
        if field is None:
            continue
        choices = _literal_choices(field.annotation)
        what = (f" ({'|'.join(map(str, choices))}" if choices else " (") + f"; default {field.default})"
        groups.setdefault(what if field.annotation is not bool else "", []).append(method)
    if len(groups) == 1:
        return f"Methods: {', '.join(next(iter(groups.values())))}."
    return "Methods: " + "; ".join(f"{', '.join(ms)}{what}" for what, ms in groups.items()) + "."


def _add_spec(parser, spec_cls) -> dict[str, str]:
    """Flags for every field of ``spec_cls`` (and every registered method's options); returns flag -> field."""
    flags: dict[str, str] = {}
    table, names = spec_cls.method_table, spec_cls.name_tables
    for name, field in spec_cls.model_fields.items():
        if name == "job":
            continue
        if name == "options" and table is not None:
            for method in table:
                for opt, f in table[method].options.model_fields.items():
                    _add_field(parser, flags, opt, f, f"options.{opt}", _per_method(table, opt))
            continue
        listed = table if name == "method" else names.get(name)
        extra = f"Choices: {', '.join(listed)}." if listed is not None else ""
        _add_field(parser, flags, name, field, name, extra)
    return flags


def _build_parser() -> tuple[_Parser, dict[str, dict[str, str]]]:
    from ..core.jobs import JOBS
    from ..core.names import DEFAULT_MODEL, DTYPE_NAMES

    parser = _Parser(prog="sensitivity", description="Pruning-sensitivity analysis of state-space LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    flags: dict[str, dict[str, str]] = {}

    p = sub.add_parser("components", help="list each layer's canonical components, tensors and hook points")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the model (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help=f"weights dtype: {', '.join(DTYPE_NAMES)} (default float32)")
    p.add_argument("--format", default="table", help=f"output format: {', '.join(_FORMATS)} (default table)")
    p.add_argument("--allow-nonfinite", action="store_true", help="load weights that hold NaN or infinity")
    flags["components"] = {"--model": "model", "--dtype": "dtype", "--format": "format",
                           "--allow-nonfinite": "allow_nonfinite"}  # fmt: skip

    for job in (*_JOBS, *(j for j in JOBS if j not in _JOBS)):
        p = sub.add_parser(job, help=JOBS[job].description)
        flags[job] = _add_spec(p, JOBS[job].options)
        _display_flags(p, job)

    p = sub.add_parser("run", help="run a job from a spec file (from --print-spec) or a manifest a job wrote")
    p.add_argument("spec", help="spec YAML/JSON, DIR/manifest.json, pruning_manifest.json or a schedule YAML")
    p.add_argument("--out", default=None, help="write here instead of the spec's out")
    _display_flags(p, "run")
    flags["run"] = {"--out": "out"}

    p = sub.add_parser("zoo", help="the trained models shipped with the package")
    zoo = p.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    p = zoo.add_parser("list", help="list the shipped models with size, test perplexity and training tokens")
    p.add_argument("--json", action="store_true", help="print the model cards as JSON")
    return parser, flags


def _display_flags(p, job: str) -> None:
    """Flags that change how a job runs or prints, not what it computes (they are not part of its spec)."""
    p.add_argument("--print-spec", action="store_true", help="print the job's spec as YAML and exit (edit it, then "
                   "`sensitivity run FILE`)")  # fmt: skip
    if job in _WRITES or job == "run":
        p.add_argument("--overwrite", action="store_true", help="replace an output that holds another run")
    if job in ("evaluate", "run"):
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    if job in ("probe", "run"):
        p.add_argument("--top", default="10", help="print the K most damaging probes (default 10)")


def _spec_data(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """The fields the flags gave, nested (``options.score`` -> ``{"options": {"score": ...}}``)."""
    data: dict = {"job": args.command}
    for dest in flags.values():
        if hasattr(args, dest):
            value = getattr(args, dest)
            head, _, rest = dest.partition(".")
            if rest:
                data.setdefault(head, {})[rest] = value
            else:
                data[dest] = value
    return data


def _flag_for(field: str, flags: dict[str, str]) -> tuple[str | None, str]:
    """The flag of the longest dotted prefix of ``field``, and the rest of the field path."""
    by_dest = {dest: flag for flag, dest in flags.items()}
    parts = field.split(".") if field else []
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in by_dest:
            return by_dest[".".join(parts[:i])], ".".join(parts[i:])
    return None, field


def _as_flags(text: str, flags: dict[str, str]) -> str:
    """A library message with the spec fields it names (``allow_nonfinite``) spelled as their flags."""
    text = " ".join(text.split())  # one line
    for flag, dest in flags.items():
        if "_" in dest and "." not in dest:
            text = re.sub(rf"(?<![\w-]){dest}(?!\w)", flag, text)
    return text


# ---- printing ---------------------------------------------------------------------------------------------------


def _print_evaluate(result, args) -> None:
    r = result.value
    if getattr(args, "json", False):
        print(json.dumps(r, indent=2))
        return
    print(f"model       {r['model']} ({r['arch']}, {r['n_layers']} layers, {r['params']:,} parameters)")
    print(f"data        {r['data']}, split {r['split']!r}" + (f": {r['split_note']}" if "split_note" in r else ""))
    print(f"perplexity  {r['perplexity']:.3f}")
    print(f"nll         {r['nll']:.4f} nats/token over {r['tokens']} tokens in {r['windows']} windows")
    if "kl" in r:
        print(f"kl          {r['kl']:.5f} nats/token vs {r['reference']}")
    print(f"definition  {r['definition']}")
    if r.get("tasks"):
        _print_tasks(r["tasks"])
    for name in ("evaluation", "tasks"):
        if name in result.outputs:
            print(f"wrote       {result.outputs[name]}")


def _print_tasks(rows: list[dict]) -> None:
    """The task rows as a table ("-" where a stderr or n is missing), then each metric's definition."""
    import pandas as pd

    table = pd.DataFrame(rows)[["task", "metric", "value", "stderr", "n"]].astype({"n": "Int64"})
    number = lambda v: f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"  # noqa: E731
    print("tasks\n" + table.to_string(index=False, float_format=number, na_rep="-"))
    for row in rows:
        print(f"  {row['task']} {row['metric']}: {row['definition']}")


_ESTIMATORS = {"fisher": "second order, the Fisher quadratic of the KL plus the first-order term",
               "empirical": "the squared first-order term per window", "linear": "first-order attribution patching",
               "local": "first order with the ablated layer run exactly"}  # fmt: skip


def _print_probe(result, args) -> None:
    df, top = result.value, int(getattr(args, "top", 10) or 0)
    n_est = int(df[df.metric == "delta_nll"].estimated.sum()) if "estimated" in df else 0
    how = ", ".join(df[df.estimated].estimator.unique()) if n_est else ""
    what = f" ({n_est} estimated: {how})" if n_est else ""
    print(f"{len(df) // 3} probes of {result.spec.model}{what} -> {os.path.join(result.spec.out, 'probes.csv')}")
    if top:
        damage = df[df.metric == "delta_nll"]  # ranked as shown (4 decimals), ties in plan order: no float-noise order
        damage = damage.loc[damage["value"].round(4).sort_values(ascending=False, kind="stable").index].head(top)
        damage = damage.assign(index=damage["index"].astype("string").fillna("-"),
                               sparsity=damage["sparsity"].map(lambda s: "-" if s != s else f"{s:g}"))  # fmt: skip
        columns = ["layer", "component", "index", "kind", "sparsity", "value"] + (["estimator"] if n_est else [])
        table = damage[columns].rename(columns={"value": "delta_nll"}).to_string(
            index=False, float_format=lambda v: f"{v:.4f}")  # fmt: skip
        note = f"; estimated: {_ESTIMATORS[how.split()[0]]}" if n_est and "," not in how else ""
        print(f"most damaging (delta_nll = mean next-token NLL ablated - dense, nats/token{note}):\n{table}")


def _print_attribute(result, args) -> None:
    print(f"{len(result.value)} attribution rows of {result.spec.model} -> "
          f"{os.path.join(result.spec.out, 'attribution.csv')}")  # fmt: skip


def _print_agreement(result, args) -> None:
    table = result.value.assign(sparsity=result.value.sparsity.map(lambda s: "-" if s != s else f"{s:g}"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"-> {result.outputs['agreement']}")


def _print_schedule(result, args) -> None:
    s = result.value
    print(f"{s.method} schedule for {result.spec.model}: {s.overall():.4f} of {sum(s.params.values()):,} prunable "
          f"parameters -> {result.outputs['schedule']}")  # fmt: skip
    table = s.frame().pivot(index="layer", columns="component", values="sparsity")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))


def _print_prune(result, args) -> None:
    spec, saved = result.spec, result.spec.out  # as the user gave it
    if isinstance(result.value, dict):  # streamed: the manifest written
        m = result.value
        after = m["params_after"]
        print(f"{spec.method} pruned {spec.model} (streamed, one block at a time) in {m['seconds']:.2f} s -> {saved}")
        print(f"non-zero    {after['nonzero']:,} of {after['params']:,} stored entries "
              f"({after['nonzero'] / after['params']:.3f})")  # fmt: skip
        if s := m.get("structured"):
            print(f"units       {s['unit']} scored by {s['score']}, mode {s['mode']} "
                  f"({s['params_before']:,} -> {s['params_after']:,} parameters)")  # fmt: skip
        print(f"manifest    {os.path.join(saved, 'pruning_manifest.json')}; evaluate with: sensitivity evaluate "
              f"--model {saved} --streamed")  # fmt: skip
        return
    m = result.value.manifest
    before, after = m["params_before"], m["params_after"]
    print(f"{spec.method} pruned {spec.model} in {m['seconds']:.2f} s -> {saved}")
    print(f"parameters  {before['params']:,} -> {after['params']:,} ({after['params'] / before['params']:.3f}x)")
    print(f"non-zero    {before['nonzero']:,} -> {after['nonzero']:,} ({after['nonzero'] / before['nonzero']:.3f}x)")
    if m["schedule"]:
        report = result.value.report()
        entries = {(e["layer"], e["component"]) for e in m["schedule"]["entries"]}
        listed = [(layer, comp) in entries for layer, comp in zip(report.layer, report.component)]
        pruned = report[report.prunable.to_numpy() & listed]
        print(f"targets     {pruned.zeros.sum() / pruned.numel.sum():.4f} zeros in the schedule's "
              f"{len(entries)} (layer, component) weight slices")  # fmt: skip
    if m["structured"] and m["structured"].get("method") == "blocks":
        s = m["structured"]
        gone = "; ".join(",".join(map(str, c)) for c in s["removed"]) or "none"
        print(f"removed     {s['unit']} {gone} (in that order); calibration loss {s['dense_loss']:.4f} -> "
              f"{s['loss']:.4f}; {s['saved_as']}")  # fmt: skip
    elif m["structured"]:
        s = m["structured"]
        print(f"units       {s['unit']} scored by {s['score']}, mode {s['mode']}")
    print(f"manifest    {os.path.join(saved, 'pruning_manifest.json')}; evaluate with: sensitivity evaluate --model "
          f"{saved}")  # fmt: skip


def _print_explain(result, args) -> None:
    e = result.value
    print(e.text)
    if not e.patching.empty:
        print("restorations that recover most (share of the loss gap):")
        print(e.patching.head(5)[["layer", "component", "recovered"]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"))  # fmt: skip
    print(f"perplexity: {e.definition}")
    tables = "explanation.md, drift.csv, patching.csv, dynamics.csv, samples.csv, states.csv, manifest.json"
    print(f"wrote {os.path.join(result.spec.out, 'explanation.json')}, {tables}")


def _print_report(result, args) -> None:
    import pandas as pd

    paths = result.value
    verdicts = pd.read_csv(paths["data"] / "verdicts.csv")
    table = verdicts[["label", "sparsity", "ppl_ratio", "verdict", "first_layer", "top_layer", "top_component"]]
    print(f"report of {result.spec.model} -> {os.path.join(result.spec.out, 'report.html')}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"also: {paths['markdown'].name}, figures/, data/*.csv, schedule.yaml, recipe.yaml, manifest.json")


def _print_grid(result, args) -> None:
    df = result.value
    table = df[df.method != "dense"].pivot_table(index=["model", "label"], columns="sparsity", values="perplexity",
                                                 sort=False)  # fmt: skip
    dense = df[df.method == "dense"].set_index("model").perplexity
    print(f"dense: {', '.join(f'{m} {p:.2f}' for m, p in dense.items())}")
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    print(f"wrote {os.path.join(result.spec.out, 'grid.csv')}")


_PRINTERS = {"evaluate": _print_evaluate, "probe": _print_probe, "attribute": _print_attribute,
             "agreement": _print_agreement, "schedule": _print_schedule, "prune": _print_prune,
             "explain": _print_explain, "report": _print_report, "grid": _print_grid}  # fmt: skip


# ---- commands that are not jobs -----------------------------------------------------------------------------------


def _cmd_components(args) -> int:
    from ..core.names import DTYPE_NAMES
    from ..core.spec import SpecError

    if args.format not in _FORMATS:
        raise SpecError(f"{args.format!r} is invalid; allowed: {', '.join(_FORMATS)}", "format")
    if args.dtype not in DTYPE_NAMES:
        raise SpecError(f"{args.dtype!r} is invalid; allowed: {', '.join(DTYPE_NAMES)}", "dtype")
    from ..core import load_model

    _quiet_transformers(args)
    lm = load_model(args.model, dtype=args.dtype, allow_nonfinite=args.allow_nonfinite)
    table = lm.registry.table(lm.model)
    if args.format == "csv":
        sys.stdout.write(table.to_csv(index=False))
    elif args.format == "json":
        kinds = [lm.registry.layer_kind(i) for i in range(lm.registry.n_layers)]
        print(json.dumps({"model": lm.name, "arch": lm.arch, "dims": lm.registry.dims, "layers": kinds,
                          "components": table.to_dict(orient="records")}, indent=2))  # fmt: skip
    else:
        dims = ", ".join(f"{k}={v}" for k, v in lm.registry.dims.items())
        print(f"{lm.name}: {lm.arch}, {lm.registry.n_layers} layers, {lm.n_params:,} parameters ({dims})")
        if lm.registry.is_hybrid:
            print("layers: " + ", ".join(f"{i} {lm.registry.layer_kind(i)}" for i in range(lm.registry.n_layers)))
        print(table.drop(columns=["description"]).to_string(index=False))
    return 0


def _cmd_zoo(args) -> int:
    from ..zoo import ZOO_MODELS, list_models

    models = list_models()
    if args.json:
        print(json.dumps([{**m.card, "path": str(m.path), "size_mb": round(m.size_mb, 2)} for m in models], indent=2))
        return 0
    aliases = {d: [n for n, d2 in ZOO_MODELS.items() if d2 == d] for d in ZOO_MODELS.values()}
    rows = [("name", "arch", "parameters", "size", "test ppl", "tokens seen", "aliases")]
    for m in models:
        c = m.card
        others = ", ".join(a for a in aliases[m.path.name] if a != m.name) or "-"
        rows.append((m.name, c["arch"], f"{c['parameters']:,}", f"{m.size_mb:.1f} MB", f"{c['test_perplexity']:.2f}",
                     f"{c['tokens_seen']:,}", others))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"test ppl: {models[0].card['test_definition']}")
    return 0


def _tune_malloc() -> None:
    """Keep freed tensor memory in glibc's heap (as ``MALLOC_MMAP_THRESHOLD_`` does): 1.1-2.5x faster on CPU.

    A no-op where glibc's ``mallopt`` is unavailable or the user set the environment variables.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: glibc's maximum on 64-bit
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _quiet_transformers(args) -> None:
    """Without ``-v``: transformers' warnings and "Loading weights" bars off (ours show only on a terminal)."""
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _run_job(args, flags: dict[str, str]) -> int:
    from .. import jobs

    if args.command == "run":
        spec = jobs.load_spec(args.spec)
        if args.out is not None:
            spec = spec.replace(out=args.out)
    else:
        spec = jobs.spec_of(_spec_data(args, flags))
    if args.print_spec:
        sys.stdout.write(spec.to_yaml())
        return 0
    top = getattr(args, "top", "0")
    if not (top.isdigit() and top.isascii()):
        raise ValueError(f"argument --top: {top!r} is invalid; allowed: an integer >= 0")
    _quiet_transformers(args)  # the spec is valid: the work (and its imports) starts here
    result = jobs.run(spec, overwrite=getattr(args, "overwrite", False), show_progress=sys.stderr.isatty())
    _PRINTERS.get(spec.job, lambda r, a: print(f"{spec.job}: {r.outputs}"))(result, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input)."""
    from ..core.output import OutputError
    from ..core.spec import SpecError

    _tune_malloc()
    prog = "sensitivity"
    try:
        from ..jobs import load_plugins

        load_plugins()
    except SpecError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 2
    parser, flags = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    where = f"{prog} {args.command}"
    try:
        if args.command == "components":
            return _cmd_components(args)
        if args.command == "zoo":
            return _cmd_zoo(args)
        return _run_job(args, flags.get(args.command, {}))
    except SpecError as e:
        named = flags.get(args.command, {})
        flag, rest = _flag_for(e.field, named)
        if flag is None:
            parser.exit(2, f"{where}: error: {_as_flags(str(e), named)}\n")
        parser.exit(2, f"{where}: error: argument {flag}: {rest + ': ' if rest else ''}{_as_flags(e.detail, named)}\n")
    except OutputError as e:  # about the job's output (other outputs' errors name their field)
        named = flags.get(args.command, {})
        parser.exit(2, f"{where}: error: {'argument --out: ' if '--out' in named else ''}{_as_flags(str(e), named)}\n")
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{where}: error: {_as_flags(str(e), flags.get(args.command, {}))}\n")
    except BrokenPipeError:  # the reader went away (``| head``): the work is done, nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception as e:  # noqa: BLE001 (the last line of defence: one line, the traceback only under --debug)
        if args.debug:
            raise
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        parser.exit(1, f"{where}: internal error: {detail} (a bug: rerun with --debug for the traceback and report "
                       "it)\n")

"""``sensitivity`` command line: ``components``, ``evaluate``, ``probe``, ``attribute``, ``agreement``, ``schedule``,
``prune``, ``explain``, ``report``, ``zoo list``.

Bad arguments exit with status 2 and one line on stderr naming the value and what is allowed; nothing is written.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import sys

__all__ = ["main"]

_FORMATS = ("table", "csv", "json")


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is too small; must be an integer >= {lo}")
        return value

    return parse


def _csv_list(kind=str):
    """``a,b,c`` -> [a, b, c] converted by ``kind``."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None

    return parse


def _build_parser() -> _Parser:
    from ..core.loading import DEFAULT_MODEL, DTYPES
    from ..data.corpus import DEFAULT_CORPUS
    from ..pruning.api import METHODS as PRUNE_METHODS

    parser = _Parser(prog="sensitivity", description="Pruning-sensitivity analysis of state-space LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"zoo model (default, default-mamba1), checkpoint directory, HF hub id, or "
            f"tiny:mamba|tiny:mamba2|tiny:falcon-mamba (default {DEFAULT_MODEL})",
        )
        p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights dtype (default float32)")

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data",
            default=DEFAULT_CORPUS,
            help=f"'{DEFAULT_CORPUS}' (the built-in corpus, default), 'sample', a text/JSONL file, a directory, "
            "or a local HF dataset",
        )
        p.add_argument("--text-field", default="text", help="JSONL/HF field holding the text (default text)")

    def window_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seqlen", type=_int_at_least(2), default=256, help="tokens per window (default 256)")
        p.add_argument("--seed", type=int, default=0, help="seed of the window draws (default 0)")
        p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="windows per forward (default 8)")
        p.add_argument("--out", required=True, help="output directory (rerunning into it resumes)")

    p = sub.add_parser("components", help="list each layer's canonical components, tensors and hook points")
    model_args(p)
    p.add_argument("--format", default="table", choices=_FORMATS, help="output format (default table)")

    p = sub.add_parser("evaluate", help="token-level perplexity on held-out text")
    model_args(p)
    data_args(p)
    p.add_argument("--split", default=None, help="split to evaluate (default: test, else validation)")
    p.add_argument("--seqlen", type=_int_at_least(2), default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-windows", type=_int_at_least(1), default=None, help="evaluate only the first K windows")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="windows per forward (default 8)")
    p.add_argument("--reference", default=None, help="also report KL(reference || model) against this model")
    p.add_argument("--seed", type=int, default=0, help="seed recorded with the result (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("probe", help="ablate each component of each layer; write DIR/probes.csv and manifest.json")
    model_args(p)
    data_args(p)
    window_args(p)
    p.add_argument("--components", type=_csv_list(), default=None,
                   help="comma-separated components and units (mixer, head, state); default all but state")
    p.add_argument("--kinds", type=_csv_list(), default=None,
                   help="comma-separated ablation kinds: zero, mean, resample, bypass, magnitude, wanda, remove "
                   "(default all)")
    p.add_argument("--sparsities", type=_csv_list(float), default=None,
                   help="sparsities of the magnitude and wanda kinds (default 0.25,0.5,0.75)")
    p.add_argument("--layers", type=_csv_list(int), default=None, help="comma-separated layers (default all)")
    p.add_argument("--windows", type=_int_at_least(1), default=8,
                   help="held-out windows the damage is measured on (default 8)")
    p.add_argument("--calib-windows", type=_int_at_least(1), default=8,
                   help="calibration windows for means and WANDA norms (default 8)")
    p.add_argument("--split", default=None, help="held-out split (default validation, else the corpus' held-out)")
    p.add_argument("--sweep", default="cached", choices=["cached", "naive"],
                   help="cached: reuse the residual stream before the probed layer (default); naive: full forward")
    p.add_argument("--top", type=_int_at_least(0), default=10, help="print the K most damaging probes (default 10)")

    p = sub.add_parser("attribute", help="activation, gradient and captum attribution; write DIR/attribution.csv")
    model_args(p)
    data_args(p)
    window_args(p)
    p.add_argument("--methods", type=_csv_list(), default=None,
                   help="comma-separated methods: act_norm, taylor, fisher, gblm, grad_x_act, integrated_gradients, "
                   "conductance (default: all but the last two)")
    p.add_argument("--components", type=_csv_list(), default=None, help="comma-separated components (default all)")
    p.add_argument("--layers", type=_csv_list(int), default=None, help="comma-separated layers (default all)")
    p.add_argument("--windows", type=_int_at_least(1), default=8, help="calibration windows (default 8)")
    p.add_argument("--objective", default="loss", choices=["loss", "logprob"],
                   help="what is attributed: the mean next-token loss (default) or the target log-probability")
    p.add_argument("--n-steps", type=_int_at_least(1), default=16,
                   help="integration steps of integrated_gradients and conductance (default 16)")
    p.add_argument("--internal-batch-size", type=_int_at_least(1), default=None,
                   help="captum's internal_batch_size for the integration steps")

    p = sub.add_parser("agreement", help="rank correlation of each attribution with each ablation's damage")
    p.add_argument("--probes", required=True, help="probes.csv or the directory holding it")
    p.add_argument("--attribution", required=True, help="attribution.csv or the directory holding it")
    p.add_argument("--metric", default="delta_nll", choices=["delta_nll", "kl", "ppl_ratio"],
                   help="probe damage metric to rank by (default delta_nll)")
    p.add_argument("--out", default=None, help="CSV to write (default: agreement.csv next to the probes)")

    p = sub.add_parser("schedule", help="allocate a global sparsity budget over layers and components; write YAML")
    model_args(p)
    data_args(p)
    p.add_argument("--method", required=True, choices=["uniform", "owl", "depth", "sensitivity"],
                   help="uniform; owl (outlier-weighted layerwise); depth (linear ramp); sensitivity (from probes "
                   "or Fisher saliencies)")
    p.add_argument("--budget", type=float, required=True, help="fraction of the prunable parameters to remove")
    p.add_argument("--probes", default=None, help="probes.csv or its directory (--method sensitivity)")
    p.add_argument("--source", default="probes", choices=["probes", "fisher"],
                   help="sensitivity curves from measured probes (default) or from Fisher (OBD) saliencies")
    p.add_argument("--probe-method", default="wanda", choices=["wanda", "magnitude"],
                   help="which sparsify probes give the curves (default wanda)")
    p.add_argument("--metric", default="delta_nll", choices=["delta_nll", "kl"], help="probe damage metric")
    p.add_argument("--components", type=_csv_list(), default=None, help="components to prune (default: prunable)")
    p.add_argument("--exclude", type=_csv_list(), default=None, help="kept dense (default conv1d; 'none')")
    p.add_argument("--min-sparsity", type=float, default=0.0, help="lower bound per entry (default 0)")
    p.add_argument("--max-sparsity", type=float, default=0.95, help="upper bound per entry (default 0.95)")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (default 5)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL's maximum deviation from the budget (0.08)")
    p.add_argument("--depth-spread", type=float, default=0.1, help="depth ramp: budget -/+ spread (default 0.1)")
    p.add_argument("--calib-windows", type=_int_at_least(1), default=32,
                   help="calibration windows for owl and fisher (default 32)")
    p.add_argument("--seqlen", type=_int_at_least(2), default=256, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="windows per forward (default 8)")
    p.add_argument("--recipe", default=None, help="also write an llm-compressor recipe YAML here")
    p.add_argument("--out", required=True, help="schedule YAML to write")

    p = sub.add_parser("prune", help="prune a model (wanda, magnitude, state, head, headdim) and save it")
    model_args(p)
    data_args(p)
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "state", "head", "headdim"],
                   help="weight pruning (magnitude, wanda) or SSM-structured (state, head, headdim)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction removed: of each weight matrix (magnitude, wanda) or of the units per layer")
    p.add_argument("--schedule", default=None, help="schedule YAML (from `sensitivity schedule`) instead of --sparsity")
    p.add_argument("--structure", default=None, help="n:m sparsity for magnitude/wanda, e.g. 2:4 or 4:8")
    p.add_argument("--compare", default="row", choices=["row", "tensor"],
                   help="rank weights within each output row (default, WANDA's) or across the tensor")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each layer on the outputs of the already-pruned layers (WANDA's procedure)")
    p.add_argument("--score", default=None, help="unit score for state/head/headdim: taylor, flap, magnitude, random")
    p.add_argument("--mode", default="auto", choices=["auto", "shrink", "mask"],
                   help="structured: shrink tensors (uniform ratios) or zero units (default auto)")
    p.add_argument("--no-bias-compensation", action="store_true", help="skip FLAP's bias compensation")
    p.add_argument("--components", type=_csv_list(), default=None, help="components to prune (magnitude, wanda)")
    p.add_argument("--exclude", type=_csv_list(), default=None, help="kept dense (default conv1d; 'none')")
    p.add_argument("--calib-windows", type=_int_at_least(1), default=64, help="calibration windows (default 64)")
    p.add_argument("--seqlen", type=_int_at_least(2), default=256, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and random scores (default 0)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="windows per forward (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--out", required=True, help="directory for the pruned checkpoint")

    p = sub.add_parser("explain", help="why a pruned model degrades: drift, restoration patching, SSM dynamics")
    p.add_argument("--dense", default=DEFAULT_MODEL, help=f"the dense model (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights dtype (default float32)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--pruned", default=None, help="a pruned checkpoint directory (from `sensitivity prune`)")
    which.add_argument("--method", default=None, choices=list(PRUNE_METHODS),
                       help="prune a copy of --dense with this method (structured methods in mask mode)")
    p.add_argument("--sparsity", type=float, default=None, help="sparsity for --method")
    data_args(p)
    p.add_argument("--windows", type=_int_at_least(1), default=8, help="windows to explain on (default 8)")
    p.add_argument("--split", default=None, help="split of those windows (default validation, else held-out)")
    p.add_argument("--seqlen", type=_int_at_least(2), default=256, help="tokens per window (default 256)")
    p.add_argument("--calib-windows", type=_int_at_least(1), default=32,
                   help="train windows for --method wanda and structured scores (default 32)")
    p.add_argument("--top-layers", type=_int_at_least(1), default=None,
                   help="patch single components only in the K layers whose whole-mixer restoration recovers most "
                   "(default: every layer)")
    p.add_argument("--components", type=_csv_list(), default=None, help="components to patch (default: all)")
    p.add_argument("--drift-threshold", type=float, default=0.1, help="relative error of a diverged layer (0.1)")
    p.add_argument("--healthy", type=float, default=1.2, help="perplexity ratio up to which healthy (1.2)")
    p.add_argument("--collapsed", type=float, default=2.0, help="perplexity ratio from which collapsed (2.0)")
    p.add_argument("--label", default=None, help="name of the pruned model in tables (default: the method)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window draws and subsamples (default 0)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="windows per forward (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--out", required=True, help="directory for explanation.json/.md and the CSV tables")

    p = sub.add_parser("report", help="the whole pipeline on one model: report.html, report.md, figures, CSV")
    model_args(p)
    data_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of every window draw (default 0)")
    p.add_argument("--grid", default="reduced", choices=["reduced", "full"],
                   help="reduced: magnitude, WANDA, WANDA + sensitivity schedule, 2:4, structured; full: adds OWL "
                   "and depth schedules (default reduced)")
    p.add_argument("--budget", type=float, default=0.5, help="global sparsity of schedule.yaml (default 0.5)")
    p.add_argument("--explain-sparsity", type=float, default=0.5, help="sparsity each method is explained at (0.5)")
    p.add_argument("--probe-windows", type=_int_at_least(1), default=8, help="validation windows for probes (8)")
    p.add_argument("--eval-windows", default="48",
                   help="test windows of 512 tokens for perplexity, or 'all' for the whole split (default 48)")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out holding another report")
    p.add_argument("--out", required=True, help="report directory (rerunning into it resumes)")

    p = sub.add_parser("zoo", help="the trained models shipped with the package")
    zoo = p.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    p = zoo.add_parser("list", help="list the shipped models with size, test perplexity and training tokens")
    p.add_argument("--json", action="store_true", help="print the model cards as JSON")
    return parser


def _cmd_components(args) -> int:
    from ..core import load_model

    lm = load_model(args.model, dtype=args.dtype)
    table = lm.registry.table(lm.model)
    if args.format == "csv":
        sys.stdout.write(table.to_csv(index=False))
    elif args.format == "json":
        print(
            json.dumps(
                {
                    "model": lm.name,
                    "arch": lm.arch,
                    "dims": lm.registry.dims,
                    "components": table.to_dict(orient="records"),
                },
                indent=2,
            )
        )
    else:
        dims = ", ".join(f"{k}={v}" for k, v in lm.registry.dims.items())
        print(f"{lm.name}: {lm.arch}, {lm.registry.n_layers} layers, {lm.n_params:,} parameters ({dims})")
        print(table.drop(columns=["description"]).to_string(index=False))
    return 0


def _cmd_evaluate(args) -> int:
    from ..core import load_model
    from ..core.output import versions
    from ..data import eval_windows
    from ..eval import kl_divergence, perplexity

    corpus, lm = _load_for_run(args)
    reference = load_model(args.reference, dtype=args.dtype) if args.reference else None
    windows = eval_windows(corpus, lm.tokenizer, args.seqlen, split=args.split, max_windows=args.max_windows)
    show = not args.json and sys.stderr.isatty()
    ppl = perplexity(lm, windows, batch_size=args.batch_size, show_progress=show)
    result = {
        "model": lm.name,
        "arch": lm.arch,
        "data": args.data,
        "split": windows.split,
        **ppl.to_dict(),
        "seed": args.seed,
        "versions": versions(),
    }
    if reference is not None:
        kl = kl_divergence(lm, reference, windows, batch_size=args.batch_size, show_progress=show)
        result.update(reference=reference.name, kl=kl.kl, kl_definition=kl.definition)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model       {lm.name} ({lm.arch}, {lm.registry.n_layers} layers, {lm.n_params:,} parameters)")
    print(f"data        {args.data}, split {windows.split!r}")
    print(f"perplexity  {ppl.perplexity:.3f}")
    print(f"nll         {ppl.nll:.4f} nats/token over {ppl.tokens} tokens in {ppl.windows} windows")
    if reference is not None:
        print(f"kl          {result['kl']:.5f} nats/token vs {reference.name}")
    print(f"definition  {ppl.definition}")
    return 0


def _load_for_run(args):
    from ..core import load_model
    from ..data import load_corpus

    corpus = load_corpus(args.data, text_field=args.text_field)  # bad data fails before any model loads
    lm = load_model(args.model, dtype=args.dtype)
    if lm.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; save one next to its config")
    return corpus, lm


def _show_progress() -> bool:
    return sys.stderr.isatty()


def _cmd_probe(args) -> int:
    from ..probes import KINDS, ProbeConfig, probe

    options = {"components": args.components, "layers": args.layers, "windows": args.windows,
               "calibration_windows": args.calib_windows, "seqlen": args.seqlen, "split": args.split,
               "seed": args.seed, "batch_size": args.batch_size, "sweep": args.sweep,
               "kinds": args.kinds or KINDS}  # fmt: skip
    if args.sparsities is not None:
        options["sparsities"] = args.sparsities
    config = ProbeConfig(**options)  # validates before anything loads
    corpus, lm = _load_for_run(args)
    df = probe(lm, corpus, config=config, out=args.out, show_progress=_show_progress())
    damage = df[df.metric == "delta_nll"].sort_values("value", ascending=False, kind="stable").head(args.top)
    damage = damage.assign(index=damage["index"].astype("string").fillna("-"))[["layer", "component", "index",
                                                                                "kind", "value"]]  # fmt: skip
    print(f"{len(df) // 3} probes of {lm.name} -> {os.path.join(args.out, 'probes.csv')}")
    if args.top:
        table = damage.rename(columns={"value": "delta_nll"}).to_string(index=False, float_format=lambda v: f"{v:.4f}")
        print(f"most damaging (delta_nll = mean next-token NLL ablated - dense, nats/token):\n{table}")
    return 0


def _cmd_attribute(args) -> int:
    import time

    from ..attribution import DEFAULT_METHODS, METHODS, attribute
    from ..core.output import atomic_write_text, versions, write_manifest
    from ..data import calibration_windows

    if bad := [m for m in args.methods or () if m not in METHODS]:  # before anything loads
        raise ValueError(f"unknown method {bad[0]!r}; allowed: {', '.join(METHODS)}")
    corpus, lm = _load_for_run(args)
    windows = calibration_windows(corpus, lm.tokenizer, args.windows, args.seqlen, seed=args.seed)
    started = time.perf_counter()
    methods = tuple(args.methods or DEFAULT_METHODS)
    df = attribute(lm, windows, methods=methods, components=args.components, layers=args.layers,
                   batch_size=args.batch_size, seed=args.seed, objective=args.objective, n_steps=args.n_steps,
                   internal_batch_size=args.internal_batch_size, show_progress=_show_progress())  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "attribution.csv"), df.to_csv(index=False, float_format="%.10g"))
    manifest = {"command": "attribute", "model": lm.name, "arch": lm.arch, "data": args.data,
                "windows": windows.describe(), "seqlen": args.seqlen, "seed": args.seed, "methods": list(methods),
                "objective": args.objective, "n_steps": args.n_steps, "components": args.components,
                "layers": args.layers, "versions": versions(),
                "timings": {"total_s": time.perf_counter() - started}}  # fmt: skip
    write_manifest(os.path.join(args.out, "manifest.json"), manifest)
    print(f"{len(df)} attribution rows of {lm.name} -> {os.path.join(args.out, 'attribution.csv')}")
    return 0


def _read_table(path: str, name: str):
    import pandas as pd

    file = os.path.join(path, name) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist; expected {name} or a directory holding it")
    return pd.read_csv(file), file


def _cmd_agreement(args) -> int:
    from ..attribution import agreement
    from ..core.output import atomic_write_text

    probes, probes_file = _read_table(args.probes, "probes.csv")
    attribution, _ = _read_table(args.attribution, "attribution.csv")
    table = agreement(probes, attribution, probe_metric=args.metric)
    out = args.out or os.path.join(os.path.dirname(probes_file), "agreement.csv")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"--out {out}: its directory does not exist")
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"-> {out}")
    return 0


def _exclude(names: list[str] | None) -> tuple[str, ...]:
    """``--exclude``: default ``conv1d``; ``none`` keeps nothing dense."""
    from ..core.registry import DEFAULT_EXCLUDE

    return DEFAULT_EXCLUDE if names is None else () if names == ["none"] else tuple(names)


def _fraction(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"--{name} {value!r} out of range; allowed: 0 <= {name} < 1")


def _cmd_schedule(args) -> int:
    import dataclasses

    from ..allocation import allocate
    from ..core.output import atomic_write_text, versions
    from ..data import calibration_windows

    _fraction("budget", args.budget)
    for name in ("min-sparsity", "max-sparsity"):
        _fraction(name, getattr(args, name.replace("-", "_")))
    if args.method == "sensitivity" and args.source == "probes" and args.probes is None:
        raise ValueError("--method sensitivity --source probes needs --probes (a probes.csv or its directory)")
    probes = _read_table(args.probes, "probes.csv")[1] if args.probes else None
    for flag, path in (("out", args.out), ("recipe", args.recipe)):
        if path is not None and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            raise FileNotFoundError(f"--{flag} {path}: must be a file in an existing directory")
    corpus, lm = _load_for_run(args)
    needs_windows = args.method == "owl" or (args.method == "sensitivity" and args.source == "fisher")
    windows = calibration_windows(corpus, lm.tokenizer, args.calib_windows, args.seqlen, seed=args.seed) \
        if needs_windows else None
    schedule = allocate(lm, args.method, args.budget, windows=windows, probes=probes, components=args.components,
                        exclude=_exclude(args.exclude),
                        min_sparsity=args.min_sparsity, max_sparsity=args.max_sparsity, owl_m=args.owl_m,
                        owl_lambda=args.owl_lambda, depth_spread=args.depth_spread, source=args.source,
                        probe_method=args.probe_method, metric=args.metric, seed=args.seed,
                        batch_size=args.batch_size, show_progress=_show_progress())  # fmt: skip
    meta = {**schedule.meta, "model": lm.name, "data": args.data, "seed": args.seed, "versions": versions()}
    if windows is not None:
        meta["calibration"] = windows.describe()
    schedule = dataclasses.replace(schedule, meta=meta)
    schedule.to_yaml(args.out)
    if args.recipe:
        atomic_write_text(args.recipe, schedule.to_recipe())
    table = schedule.frame().pivot(index="layer", columns="component", values="sparsity")
    print(f"{args.method} schedule for {lm.name}: {schedule.overall():.4f} of "
          f"{sum(schedule.params.values()):,} prunable parameters -> {args.out}")  # fmt: skip
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _cmd_prune(args) -> int:
    from pathlib import Path

    from ..allocation import Schedule
    from ..core.masks import parse_structure
    from ..data import calibration_windows
    from ..pruning import prune
    from ..pruning.save import MANIFEST, _check_out, source_dir

    _fraction("sparsity", args.sparsity)
    parse_structure(args.structure)
    if args.sparsity is None and args.schedule is None and args.structure is None:
        raise ValueError("give --sparsity, --schedule or --structure")
    if args.schedule is not None and not os.path.isfile(args.schedule):
        raise FileNotFoundError(f"--schedule {args.schedule} does not exist")
    schedule = Schedule.from_yaml(Path(args.schedule)) if args.schedule else None
    out = Path(args.out).expanduser().resolve()
    _check_out(out, source_dir(args.model), args.overwrite)  # before anything loads
    needs_windows = args.method == "wanda" or (args.method in ("state", "head", "headdim")
                                               and args.score not in ("magnitude", "random"))  # fmt: skip
    corpus, lm = _load_for_run(args)
    windows = calibration_windows(corpus, lm.tokenizer, args.calib_windows, args.seqlen, seed=args.seed) \
        if needs_windows else None
    result = prune(lm, args.method, sparsity=args.sparsity, schedule=schedule, structure=args.structure,
                   compare=args.compare, sequential=args.sequential, windows=windows, score=args.score,
                   mode=args.mode, bias_compensation=not args.no_bias_compensation, components=args.components,
                   exclude=_exclude(args.exclude), seed=args.seed,
                   batch_size=args.batch_size, show_progress=_show_progress())  # fmt: skip
    m = result.manifest
    m["data"] = args.data
    saved = result.save(out, overwrite=args.overwrite)
    before, after = m["params_before"], m["params_after"]
    print(f"{args.method} pruned {lm.name} in {m['seconds']:.2f} s -> {saved}")
    print(f"parameters  {before['params']:,} -> {after['params']:,} ({after['params'] / before['params']:.3f}x)")
    print(f"non-zero    {before['nonzero']:,} -> {after['nonzero']:,} ({after['nonzero'] / before['nonzero']:.3f}x)")
    if m["schedule"]:
        report = result.report()
        entries = {(e["layer"], e["component"]) for e in m["schedule"]["entries"]}
        listed = [(layer, comp) in entries for layer, comp in zip(report.layer, report.component)]
        pruned = report[report.prunable.to_numpy() & listed]
        print(f"targets     {pruned.zeros.sum() / pruned.numel.sum():.4f} zeros in the schedule's "
              f"{len(entries)} (layer, component) weight slices")  # fmt: skip
    if m["structured"]:
        s = m["structured"]
        print(f"units       {s['unit']} scored by {s['score']}, mode {s['mode']}")
    print(f"manifest    {os.path.join(saved, MANIFEST)}; evaluate with: sensitivity evaluate --model {saved}")
    return 0


def _cmd_explain(args) -> int:
    from pathlib import Path

    from ..core import load_model
    from ..data import calibration_windows, load_corpus
    from ..explain import explain, explain_method, verdict
    from ..explain.explainer import _check_out
    from ..pruning.save import MANIFEST

    if args.method is not None:
        if args.sparsity is None:
            raise ValueError(f"--method {args.method} needs --sparsity")
        _fraction("sparsity", args.sparsity)
    elif args.sparsity is not None:
        raise ValueError("--sparsity goes with --method; a --pruned checkpoint already has its sparsity")
    elif not os.path.isdir(args.pruned):
        raise FileNotFoundError(f"--pruned {args.pruned} is not a directory")
    if not (isinstance(args.drift_threshold, float) and args.drift_threshold > 0):
        raise ValueError(f"--drift-threshold {args.drift_threshold} must be > 0")
    verdict(1.0, healthy=args.healthy, collapsed=args.collapsed)
    out = Path(args.out).expanduser().resolve()
    _check_out(out, args.overwrite)  # before anything loads
    corpus = load_corpus(args.data, text_field=args.text_field)
    dense = load_model(args.dense, dtype=args.dtype)
    if dense.tokenizer is None:
        raise ValueError(f"model {args.dense!r} has no tokenizer; save one next to its config")
    split = args.split or ("validation" if "validation" in corpus.splits else corpus.heldout_split)
    windows = calibration_windows(corpus, dense.tokenizer, args.windows, args.seqlen, seed=args.seed, split=split)
    options = dict(top_layers=args.top_layers, components=args.components, drift_threshold=args.drift_threshold,
                   healthy=args.healthy, collapsed=args.collapsed, batch_size=args.batch_size, seed=args.seed,
                   show_progress=_show_progress())  # fmt: skip
    if args.method is not None:
        calib = calibration_windows(corpus, dense.tokenizer, args.calib_windows, args.seqlen, seed=args.seed)
        e = explain_method(dense, args.method, args.sparsity, windows, calibration=calib, label=args.label,
                           **options)  # fmt: skip
    else:
        pruned = load_model(args.pruned, dtype=args.dtype)
        record = Path(args.pruned) / MANIFEST
        info = json.loads(record.read_text()) if record.is_file() else {}
        label = args.label or info.get("method") or Path(args.pruned).name
        sparsity = info.get("options", {}).get("sparsity")
        e = explain(dense, pruned, windows, label=label, sparsity=sparsity if isinstance(sparsity, float) else None,
                    **options)  # fmt: skip
    e.save(out, overwrite=args.overwrite)
    print(e.text)
    if not e.patching.empty:
        top = e.patching.head(5)[["layer", "component", "recovered"]]
        print("restorations that recover most (share of the loss gap):")
        print(top.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"perplexity: {e.definition}")
    tables = "explanation.md, drift.csv, patching.csv, dynamics.csv, samples.csv, states.csv"
    print(f"wrote {os.path.join(args.out, 'explanation.json')}, {tables}")
    return 0


def _cmd_report(args) -> int:
    from ..report import ReportConfig, build_report

    if args.eval_windows == "all":
        eval_windows = None
    elif args.eval_windows.isdigit() and int(args.eval_windows) >= 1:
        eval_windows = int(args.eval_windows)
    else:
        raise ValueError(f"--eval-windows {args.eval_windows!r} must be an integer >= 1 or 'all'")
    config = ReportConfig(model=args.model, data=args.data, seed=args.seed, grid=args.grid, budget=args.budget,
                          explain_sparsity=args.explain_sparsity, probe_windows=args.probe_windows,
                          eval_windows=eval_windows)  # validates before anything loads; fmt: skip
    paths = build_report(args.out, config, overwrite=args.overwrite, show_progress=_show_progress())
    import pandas as pd

    verdicts = pd.read_csv(paths["data"] / "verdicts.csv")
    table = verdicts[["label", "sparsity", "ppl_ratio", "verdict", "first_layer", "top_layer", "top_component"]]
    print(f"report of {args.model} -> {paths['html']}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"also: {paths['markdown'].name}, figures/, data/*.csv, schedule.yaml, recipe.yaml, manifest.json")
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
        rows.append(
            (m.name, c["arch"], f"{c['parameters']:,}", f"{m.size_mb:.1f} MB", f"{c['test_perplexity']:.2f}",
             f"{c['tokens_seen']:,}", others)
        )  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input)."""
    _tune_malloc()
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; ours show only on a terminal
    commands = {"components": _cmd_components, "evaluate": _cmd_evaluate, "probe": _cmd_probe,
                "attribute": _cmd_attribute, "agreement": _cmd_agreement, "schedule": _cmd_schedule,
                "prune": _cmd_prune, "explain": _cmd_explain, "report": _cmd_report, "zoo": _cmd_zoo}  # fmt: skip
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"sensitivity {args.command}: error: {e}\n")

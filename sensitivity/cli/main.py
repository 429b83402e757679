"""``sensitivity`` command line: ``components``, ``evaluate`` and ``zoo list``.

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


def _build_parser() -> _Parser:
    from ..data.corpus import DEFAULT_CORPUS
    from ..models.loading import DEFAULT_MODEL, DTYPES

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

    p = sub.add_parser("components", help="list each layer's canonical components, tensors and hook points")
    model_args(p)
    p.add_argument("--format", default="table", choices=_FORMATS, help="output format (default table)")

    p = sub.add_parser("evaluate", help="token-level perplexity on held-out text")
    model_args(p)
    p.add_argument(
        "--data",
        default=DEFAULT_CORPUS,
        help=f"'{DEFAULT_CORPUS}' (the built-in corpus, default), 'sample', a text/JSONL file, a directory, "
        "or a local HF dataset",
    )
    p.add_argument("--split", default=None, help="split to evaluate (default: test, else validation)")
    p.add_argument("--text-field", default="text", help="JSONL/HF field holding the text (default text)")
    p.add_argument("--seqlen", type=_int_at_least(2), default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-windows", type=_int_at_least(1), default=None, help="evaluate only the first K windows")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="windows per forward (default 8)")
    p.add_argument("--reference", default=None, help="also report KL(reference || model) against this model")
    p.add_argument("--seed", type=int, default=0, help="seed recorded with the result (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("zoo", help="the trained models shipped with the package")
    zoo = p.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    p = zoo.add_parser("list", help="list the shipped models with size, test perplexity and training tokens")
    p.add_argument("--json", action="store_true", help="print the model cards as JSON")
    return parser


def _cmd_components(args) -> int:
    from ..models import load_model

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
    from .._manifest import versions
    from ..data import eval_windows, load_corpus
    from ..eval import kl_divergence, perplexity
    from ..models import load_model

    corpus = load_corpus(args.data, text_field=args.text_field)  # bad data fails before any model loads
    lm = load_model(args.model, dtype=args.dtype)
    if lm.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; save one next to its config")
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
    commands = {"components": _cmd_components, "evaluate": _cmd_evaluate, "zoo": _cmd_zoo}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"sensitivity {args.command}: error: {e}\n")

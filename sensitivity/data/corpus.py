"""Text corpora with train / held-out splits.

A :class:`Corpus` is a named set of documents per split. :func:`load_corpus`
builds one from the built-in sample text, a text / JSON(L) file, a directory
or (when the ``datasets`` package is installed) a Hugging Face dataset.
"""

from __future__ import annotations

import importlib
import json
import logging
import lzma
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = "austen-kjv"
"""Name of the built-in default corpus (also reachable as ``"default"``)."""
BUILTIN_PATH = Path(__file__).resolve().parent / "builtin" / "austen-kjv.jsonl.xz"
BUILTIN_SOURCE = (
    "built-in austen-kjv: Jane Austen's six novels (Debian r-cran-janeaustenr 1.0.0), Bierce's The Devil's "
    "Dictionary (dict-devil 1.0) and the King James Bible (bible-kjv-text 4.38), one document per chapter, "
    "split by chapter"
)
SAMPLE_NAME = "sample"
SAMPLE_PATH = Path(__file__).resolve().parent / "samples" / "kjv-genesis-exodus.txt"
SAMPLE_SOURCE = "built-in sample: King James Bible, Genesis and Exodus (Debian bible-kjv-text)"

DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".md")
HF_PREFIX = "hf:"
"""A ``--data`` value naming a Hugging Face dataset starts with this (``hf:wikitext:wikitext-2-raw-v1``); nothing
else is ever looked up there, so a typo of a file name fails at once instead of after the hub's retries."""
MAX_DATA_BYTES = 1 << 30
"""The largest data file read (1 GiB of text: about 250M tokens, more than any job here windows)."""
"""File suffixes read as documents when a directory is loaded."""

SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}
"""File / directory stems recognised as splits, mapped to canonical names."""

_SPLIT_ORDER = ("train", "validation", "test")
_DOC_SEPARATOR = "\n\n"
_MIN_DOCS_FOR_DOC_SPLIT = 10
# Cut points in order of preference: paragraph boundary, line boundary, whitespace.
_BOUNDARIES = (re.compile(r"\n[ \t\r\f\v]*\n\s*"), re.compile(r"\n\s*"), re.compile(r"\s+"))


@dataclass(frozen=True)
class Corpus:
    """A named text corpus with documents per split.

    Attributes:
        name: Short name (``"sample"``, a file / directory name or a dataset name).
        source: Human description of where the text came from (path or dataset).
        splits: Documents per split, e.g. ``{"train": (...), "test": (...)}``.
    """

    name: str
    source: str
    splits: dict[str, tuple[str, ...]]
    heldout_fraction: float | None = None
    """Set when the source had no held-out split: its test split is this last fraction of the text, cut off its
    train split."""
    unsplit: tuple[str, ...] = ()
    """The documents before that cut (the ``all`` split)."""

    def __post_init__(self) -> None:
        """Copy ``splits`` so later edits of the caller's dict cannot leak in."""
        object.__setattr__(self, "splits", {k: tuple(v) for k, v in self.splits.items()})

    def __repr__(self) -> str:
        """Name, source and documents per split (not the text: the built-in corpus is 17 MB)."""
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"Corpus(name={self.name!r}, source={self.source!r}, documents: {sizes})"

    def documents(self, split: str) -> tuple[str, ...]:
        """Return the documents of ``split``.

        Args:
            split: Split name, e.g. ``"train"`` or ``"test"``; ``"all"`` is every document of every split (the
                whole text of a single file).

        Returns:
            The split's documents in order.

        Raises:
            ValueError: If the corpus has no such split.
        """
        if split == "all" and "all" not in self.splits:
            return self.unsplit or tuple(doc for docs in self.splits.values() for doc in docs)
        if split not in self.splits:
            available = ", ".join(repr(s) for s in dict.fromkeys([*self.splits, "all"]))
            raise ValueError(f"unknown split {split!r} for corpus {self.name}; available: {available}")
        return self.splits[split]

    @property
    def heldout_split(self) -> str:
        """Name of the held-out split: ``"test"`` if present, else ``"validation"``.

        Raises:
            ValueError: If the corpus has neither split.
        """
        for split in ("test", "validation"):
            if split in self.splits:
                return split
        available = ", ".join(repr(s) for s in self.splits) or "none"
        raise ValueError(f"corpus {self.name} has no 'test' or 'validation' split; available: {available}")


def load_corpus(spec: str | os.PathLike = DEFAULT_CORPUS, *, text_field: str = "text",
                heldout_fraction: float = 0.1) -> Corpus:
    """Load a corpus from a spec string.

    ``spec`` is one of: ``"austen-kjv"`` or ``"default"`` (the built-in corpus
    the embedded models were trained on, with its train / validation / test
    splits by chapter); ``"sample"`` (a small built-in text); a plain text file (one
    document); a ``.jsonl`` file (one document per line, read from
    ``text_field``); a ``.json`` file holding a list of records or strings; a
    directory (split files / subdirectories named ``train``, ``validation``,
    ``valid``, ``val``, ``test``, or else every ``*.txt``/``*.jsonl``/``*.md``
    file, recursively, as a document); or ``hf:NAME`` / ``hf:NAME:CONFIG``, a
    Hugging Face dataset (requires the ``datasets`` package). Files must be
    regular files of at most :data:`MAX_DATA_BYTES`.

    Sources without a ``test``/``validation`` split are split deterministically:
    with at least 10 documents the last ``ceil(heldout_fraction * n)`` become
    ``test``; otherwise the text is cut at the first paragraph (else line, else
    whitespace) boundary at or after ``1 - heldout_fraction`` of its characters.
    Whitespace-only documents are dropped.

    Args:
        spec: What to load (see above).
        text_field: Field holding the text in JSON(L) records and HF datasets.
        heldout_fraction: Fraction held out when splitting, in (0, 1).

    Returns:
        The loaded corpus, with a ``train`` split and a held-out split.

    Raises:
        ValueError: For invalid arguments, empty or malformed input, or an
            unknown spec.
    """
    from ..core.spec import OpenFraction, check  # the shared rule; imported here as core itself imports data

    check(OpenFraction, heldout_fraction, "heldout_fraction")
    spec = os.fspath(spec)  # a Path names a file or directory, as its string does
    if spec in (DEFAULT_CORPUS, "default"):
        splits = builtin_splits()
        name, source = DEFAULT_CORPUS, BUILTIN_SOURCE
    elif spec == SAMPLE_NAME:
        splits = {"train": (_read_text(SAMPLE_PATH),)}
        name, source = SAMPLE_NAME, SAMPLE_SOURCE
    elif spec.startswith(HF_PREFIX):
        splits = _load_hf(spec.removeprefix(HF_PREFIX), text_field)
        name, source = spec, f"Hugging Face dataset {spec.removeprefix(HF_PREFIX)}"
    elif spec and (Path(spec).exists() or Path(spec).is_symlink()):
        path = Path(spec)
        name, source = path.name or str(path), str(path.resolve())
        splits = _load_dir(path, text_field) if path.is_dir() else {"train": _load_file(path, text_field)}
    else:
        raise ValueError(f"{spec!r} is neither an existing path nor a built-in name ({DEFAULT_CORPUS!r}, 'default', "
                         f"{SAMPLE_NAME!r}); a Hugging Face dataset is named {HF_PREFIX}NAME or "
                         f"{HF_PREFIX}NAME:CONFIG")  # fmt: skip
    splits = {split: docs for split, docs in splits.items() if docs}
    cut = None
    if not any(s in splits for s in ("test", "validation")):
        train = splits.get("train", ())
        if not train:
            raise ValueError(f"{source} has no documents in a 'train', 'validation' or 'test' split")
        splits["train"], splits["test"] = split_documents(train, heldout_fraction)
        cut = heldout_fraction
    corpus = Corpus(name=name, source=source, splits=splits, heldout_fraction=cut, unsplit=train if cut else ())
    logger.info(
        "loaded corpus %s (%s): %s",
        name,
        source,
        ", ".join(f"{s}={len(d)} docs/{sum(map(len, d))} chars" for s, d in corpus.splits.items()),
    )
    return corpus


def builtin_records() -> list[dict[str, object]]:
    """The built-in corpus as chapter records.

    Returns:
        One dict per chapter with keys ``source`` (``"austen"`` or ``"kjv"``),
        ``book``, ``chapter`` (1-based), ``split`` and ``text``, in corpus order.
    """
    with lzma.open(BUILTIN_PATH, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def builtin_splits() -> dict[str, tuple[str, ...]]:
    """Documents (chapters) of the built-in corpus per split."""
    splits: dict[str, list[str]] = {split: [] for split in _SPLIT_ORDER}
    for record in builtin_records():
        splits[str(record["split"])].append(str(record["text"]))
    return {split: tuple(docs) for split, docs in splits.items()}


def split_documents(docs: tuple[str, ...], heldout_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split documents deterministically into train and test.

    With ``n >= 10`` documents the last ``ceil(heldout_fraction * n)`` (at most
    ``n - 1``) become test. Otherwise the documents, joined by blank lines, are
    cut at the first paragraph boundary at or after ``1 - heldout_fraction`` of
    the characters (else line boundary, else whitespace; else the last
    whitespace before it); whitespace at the cut is dropped and document
    boundaries elsewhere are kept.

    Args:
        docs: Non-empty documents.
        heldout_fraction: Fraction to hold out, in (0, 1).

    Returns:
        ``(train_docs, test_docs)``, both non-empty and sharing no text.

    Raises:
        ValueError: If the text cannot be cut (no whitespace to cut at).
    """
    n = len(docs)
    if n >= _MIN_DOCS_FOR_DOC_SPLIT:
        n_test = min(n - 1, math.ceil(heldout_fraction * n))
        return tuple(docs[: n - n_test]), tuple(docs[n - n_test :])
    text = _DOC_SEPARATOR.join(docs)
    cut_start, cut_end = _find_cut(text, int((1 - heldout_fraction) * len(text)))
    train: list[str] = []
    test: list[str] = []
    offset = 0
    for doc in docs:
        start, end = offset, offset + len(doc)
        offset = end + len(_DOC_SEPARATOR)
        head = text[start : min(end, cut_start)].rstrip()
        tail = text[max(start, cut_end) : end].lstrip()
        if head.strip():
            train.append(head)
        if tail.strip():
            test.append(tail)
    if not train or not test:
        raise ValueError(f"cannot split a text of {len(text)} characters into non-empty train and test parts")
    return tuple(train), tuple(test)


def _find_cut(text: str, target: int) -> tuple[int, int]:
    """Return the ``(start, end)`` span of the whitespace run where ``text`` is cut."""
    for pattern in _BOUNDARIES:
        match = pattern.search(text, max(1, target))
        if match is not None and match.end() < len(text):
            return match.start(), match.end()
    before = [m for m in _BOUNDARIES[-1].finditer(text, 0, target) if 0 < m.start() and m.end() < len(text)]
    if not before:
        raise ValueError(f"cannot split a text of {len(text)} characters: it has no whitespace to cut at")
    return before[-1].start(), before[-1].end()


def check_data_file(path: Path) -> int:
    """The size of a data file, after checking that it is a regular file of at most :data:`MAX_DATA_BYTES` (a
    device such as /dev/zero never ends, a FIFO blocks until a writer comes).

    Raises:
        ValueError: Naming the path and what it is.
    """
    try:
        st = path.stat()
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
                stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}.get(stat.S_IFMT(st.st_mode), "not a file")
        raise ValueError(f"{path} is {kind}; allowed: a regular text, .jsonl or .json file, a directory of them, or "
                         "a built-in corpus")  # fmt: skip
    if st.st_size > MAX_DATA_BYTES:
        raise ValueError(f"{path} is {st.st_size:,} bytes; at most {MAX_DATA_BYTES:,} bytes of text are read "
                         "(split it into a directory of files, or take a part)")  # fmt: skip
    return st.st_size


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file (a regular file within the size limit), raising ValueError on bad encoding."""
    check_data_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _load_file(path: Path, text_field: str) -> tuple[str, ...]:
    """Load the documents of one file (plain text, ``.jsonl`` or ``.json``)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = _load_jsonl(path, text_field)
    elif suffix == ".json":
        docs = _load_json(path, text_field)
    else:
        docs = (_read_text(path),)
    docs = tuple(doc for doc in docs if doc.strip())
    if not docs:
        raise ValueError(f"{path} contains no text (empty, whitespace only or no records)")
    return docs


def _load_jsonl(path: Path, text_field: str) -> tuple[str, ...]:
    """Read ``text_field`` of every non-blank line of a JSONL file."""
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {lineno} is not valid JSON ({exc.msg})") from None
        docs.append(_text_of(record, text_field, f"{path} line {lineno}"))
    return tuple(docs)


def _load_json(path: Path, text_field: str) -> tuple[str, ...]:
    """Read a JSON list of records / strings, falling back to JSON lines."""
    raw = _read_text(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return _load_jsonl(path, text_field)
    if not isinstance(data, list):
        raise ValueError(
            f"{path} must hold a JSON list of records or strings (or JSON lines), got {type(data).__name__}"
        )
    return tuple(_text_of(item, text_field, f"{path} item {i}") for i, item in enumerate(data))


def _text_of(record: object, text_field: str, where: str) -> str:
    """Return the text of a JSON record (a string or an object with ``text_field``)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{where} has no field {text_field!r} (choose another text_field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where} field {text_field!r} must be a string, got {type(text).__name__}")
    return text


def _document_files(root: Path) -> list[Path]:
    """Every document file under ``root``, recursively, sorted by path."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)


def _load_dir(path: Path, text_field: str) -> dict[str, tuple[str, ...]]:
    """Load a directory: split files / subdirectories if present, else all documents."""
    split_entries: dict[str, list[Path]] = {}
    for entry in sorted(path.iterdir()):
        stem = entry.name if entry.is_dir() else entry.stem
        is_doc = entry.is_dir() or entry.suffix.lower() in DOCUMENT_SUFFIXES + (".json",)
        if is_doc and stem.lower() in SPLIT_ALIASES:
            split_entries.setdefault(SPLIT_ALIASES[stem.lower()], []).append(entry)
    if split_entries:
        splits = {}
        for split in _SPLIT_ORDER:
            files = [f for e in split_entries.get(split, []) for f in (_document_files(e) if e.is_dir() else [e])]
            docs = tuple(doc for f in files for doc in _load_file_lenient(f, text_field))
            if split in split_entries and not docs:
                raise ValueError(f"split {split!r} of {path} has no documents")
            if docs:
                splits[split] = docs
        return splits
    docs = tuple(doc for f in _document_files(path) for doc in _load_file_lenient(f, text_field))
    if not docs:
        raise ValueError(f"{path} contains no documents (*.txt, *.jsonl or *.md files with text)")
    return {"train": docs}


def _load_file_lenient(path: Path, text_field: str) -> tuple[str, ...]:
    """Like :func:`_load_file` but an empty file gives no documents instead of an error."""
    if not _read_text(path).strip():
        return ()
    return _load_file(path, text_field)


def _load_hf(spec: str, text_field: str) -> dict[str, tuple[str, ...]]:
    """Load a Hugging Face dataset ``name`` or ``name:config`` if locally available."""
    hint = f"{HF_PREFIX}{spec!s} is not a locally available Hugging Face dataset"
    name, _, config = spec.partition(":")
    if not name:
        raise ValueError(f"{hint} (empty dataset name)")
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise ValueError(f"{hint} (the 'datasets' package is not installed)") from None
    try:
        dataset = datasets.load_dataset(name, config or None)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear message
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{hint} ({type(exc).__name__}: {reason})") from None
    splits: dict[str, tuple[str, ...]] = {}
    for split_name in dataset:
        canonical = SPLIT_ALIASES.get(str(split_name).lower())
        if canonical is None or canonical in splits:
            continue
        try:
            column = dataset[split_name][text_field]
        except KeyError:
            columns = getattr(dataset[split_name], "column_names", None)
            raise ValueError(
                f"dataset {spec} split {split_name!r} has no field {text_field!r}; columns: {columns}"
            ) from None
        splits[canonical] = tuple(t for t in column if isinstance(t, str) and t.strip())
    if not any(splits.values()):
        raise ValueError(f"dataset {spec} has no text in its train/validation/test splits")
    return splits

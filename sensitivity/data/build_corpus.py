"""Rebuild the embedded ``austen-kjv`` corpus from Debian packages.

Maintainer script (not run by the library or CI). It downloads two Debian
packages with ``apt-get download`` (or reads them from ``--debs DIR``),
extracts them with ``dpkg-deb -x``, parses the texts and writes
``sensitivity/data/builtin/austen-kjv.jsonl.xz``:

* ``r-cran-janeaustenr``: Jane Austen's six novels, stored as character
  vectors in an R lazy-load database (``data/Rdata.rdx`` / ``Rdata.rdb``),
  read here by a small pure-Python reader of R's XDR serialisation.
* ``dict-devil``: Ambrose Bierce's *The Devil's Dictionary* (1911), a dictd
  database (gzip text plus an index of base64 offsets); entries in file
  order, eight per document.
* ``bible-kjv`` + ``bible-kjv-text``: the King James Bible, printed verse by
  verse by the package's own ``bible`` program run from the extracted tree.

One record per chapter: ``{"source", "book", "chapter", "split", "text"}``.
Chapters are assigned to splits by their position in the whole corpus
(Austen's novels in publication order, the Devil's Dictionary, then the 66
books of the Bible): the
``i``-th chapter (0-based) goes to ``validation`` if ``i % 20 == 9``, to
``test`` if ``i % 20 == 19`` and to ``train`` otherwise, so every split covers
both authors and genres while no chapter is in two splits. The output is
deterministic (sorted keys, fixed xz preset).

Usage::

    python -m sensitivity.data.build_corpus [--debs DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent / "builtin" / "austen-kjv.jsonl.xz"
PACKAGES = ("r-cran-janeaustenr", "dict-devil", "bible-kjv", "bible-kjv-text")
DEVIL_TITLE = "The Devil's Dictionary"
DEVIL_ENTRIES_PER_DOC = 8
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

AUSTEN = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)

# Book abbreviations printed by `bible -f`, in canonical order, with titles.
KJV_BOOKS = (
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"), ("Deu", "Deuteronomy"),
    ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"), ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"),
    ("1Ki", "1 Kings"), ("2Ki", "2 Kings"), ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"), ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"), ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"), ("Hos", "Hosea"), ("Joel", "Joel"),
    ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nahum", "Nahum"),
    ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"), ("Mal", "Malachi"),
    ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"), ("Gal", "Galatians"), ("Eph", "Ephesians"),
    ("Phi", "Philippians"), ("Col", "Colossians"), ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"),
    ("1Tim", "1 Timothy"), ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"), ("2Jn", "2 John"),
    ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
)  # fmt: skip

_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_DROP_LINE = re.compile(r"^\s*(volume\s+[ivx\d]+|the end|finis)\.?\s*$", re.IGNORECASE)
_VERSE = re.compile(r"^(?P<book>[0-9]?[A-Za-z]+?)(?P<chap>\d+):(?P<verse>\d+) (?P<text>.*)$")


def split_of(index: int) -> str:
    """Split of the ``index``-th (0-based) chapter of the corpus."""
    return {9: "validation", 19: "test"}.get(index % 20, "train")


# --- R lazy-load database reader -------------------------------------------------------------------------------


class _RReader:
    """Minimal reader of R's XDR serialisation (vectors, lists, pairlists, symbols)."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError(f"not an R XDR stream (header {data[:2]!r})")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self._int(), self._int()  # writer and minimal reader versions
        if version == 3:  # native encoding name: length, then bytes
            length = self._int()
            self.pos += length

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self) -> object:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 242, 241, 251, 247):  # NULL, environments, missing arg
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == 1:  # symbol
            symbol = self.read()
            self.refs.append(symbol)
            return symbol
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            text = self.data[self.pos : self.pos + n].decode("utf-8")
            self.pos += n
            return text
        if kind == 2:  # pairlist: [attr] [tag] car cdr
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            car = self.read()
            return [(tag, car), *(self.read() or [])]
        n = self._int()
        if kind in (10, 13):
            value: list = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19):
            value = [self.read() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R object type {kind} at byte {self.pos}")
        if has_attr:
            attrs = dict(self.read())
            if kind == 19 and "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def read_rdata(stem: Path) -> dict[str, object]:
    """Read every object of an R lazy-load database ``stem.rdx`` / ``stem.rdb``."""
    index = _RReader(gzip.decompress(stem.with_suffix(".rdx").read_bytes())).read()
    blob = stem.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset : offset + length]
        objects[name] = _RReader(zlib.decompress(chunk[4:])).read()
    return objects


# --- Parsing -------------------------------------------------------------------------------------------------------


def _paragraphs(lines: list[str]) -> list[str]:
    """Unwrap hard-wrapped lines into paragraphs; drop emphasis underscores."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r"_([^_]+)_", r"\1", " ".join(" ".join(current).split())))
            current = []
    return paragraphs


def austen_chapters(lines: list[str], title: str) -> list[str]:
    """Split a novel's lines into chapter texts (front matter and volume headings dropped)."""
    chapters: list[list[str]] = []
    for line in lines:
        if _CHAPTER.match(line):
            chapters.append([])
        elif chapters and not _DROP_LINE.match(line):
            chapters[-1].append(line)
    texts = []
    for number, body in enumerate(chapters, start=1):
        paragraphs = _paragraphs(body)
        if paragraphs:
            texts.append(f"{title}\n\nChapter {number}\n\n" + "\n\n".join(paragraphs))
    return texts


def _b64(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def _entry_blocks(entry: str) -> list[str]:
    """Prose blocks (no indented line) are unwrapped; verse and quotations keep their lines."""
    blocks = []
    for block in re.split(r"\n[ \t]*\n", entry.strip("\n")):
        lines = [line.rstrip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if all(not line[0].isspace() for line in lines):
            blocks.append(" ".join(" ".join(lines).split()))
        else:
            blocks.append("\n".join(" ".join(line.split()) for line in lines))
    return [re.sub(r"_([^_]+)_", r"\1", block) for block in blocks]


def devil_documents(dictfile: Path, indexfile: Path) -> list[str]:
    """Entries of the dictd database in file order, grouped into documents."""
    text = gzip.decompress(dictfile.read_bytes())
    spans = []
    for line in indexfile.read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00database"):
            spans.append((_b64(offset), _b64(length)))
    entries = ["\n\n".join(_entry_blocks(text[o : o + n].decode("utf-8"))) for o, n in sorted(set(spans))]
    entries = [entry for entry in entries if entry]
    step = DEVIL_ENTRIES_PER_DOC
    return [f"{DEVIL_TITLE}\n\n" + "\n\n".join(entries[i : i + step]) for i in range(0, len(entries), step)]


def kjv_chapters(bible: Path, datadir: Path) -> dict[str, list[str]]:
    """Return chapter texts per book title, verses one per line."""
    raw = subprocess.run(
        [str(bible), "-p", str(datadir), "-f", "gen1:1-rev22:21"],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    titles = dict(KJV_BOOKS)
    verses: dict[str, dict[int, list[str]]] = {}
    for line in raw.splitlines():
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None or match["book"] not in titles:
            raise ValueError(f"unexpected line from bible: {line!r}")
        book = verses.setdefault(match["book"], {})
        book.setdefault(int(match["chap"]), []).append(" ".join(match["text"].split()))
    if list(verses) != [abbrev for abbrev, _ in KJV_BOOKS]:
        raise ValueError(f"expected the 66 books in order, got {list(verses)}")
    return {
        titles[abbrev]: [f"{titles[abbrev]}\n\nChapter {n}\n\n" + "\n".join(chapters[n]) for n in sorted(chapters)]
        for abbrev, chapters in verses.items()
    }


def build_records(root: Path) -> list[dict[str, object]]:
    """Parse the extracted packages under ``root`` into chapter records."""
    novels = read_rdata(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    books: list[tuple[str, str, list[str]]] = []
    for key, title in AUSTEN:
        books.append(("austen", title, austen_chapters(list(novels[key]), title)))
    dictd = root / "usr/share/dictd"
    books.append(("bierce", DEVIL_TITLE, devil_documents(dictd / "devil.dict.dz", dictd / "devil.index")))
    for title, chapters in kjv_chapters(root / "usr/bin/bible", root / "usr/lib").items():
        books.append(("kjv", title, chapters))
    chapters = [(source, title, i + 1, text) for source, title, texts in books for i, text in enumerate(texts)]
    return [
        {"source": source, "book": title, "chapter": number, "split": split_of(g), "text": text}
        for g, (source, title, number, text) in enumerate(chapters)
    ]


def extract(debs: Path, root: Path) -> None:
    """Extract every package of :data:`PACKAGES` found in ``debs`` into ``root``."""
    for package in PACKAGES:
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise FileNotFoundError(f"no {package}_*.deb in {debs}")
        subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], check=True)


def main(argv: list[str] | None = None) -> int:
    """Download, extract, parse and write the corpus."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debs", type=Path, help="directory holding the .deb files (default: apt-get download)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        debs = args.debs
        if debs is None:
            debs = Path(tmp) / "debs"
            debs.mkdir()
            subprocess.run(["apt-get", "download", *PACKAGES], check=True, cwd=debs)
        extract(debs, Path(tmp) / "root")
        records = build_records(Path(tmp) / "root")
    payload = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    tmp_out.replace(args.out)
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "validation", "test")}
    print(f"wrote {args.out}: {len(records)} chapters {counts}, {len(payload)} bytes of text")
    return 0


if __name__ == "__main__":
    sys.exit(main())

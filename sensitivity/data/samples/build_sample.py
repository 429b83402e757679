"""Rebuild ``kjv-genesis-exodus.txt`` from the Debian ``bible-kjv`` program.

Maintainer script, not part of the library API. Requires the Debian packages
``bible-kjv`` and ``bible-kjv-text`` (``apt-get install -y bible-kjv``).

Usage::

    python sensitivity/data/samples/build_sample.py

The output is deterministic: one title line per book, one ``Chapter N``
heading per chapter, one verse per line with the verse reference stripped,
blank lines between chapters and books, ASCII/UTF-8, LF line endings.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "kjv-genesis-exodus.txt"
MAX_BYTES = 600_000

# (abbreviation used by `bible -f`, verse range spec, title)
BOOKS: tuple[tuple[str, str, str], ...] = (
    ("Ge", "gen1:1-gen50:26", "The First Book of Moses, called Genesis"),
    ("Exo", "exo1:1-exo40:38", "The Second Book of Moses, called Exodus"),
)

_VERSE = re.compile(r"^(?P<book>[A-Za-z0-9]+?)(?P<chap>\d+):(?P<verse>\d+) (?P<text>.*)$")


def book_text(abbrev: str, spec: str, title: str) -> str:
    """Return one book as plain text (title, chapters separated by blank lines)."""
    raw = subprocess.run(
        ["bible", "-f", spec], check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL
    ).stdout
    chapters: dict[int, list[str]] = {}
    for line in raw.splitlines():
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None or match["book"] != abbrev:
            raise SystemExit(f"unexpected line from bible: {line!r}")
        chapters.setdefault(int(match["chap"]), []).append(" ".join(match["text"].split()))
    parts = [title]
    for number in sorted(chapters):
        parts.append(f"Chapter {number}\n" + "\n".join(chapters[number]))
    return "\n\n".join(parts)


def main() -> None:
    """Write the sample file (Genesis + Exodus, or only Genesis if too big)."""
    books = [book_text(*book) for book in BOOKS]
    text = "\n\n\n".join(books) + "\n"
    if len(text.encode("utf-8")) > MAX_BYTES:
        text = books[0] + "\n"
    OUT.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {OUT} ({len(text.encode('utf-8'))} bytes)")


if __name__ == "__main__":
    sys.exit(main())

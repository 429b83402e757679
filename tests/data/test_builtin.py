"""The built-in ``austen-kjv`` corpus and the script that rebuilds it."""

from __future__ import annotations

import gzip
import struct
import zlib
from collections import Counter

import pytest

from sensitivity.data import build_corpus, load_corpus
from sensitivity.data.corpus import builtin_records


@pytest.fixture(scope="module")
def records():
    return builtin_records()


def test_default_names_load_the_builtin_corpus(records):
    for spec in ("austen-kjv", "default"):
        corpus = load_corpus(spec)
        assert corpus.name == "austen-kjv"
        assert corpus.heldout_split == "test"
        for split in ("train", "validation", "test"):
            assert corpus.documents(split) == tuple(r["text"] for r in records if r["split"] == split)
    assert load_corpus().name == "austen-kjv"


def test_splits_share_no_chapter(records):
    keys = Counter((r["source"], r["book"], r["chapter"]) for r in records)
    assert max(keys.values()) == 1
    by_split = {s: {r["text"] for r in records if r["split"] == s} for s in ("train", "validation", "test")}
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["validation"] & by_split["test"]


def test_lines_shared_across_splits_are_only_the_bibles_own_repeats(records):
    lines = {s: {} for s in ("train", "test")}
    for r in records:
        if r["split"] in lines:
            for line in r["text"].split("\n"):
                if len(line) >= 60:
                    lines[r["split"]][line] = r["source"]
    shared = lines["train"].keys() & lines["test"].keys()
    assert {lines["test"][line] for line in shared} <= {"kjv"}  # e.g. Psalm 108 repeats Psalm 60
    assert len(shared) < 0.01 * len(lines["test"])


def test_split_rule_and_composition(records):
    assert [r["split"] for r in records] == [build_corpus.split_of(i) for i in range(len(records))]
    counts = Counter((r["source"], r["split"]) for r in records)
    for source in ("austen", "bierce", "kjv"):
        for split in ("train", "validation", "test"):
            assert counts[source, split] > 0
    austen = Counter(r["book"] for r in records if r["source"] == "austen")
    assert austen == {
        "Pride and Prejudice": 61, "Emma": 55, "Sense and Sensibility": 50, "Mansfield Park": 48,
        "Northanger Abbey": 31, "Persuasion": 24,
    }  # fmt: skip
    assert sum(r["source"] == "kjv" for r in records) == 1189  # chapters of the 66 books
    assert sum(len(r["text"].split()) for r in records) > 1_500_000


# --- the rebuild script's parsers, on hand-built inputs -------------------------------------------------------


def _xdr_int(v: int) -> bytes:
    return struct.pack(">i", v)


def _charsxp(text: str) -> bytes:
    raw = text.encode()
    return _xdr_int(9) + _xdr_int(len(raw)) + raw


def _strsxp(items: list[str]) -> bytes:
    return _xdr_int(16) + _xdr_int(len(items)) + b"".join(_charsxp(s) for s in items)


def _named_list(values: dict[str, bytes]) -> bytes:
    """A VECSXP with a names attribute: flags(19 | has_attr), n, items, then pairlist(tag=names, car=STRSXP)."""
    body = _xdr_int(19 | (1 << 9)) + _xdr_int(len(values)) + b"".join(values.values())
    names_attr = _xdr_int(2 | (1 << 10)) + _xdr_int(1) + _charsxp("names") + _strsxp(list(values)) + _xdr_int(254)
    return body + names_attr


def _stream(obj: bytes) -> bytes:
    return b"X\n" + _xdr_int(3) + _xdr_int(0x40000) + _xdr_int(0x30500) + _xdr_int(5) + b"UTF-8" + obj


def test_r_lazyload_reader_on_a_hand_built_database(tmp_path):
    novel = _stream(_strsxp(["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome,", "clever, and rich."]))
    blob = _xdr_int(len(novel)) + zlib.compress(novel)
    ints = _xdr_int(13) + _xdr_int(2) + _xdr_int(0) + _xdr_int(len(blob))
    index = _stream(_named_list({"variables": _named_list({"emma": ints}), "compressed": _xdr_int(10) + _xdr_int(1) + _xdr_int(1)}))  # noqa: E501
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    objects = build_corpus.read_rdata(tmp_path / "Rdata")
    assert objects == {"emma": ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome,", "clever, and rich."]}
    chapters = build_corpus.austen_chapters(objects["emma"], "Emma")
    assert chapters == ["Emma\n\nChapter 1\n\nEmma Woodhouse, handsome, clever, and rich."]


def _b64(value: int) -> str:
    digits = ""
    while True:
        digits = build_corpus._B64[value % 64] + digits
        value //= 64
        if not value:
            return digits


def test_dictd_reader_keeps_file_order_verse_lines_and_groups_entries(tmp_path):
    entries = [
        "ABATIS, n.  Rubbish in front of a fort,\nto prevent the rubbish outside.\n",
        "ABDICATION, n.  An act.\n\n    Poor Isabella's Dead, whose abdication\n    Set all tongues wagging.\n",
    ] + [f"WORD{i}, n.  Entry {i}.\n" for i in range(9)]
    text, spans = "", []
    for entry in entries:
        spans.append((len(text.encode()), len(entry.encode())))
        text += entry
    index = ["00databaseinfo\tA\tB"] + [f"w{i}\t{_b64(o)}\t{_b64(n)}" for i, (o, n) in reversed(list(enumerate(spans)))]
    (tmp_path / "d.dict.dz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "d.index").write_text("\n".join(index) + "\n")
    docs = build_corpus.devil_documents(tmp_path / "d.dict.dz", tmp_path / "d.index")
    assert len(docs) == 2  # 11 entries, 8 per document
    first = docs[0].split("\n\n")
    assert first[:4] == [
        "The Devil's Dictionary",
        "ABATIS, n. Rubbish in front of a fort, to prevent the rubbish outside.",
        "ABDICATION, n. An act.",
        "Poor Isabella's Dead, whose abdication\nSet all tongues wagging.",
    ]
    assert docs[1].endswith("WORD8, n. Entry 8.")

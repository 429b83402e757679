"""Tests for corpus loading and deterministic train / test splitting."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from sensitivity.data import Corpus, load_corpus, split_documents
from sensitivity.data.corpus import SAMPLE_PATH


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- Corpus -----------------------------------------------------------------


def test_documents_and_unknown_split_error() -> None:
    corpus = Corpus(name="c", source="mem", splits={"train": ("a", "b"), "validation": ("c",)})
    assert corpus.documents("train") == ("a", "b")
    with pytest.raises(ValueError, match=r"unknown split 'tset'.*available: 'train', 'validation'"):
        corpus.documents("tset")


def test_heldout_split_prefers_test_then_validation() -> None:
    assert Corpus("c", "s", {"train": ("a",), "validation": ("b",), "test": ("c",)}).heldout_split == "test"
    assert Corpus("c", "s", {"train": ("a",), "validation": ("b",)}).heldout_split == "validation"
    with pytest.raises(ValueError, match=r"corpus c has no 'test' or 'validation' split; available: 'train'"):
        _ = Corpus("c", "s", {"train": ("a",)}).heldout_split


def test_corpus_copies_splits() -> None:
    splits = {"train": ["a"]}
    corpus = Corpus("c", "s", splits)  # type: ignore[arg-type]
    splits["train"].append("b")
    assert corpus.splits == {"train": ("a",)}


# --- built-in sample --------------------------------------------------------


def test_sample_corpus_loads_with_train_and_test() -> None:
    corpus = load_corpus("sample")
    assert corpus.name == "sample"
    assert set(corpus.splits) == {"train", "test"}
    assert corpus.heldout_split == "test"
    (train,), (test,) = corpus.documents("train"), corpus.documents("test")
    assert train.startswith("The First Book of Moses, called Genesis\n\nChapter 1\nIn the beginning God created")
    assert "The Second Book of Moses, called Exodus" in train
    assert test.endswith("throughout all their journeys.\n")  # only the cut is stripped
    full = SAMPLE_PATH.read_text(encoding="utf-8")
    assert len(full) > 300_000
    assert 0.08 < len(test) / len(full) < 0.12
    middle = full[len(train) : len(full) - len(test)]
    assert full.startswith(train) and full.endswith(test)
    assert middle != "" and middle.strip() == ""
    assert test.startswith("Chapter ")  # cut at a paragraph (chapter) boundary


def test_sample_is_not_the_default() -> None:
    assert load_corpus("sample").name == "sample" != load_corpus().name


# --- plain text files -------------------------------------------------------


def test_txt_file_is_one_document_cut_at_paragraph(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 20 for i in range(10)]
    text = "\n\n".join(p.strip() for p in paragraphs) + "\n"
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.name == "book.txt"
    assert corpus.source == str(path.resolve())
    (train,), (test,) = corpus.documents("train"), corpus.documents("test")
    assert test == paragraphs[-1].strip() + "\n"
    assert train == "\n\n".join(p.strip() for p in paragraphs[:-1])
    assert len(train) >= 0.9 * len(text) - 2


def test_cut_falls_back_to_line_then_whitespace(tmp_path: Path) -> None:
    lines = "\n".join(f"line {i:02d}" for i in range(20))
    assert split_documents((lines,), 0.1) == ((lines[: lines.index("\nline 18")],), ("line 18\nline 19",))
    words = " ".join(f"w{i}" for i in range(10))  # "w0 w1 ... w9", 29 chars
    assert split_documents((words,), 0.1) == (("w0 w1 w2 w3 w4 w5 w6 w7 w8",), ("w9",))
    assert split_documents(("alpha beta",), 0.1) == (("alpha",), ("beta",))  # whitespace before the target


def test_split_disjoint_and_covers_text() -> None:
    text = "One.\n\nTwo two.\nThree three three.\n\n\n  Four four four four.\nFive."
    for fraction in (0.05, 0.3, 0.5, 0.7, 0.9):
        (train,), (test,) = split_documents((text,), fraction)
        gap = text[len(train) : len(text) - len(test)]
        assert text.startswith(train) and text.endswith(test)
        assert gap.strip() == "" and gap != ""
        assert train.strip() and test.strip()


def test_split_of_few_documents_keeps_document_boundaries() -> None:
    docs = ("a " * 40, "b " * 40, "c c c\n\nd d d")
    stripped = tuple(d.strip() for d in docs)  # joined: 79 + 2 + 79 + 2 + 12 = 174 chars
    assert split_documents(stripped, 0.05) == ((stripped[0], stripped[1], "c c c"), ("d d d",))  # target 165
    assert split_documents(stripped, 0.1) == (stripped[:2], stripped[2:])  # target 156: cut at doc boundary


def test_split_of_many_documents_holds_out_last_ceil_fraction() -> None:
    docs = tuple(f"doc {i}" for i in range(11))
    assert split_documents(docs, 0.1) == (docs[:9], docs[9:])  # ceil(1.1) == 2
    assert split_documents(docs, 0.5) == (docs[:5], docs[5:])  # ceil(5.5) == 6
    assert split_documents(docs[:10], 0.99) == (docs[:1], docs[1:10])  # at least one train doc


def test_unsplittable_text_raises() -> None:
    with pytest.raises(ValueError, match="no whitespace to cut at"):
        split_documents(("abcdefghij",), 0.1)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True, "0.1"])
def test_bad_heldout_fraction(fraction: object) -> None:
    with pytest.raises(ValueError, match=r"^heldout_fraction: .* allowed: (0 < value < 1|a number)$"):
        load_corpus("sample", heldout_fraction=fraction)  # type: ignore[arg-type]


def test_whitespace_only_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt contains no text"):
        load_corpus(str(path))


def test_invalid_utf8_raises(tmp_path: Path) -> None:
    path = tmp_path / "bin.txt"
    path.write_bytes(b"abc \xff\xfe def")
    with pytest.raises(ValueError, match=r"bin\.txt is not valid UTF-8"):
        load_corpus(str(path))


# --- JSON / JSONL -----------------------------------------------------------


def test_jsonl_documents_per_line(tmp_path: Path) -> None:
    rows = [{"text": f"document number {i}", "id": i} for i in range(12)] + [{"text": "   "}]
    path = _write_jsonl(tmp_path / "docs.jsonl", rows)
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines are skipped
    corpus = load_corpus(str(path))
    docs = tuple(f"document number {i}" for i in range(12))
    assert corpus.splits == {"train": docs[:10], "test": docs[10:]}  # 12 docs -> ceil(1.2) == 2 held out


def test_jsonl_custom_text_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"body": f"x{i}"} for i in range(10)])
    corpus = load_corpus(str(path), text_field="body")
    assert corpus.documents("test") == ("x9",)


def test_jsonl_bad_line_names_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3 is not valid JSON"):
        load_corpus(str(path))


def test_jsonl_missing_field_names_line_and_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"content": "no text"}])
    with pytest.raises(ValueError, match=r"m\.jsonl line 2 has no field 'text'"):
        load_corpus(str(path))


def test_jsonl_non_string_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "n.jsonl", [{"text": 3}])
    with pytest.raises(ValueError, match=r"n\.jsonl line 1 field 'text' must be a string, got int"):
        load_corpus(str(path))


def test_jsonl_without_rows_raises(tmp_path: Path) -> None:
    path = tmp_path / "none.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"none\.jsonl contains no text"):
        load_corpus(str(path))


def test_json_list_of_records(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"text": f"t{i}"} for i in range(9)] + ["t9"]), encoding="utf-8")
    assert load_corpus(str(path)).splits == {"train": tuple(f"t{i}" for i in range(9)), "test": ("t9",)}
    path.write_text(json.dumps({"text": "x"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"list\.json must hold a JSON list"):
        load_corpus(str(path))


# --- directories ------------------------------------------------------------


def test_directory_with_split_files_and_dirs(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("train text one", encoding="utf-8")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "b.md").write_text("train doc b", encoding="utf-8")
    (tmp_path / "train" / "a.txt").write_text("train doc a", encoding="utf-8")
    (tmp_path / "train" / "ignored.bin").write_text("binary", encoding="utf-8")
    _write_jsonl(tmp_path / "valid.jsonl", [{"text": "v1"}, {"text": "v2"}])
    (tmp_path / "test.txt").write_text("test text\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a split", encoding="utf-8")
    corpus = load_corpus(str(tmp_path))
    assert corpus.splits == {
        "train": ("train doc a", "train doc b", "train text one"),
        "validation": ("v1", "v2"),
        "test": ("test text\n",),
    }
    assert corpus.heldout_split == "test"


def test_directory_with_only_train_split_is_cut(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("first part of the text\n\nsecond part", encoding="utf-8")
    corpus = load_corpus(str(tmp_path), heldout_fraction=0.5)
    assert corpus.splits == {"train": ("first part of the text",), "test": ("second part",)}


def test_directory_with_empty_split_raises(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("text", encoding="utf-8")
    (tmp_path / "test.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"split 'test' of .* has no documents"):
        load_corpus(str(tmp_path))


def test_directory_of_documents(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for i in range(8):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"text {i}\n", encoding="utf-8")
    (tmp_path / "sub" / "z.md").write_text("markdown doc", encoding="utf-8")
    _write_jsonl(tmp_path / "sub" / "rows.jsonl", [{"text": "row a"}, {"text": "row b"}])
    (tmp_path / "blank.txt").write_text("   ", encoding="utf-8")
    (tmp_path / "skip.csv").write_text("a,b", encoding="utf-8")
    corpus = load_corpus(str(tmp_path))
    assert corpus.name == tmp_path.name
    expected = tuple(f"text {i}\n" for i in range(8)) + ("row a", "row b", "markdown doc")
    assert corpus.splits == {"train": expected[:9], "test": expected[9:]}  # 11 docs -> 2 held out


def test_directory_without_documents_raises(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{tmp_path.name} contains no documents"):
        load_corpus(str(tmp_path))


# --- Hugging Face datasets --------------------------------------------------


def test_an_unknown_name_is_never_looked_up_on_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    _fake_datasets(monkeypatch, lambda name, config: calls.append(name))
    with pytest.raises(ValueError, match=r"^'no/such-corpus' is neither an existing path nor a built-in name "
                                         r"\('austen-kjv', 'default', 'sample'\); a Hugging Face dataset is named "
                                         r"hf:NAME or hf:NAME:CONFIG$"):  # fmt: skip
        load_corpus("no/such-corpus")
    assert calls == []


def test_hf_prefix_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ValueError, match=r"hf:no/such is not a locally available Hugging Face dataset \(the "
                                         r"'datasets' package is not installed\)"):  # fmt: skip
        load_corpus("hf:no/such")


def test_missing_file_path_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    missing = str(tmp_path / "missing.txt")
    expected = r"missing\.txt' is neither an existing path nor a built-in name \('austen-kjv', 'default', 'sample'\)"
    with pytest.raises(ValueError, match=expected):
        load_corpus(missing)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: object) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hf_dataset_splits_are_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, config: str | None) -> dict[str, dict[str, list[str]]]:
        calls.append((name, config))
        return {"train": {"text": ["a", " ", "b"]}, "validation": {"text": ["v"]}, "other": {"text": ["o"]}}

    _fake_datasets(monkeypatch, load_dataset)
    corpus = load_corpus("hf:wikitext:wikitext-2-raw-v1")
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert corpus.splits == {"train": ("a", "b"), "validation": ("v",)}
    assert corpus.heldout_split == "validation"


def test_hf_loading_failure_names_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(name: str, config: str | None) -> None:
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)\nmore details")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(ValueError, match=r"hf:x is not a locally available Hugging Face dataset \(ConnectionError: "
                                         r"Couldn't reach 'x' on the Hub") as info:  # fmt: skip
        load_corpus("hf:x")
    assert "more details" not in str(info.value)


def test_hf_missing_text_field(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, lambda name, config: {"train": {"content": ["a"]}})
    with pytest.raises(ValueError, match=r"dataset d split 'train' has no field 'text'"):
        load_corpus("hf:d")


def test_repr_names_the_splits_without_the_text():
    corpus = load_corpus("sample")
    text = repr(corpus)
    assert text.startswith("Corpus(name='sample'") and "train=1, test=1" in text and len(text) < 300


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_data_path_that_is_no_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    import os

    if kind == "fifo":
        path = tmp_path / "pipe.txt"
        os.mkfifo(path)  # opening it for reading would block until a writer comes
        message = "is a FIFO"
    else:
        path = Path("/dev/zero")  # reading it never ends
        message = "is a character device"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} {message}; allowed: a regular text, .jsonl or "
                                         r"\.json file, a directory of them, or a built-in corpus$"):  # fmt: skip
        load_corpus(str(path))


def test_a_data_file_over_the_size_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sensitivity.data import corpus as module

    monkeypatch.setattr(module, "MAX_DATA_BYTES", 100)
    path = tmp_path / "big.txt"
    path.write_text("word " * 30, encoding="utf-8")
    with pytest.raises(ValueError, match=r"big.txt is 150 bytes; at most 100 bytes of text are read"):
        load_corpus(str(path))

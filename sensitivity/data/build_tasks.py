"""Build the shipped zero-shot tasks ``cloze`` and ``choice`` from the built-in corpus' test split.

Maintainer script (also run by the tests, which check that it rebuilds the shipped files byte for byte). It reads
``load_corpus("austen-kjv").documents("test")`` (79 chapters, about 75,000 words) and writes, for each task,
``<out>/<task>/<task>.yaml`` (an lm-eval task) and ``<task>.jsonl`` (its items), plus ``<out>/README.md``.
Everything is character-level (no tokenizer) and a function of the corpus and the seed alone.

* ``cloze`` (LAMBADA-style final-word prediction): a passage of 60-150 words from a sentence start to the end of a
  sentence whose final word (3+ letters, preceded by a space) also occurs earlier in the passage, so that the
  context helps. ``context`` is the passage up to the space before that word, ``target`` the word; the sentence's
  end punctuation is dropped. Chance is about 0 (open vocabulary).
* ``choice``: a context of 40-80 words from a sentence start to a sentence end, then four spans of the same number
  of words (10-25): the words that follow the context, and three distractors that start at sentence starts of
  other chapters of the split (drawn uniformly from all such spans). The gold index is drawn at random. Chance is
  25%.

Candidates are drawn in a seeded random order until there are enough: every cloze target (a sentence end) is used
once, though passages may share text; choice items never overlap (their context and true continuation are disjoint
from every other item's).

Usage::

    python -m sensitivity.data.build_tasks [--out DIR] [--seed N] [--items N]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .corpus import load_corpus

OUT = Path(__file__).resolve().parent.parent / "tasks"
SEED = 0
N_ITEMS = 500
CORPUS = "austen-kjv"
SPLIT = "test"

CLOZE_WORDS = (60, 150)
"""Passage length of a cloze item in words (whitespace-separated), the target included."""
CHOICE_CONTEXT_WORDS = (40, 80)
"""Context length of a choice item in words."""
CHOICE_SPAN_WORDS = (10, 25)
"""Words per choice (all four choices of an item have the same number)."""

_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Dr", "St", "Esq", "Col", "Capt", "Messrs", "Rev", "Gen", "Sen", "viz",
                            "etc", "Jun", "Sr", "Jr"})  # fmt: skip
# A sentence end: end punctuation and optional closing quotes/brackets, then whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
_WORD = re.compile(r"\S+")
# A cloze target: 3+ letters after a space, right before a sentence end.
_TARGET = re.compile(r"(?<= )([A-Za-z]{3,})(?=[.!?][\"')\]]*(?:\s|$))")
_HEADER = re.compile(r"\A[^\n]*\n\n(?:Chapter \d+\n\n)?")


@dataclass(frozen=True)
class _Doc:
    """One test document: its text, where its body starts, its words and its sentence starts (character offsets)."""

    index: int
    text: str
    body: int
    words: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]
    start_words: tuple[int, ...]
    """Index of the first word of each sentence start."""

    def word_at(self, offset: int) -> int:
        """Index of the first word starting at or after ``offset``."""
        return bisect.bisect_left(self.words, (offset, -1))

    def n_words(self, start: int, end: int) -> int:
        """Words starting in ``[start, end)``."""
        return self.word_at(end) - self.word_at(start)


def _document(index: int, text: str) -> _Doc:
    """Parse a document: skip its title (and ``Chapter N``) lines; sentence starts are line starts and the first
    word after a sentence end."""
    header = _HEADER.match(text)
    body = header.end() if header else 0
    words = tuple((m.start(), m.end()) for m in _WORD.finditer(text))
    starts = set()
    for m in re.finditer(r"(?:\A|\n)[ \t]*(?=\S)", text):
        starts.add(m.end())
    for m in _SENTENCE_END.finditer(text):
        if not _is_abbreviation(text, m.start()):
            nxt = re.compile(r"\s+(?=\S)").match(text, m.end())
            if nxt:
                starts.add(nxt.end())
    starts = sorted(s for s in starts if s >= body)
    first_words = tuple(bisect.bisect_left(words, (s, -1)) for s in starts)
    return _Doc(index, text, body, words, tuple(starts), first_words)


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the period at ``dot`` ends an abbreviation (``Mrs.``) or an initial (``J.``) rather than a sentence."""
    m = re.search(r"([A-Za-z]+)\Z", text[max(0, dot - 12) : dot])
    return text[dot] == "." and m is not None and (m.group(1) in _ABBREVIATIONS or len(m.group(1)) == 1)


def _sentence_ends(doc: _Doc) -> list[tuple[int, int]]:
    """``(end of the last word, end of its punctuation)`` of every sentence in the body."""
    return [(m.start(), m.end()) for m in _SENTENCE_END.finditer(doc.text, doc.body)
            if not _is_abbreviation(doc.text, m.start()) and m.start() > 0 and not doc.text[m.start() - 1].isspace()]


def _pick_start(doc: _Doc, end: int, words: tuple[int, int], rng: random.Random, last_word_end: int) -> int | None:
    """A random sentence start before ``end`` such that the span ``[start, last_word_end)`` holds ``words`` words."""
    last = doc.word_at(last_word_end)  # words of [start, last_word_end): last - first word of start
    lo = bisect.bisect_left(doc.start_words, last - words[1])
    hi = min(bisect.bisect_right(doc.start_words, last - words[0]), bisect.bisect_left(doc.starts, end))
    return doc.starts[rng.randrange(lo, hi)] if lo < hi else None


def _disjoint(spans: dict[int, list[tuple[int, int]]], doc: int, start: int, end: int) -> bool:
    return all(end <= s or start >= e for s, e in spans.get(doc, ()))


def build_cloze(docs: list[_Doc], n_items: int, seed: int) -> list[dict]:
    """The cloze items (see the module docstring), sorted by document and offset."""
    rng = random.Random(f"cloze-{seed}")
    candidates = []
    for doc in docs:
        for m in _TARGET.finditer(doc.text, doc.body):
            if not _is_abbreviation(doc.text, m.end()):
                candidates.append((doc.index, m.start(), m.end()))
    rng.shuffle(candidates)
    by_index = {d.index: d for d in docs}
    items = []
    for index, t_start, t_end in candidates:
        doc, target = by_index[index], by_index[index].text[t_start:t_end]
        earlier = [m.start() for m in re.compile(rf"\b{target}\b").finditer(doc.text, doc.body, t_start - 1)]
        if not earlier:
            continue
        # A passage start at or before the target's last earlier occurrence: the context holds the target.
        start = _pick_start(doc, earlier[-1] + 1, CLOZE_WORDS, rng, t_end)
        if start is None:
            continue
        context = doc.text[start : t_start - 1]
        if context != context.strip():
            continue
        items.append({"doc": index, "start": start, "context": context, "target": target})
        if len(items) == n_items:
            break
    items.sort(key=lambda it: (it["doc"], it["start"]))
    return [{"id": f"cloze-{i:04d}", **it} for i, it in enumerate(items)]


def _span(doc: _Doc, start: int, n: int) -> str | None:
    """The ``n`` words from character ``start`` joined by single spaces (None if the document ends first)."""
    first = doc.word_at(start)
    if first + n > len(doc.words):
        return None
    return " ".join(doc.text[a:b] for a, b in doc.words[first : first + n])


def build_choice(docs: list[_Doc], n_items: int, seed: int) -> list[dict]:
    """The choice items (see the module docstring), sorted by document and offset."""
    rng = random.Random(f"choice-{seed}")
    candidates = [(doc.index, word_end, punct_end) for doc in docs for word_end, punct_end in _sentence_ends(doc)]
    rng.shuffle(candidates)
    by_index = {d.index: d for d in docs}
    kept: dict[int, list[tuple[int, int]]] = {}
    items, cache = [], {}
    for index, _, end in candidates:
        doc = by_index[index]
        start = _pick_start(doc, end, CHOICE_CONTEXT_WORDS, rng, end)
        nxt = bisect.bisect_left(doc.starts, end)
        if start is None or nxt == len(doc.starts):
            continue
        gold_start, n = doc.starts[nxt], rng.randint(*CHOICE_SPAN_WORDS)
        gold = _span(doc, gold_start, n)
        if gold is None or doc.text[end:gold_start].strip():
            continue
        gold_end = doc.words[doc.word_at(gold_start) + n - 1][1]
        if not _disjoint(kept, index, start, gold_end):
            continue
        distractors = _distractors(doc, docs, n, gold, rng, cache)
        kept.setdefault(index, []).append((start, gold_end))
        answer = rng.randrange(4)
        choices = distractors[:answer] + [gold] + distractors[answer:]
        items.append({"doc": index, "start": start, "context": doc.text[start:end], "choices": choices,
                      "gold": answer})  # fmt: skip
        if len(items) == n_items:
            break
    items.sort(key=lambda it: (it["doc"], it["start"]))
    return [{"id": f"choice-{i:04d}", **it} for i, it in enumerate(items)]


def _distractors(doc: _Doc, docs: list[_Doc], n: int, gold: str, rng: random.Random, cache: dict) -> list[str]:
    """Three distinct spans of ``n`` words, each starting at a sentence start of another document than ``doc``,
    drawn uniformly from all such spans of the split."""
    if n not in cache:  # (document, span) of every span of n words from a sentence start
        found = ((d.index, _span(d, s, n)) for d in docs for s in d.starts)
        cache[n] = [(i, span) for i, span in found if span is not None]
    picked: list[str] = []
    while len(picked) < 3:
        index, span = rng.choice(cache[n])
        if index != doc.index and span != gold and span not in picked:
            picked.append(span)
    return picked


# ---- files ------------------------------------------------------------------------------------------------------

_YAML_HEAD = """\
# lm-eval task built by `python -m sensitivity.data.build_tasks` from the test split of the built-in corpus
# austen-kjv (see ../README.md). data_files is relative to this folder: `sensitivity evaluate --tasks {name}` and
# sensitivity.eval.evaluate_tasks / lm_eval_rows resolve it (plain lm-eval needs an absolute path there).
task: sensitivity_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
"""
CLOZE_YAML = _YAML_HEAD.format(name="cloze") + """\
output_type: loglikelihood
doc_to_text: context
doc_to_target: " {{target}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
CHOICE_YAML = _YAML_HEAD.format(name="choice") + """\
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def _copy_baseline(items: list[dict]) -> float:
    """Share of cloze items whose target is the most frequent 3+ letter word of the context (ties: the latest)."""
    hits = 0
    for it in items:
        words = re.findall(r"[A-Za-z]{3,}", it["context"])
        counts = Counter(words)
        best = max(counts.values())
        guess = next(w for w in reversed(words) if counts[w] == best)
        hits += guess == it["target"]
    return hits / len(items)


def _words(text: str) -> int:
    return len(text.split())


def _readme(cloze: list[dict], choice: list[dict], texts: dict[str, str], seed: int) -> str:
    mean = lambda xs: f"{sum(xs) / len(xs):.1f}"  # noqa: E731
    lo, hi = CLOZE_WORDS
    x_lo, x_hi = CHOICE_CONTEXT_WORDS
    s_lo, s_hi = CHOICE_SPAN_WORDS
    c_mean = mean([_words(it["context"]) + 1 for it in cloze])
    x_mean = mean([_words(it["context"]) for it in choice])
    s_mean = mean([_words(it["choices"][0]) for it in choice])
    golds = dict(sorted(Counter(it["gold"] for it in choice).items()))
    sha = {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in texts.items()}
    n_c, n_x = len(cloze), len(choice)
    d_c, d_x = len({it["doc"] for it in cloze}), len({it["doc"] for it in choice})
    copy = f"{_copy_baseline(cloze):.1%}"
    return f"""\
# Built-in zero-shot tasks

Two small zero-shot tasks built from the **test split of the built-in corpus `austen-kjv`** (79 chapters of Austen,
Bierce's *The Devil's Dictionary* and the King James Bible; see `sensitivity/data/builtin/README.md`), so that a
pruned model can be scored on something other than perplexity offline. Written by
`python -m sensitivity.data.build_tasks` (seed {seed}); everything is character-level (no tokenizer) and the tests
check that rebuilding gives these files byte for byte. Each folder holds an lm-eval task YAML and its items as JSONL.

| task | items | output type | metrics | chance level |
|---|---|---|---|---|
| `cloze` | {n_c} from {d_c} chapters | `loglikelihood` | `acc` (greedy), `perplexity` | about 0 (open vocabulary) |
| `choice` | {n_x} from {d_x} chapters | `multiple_choice` | `acc`, `acc_norm` | 25% |

Score them with `sensitivity evaluate --tasks cloze,choice` or `sensitivity.eval.evaluate_tasks(model, ["cloze",
"choice"])` (the toolkit's own scoring, equal to lm-eval's), or through lm-eval with `--engine lm-eval`.

## `cloze`: LAMBADA-style final word

- A passage of {lo}-{hi} words (mean {c_mean}) that starts at a sentence start (a line start, or the word after a
  sentence end) and ends at a sentence end (`.`, `!` or `?`, not after `Mr`, `Mrs` and other abbreviations or
  initials). The sentence's final word is the **target**: 3 or more ASCII letters, preceded by a space, and (the
  LAMBADA-like filter) occurring as a whole word earlier in the passage, so the context helps.
- `context` is the passage up to the space before the target (it never ends in whitespace); `target` is the word
  without its punctuation. lm-eval scores `context` followed by `" " + target` (`doc_to_target: " {{{{target}}}}"`).
- Metrics: `acc` = 1 when every target token is the model's argmax (greedy), mean over items; `perplexity` =
  `exp(-mean over items of the summed log-likelihood of the target tokens)` (lm-eval's `perplexity` aggregation:
  per item, not per token).
- **Chance level about 0**: the answer is any word of the vocabulary. A copy heuristic that guesses the context's
  most frequent 3+ letter word scores {copy}.

## `choice`: which span comes next

- A context of {x_lo}-{x_hi} words (mean {x_mean}) from a sentence start to a sentence end, then four **choices** of
  the same number of words ({s_lo}-{s_hi}, mean {s_mean}), each joined by single spaces: the words that follow the
  context in the chapter, and three distractors: spans of as many words that start at sentence starts of *other*
  chapters of the split, drawn uniformly from all such spans (so a distractor may come from another book or genre:
  the task measures whether the model follows its context, topic and style included). `gold` is the index of the
  true continuation, drawn at random (gold index counts {golds}).
- lm-eval scores `context` followed by `" " + choice` for each choice. `acc`: the choice of highest summed
  log-likelihood is the gold one; `acc_norm`: the same with each log-likelihood divided by the choice's length in
  characters (lm-eval's `acc_norm`).
- **Chance level 25%** (four choices of equal word count, gold position uniform).

## Items and files

- Candidates are taken in a seeded random order until {N_ITEMS} are kept. Each cloze target (a sentence end) is used
  once, though passages may share text; choice items never overlap (context and true continuation disjoint from
  every other item's). Files list items by chapter (`doc`: index among the test split's documents) and character
  offset (`start`) of the passage or context.
- `cloze/cloze.jsonl`: `{{"id", "doc", "start", "context", "target"}}`, SHA-256
  `{sha["cloze"]}`.
- `choice/choice.jsonl`: `{{"id", "doc", "start", "context", "choices", "gold"}}`, SHA-256
  `{sha["choice"]}`.
- `*/<task>.yaml`: lm-eval task configs (`task: sensitivity_<task>`, `dataset_path: json`). Their `data_files` is
  relative to the YAML's folder; the toolkit makes it absolute at run time (plain `lm_eval` needs it absolute).
- The text is public domain (see the corpus' data card).
"""


def build(out: Path = OUT, *, seed: int = SEED, n_items: int = N_ITEMS, documents: Sequence[str] | None = None
          ) -> dict[str, Path]:  # fmt: skip
    """Build both tasks into ``out`` (``out/cloze/``, ``out/choice/``, ``out/README.md``); returns the paths written.

    Args:
        out: Destination folder (the package's ``sensitivity/tasks`` by default).
        seed: Seed of every random draw.
        n_items: Items per task (fewer if the split runs out of candidates).
        documents: The test split's documents, if already loaded (default: read from the built-in corpus).
    """
    if documents is None:
        documents = load_corpus(CORPUS).documents(SPLIT)
    docs = [_document(i, text) for i, text in enumerate(documents)]
    cloze, choice = build_cloze(docs, n_items, seed), build_choice(docs, n_items, seed)
    texts = {"cloze": _jsonl(cloze), "choice": _jsonl(choice)}
    files = {out / "cloze" / "cloze.jsonl": texts["cloze"], out / "cloze" / "cloze.yaml": CLOZE_YAML,
             out / "choice" / "choice.jsonl": texts["choice"], out / "choice" / "choice.yaml": CHOICE_YAML,
             out / "README.md": _readme(cloze, choice, texts, seed)}  # fmt: skip
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
    return {path.relative_to(out).as_posix(): path for path in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"destination folder (default {OUT})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed (default {SEED})")
    parser.add_argument("--items", type=int, default=N_ITEMS, help=f"items per task (default {N_ITEMS})")
    args = parser.parse_args(argv)
    for name, path in build(args.out, seed=args.seed, n_items=args.items).items():
        sys.stdout.write(f"{name}: {path.stat().st_size:,} bytes\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

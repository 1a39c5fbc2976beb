"""Build the offline lm-eval task data from the held-out text only (calib_data/heldout/*).

    python evaluation/tasks/build_tasks.py [--seed 0] [--num 300]

writes evaluation/tasks/data/quantlab_cloze.jsonl and quantlab_continuation.jsonl. The output is a pure
function of the held-out files, the seed and ``--num``: rerunning it reproduces the committed files
byte for byte. Calibration text (calib_data/gpl-3.txt, calib_data/stdlib_docstrings.jsonl) is never read.

Text handling, shared by both tasks: each document (a whole .txt file, or one JSONL row) is cut into
paragraphs at blank lines; headings, rules (``=====``) and code-looking paragraphs are dropped; list
markers such as ``1.1.`` or ``(a)`` are stripped; whitespace is collapsed; and each paragraph is split
into sentences after ``.``, ``!`` or ``?`` followed by a capital letter. A passage is a run of
consecutive sentences of one document.

quantlab_cloze (LAMBADA-style): the passage's final word is the target, with its trailing punctuation
dropped as LAMBADA does. LAMBADA kept only passages where humans could guess the word from the whole
passage but not from the last sentence; without annotators, the stand-in is that the target (4+
letters, not a function word) already occurs earlier in the passage, so a model that reads the context
can copy it. Passages hold 30-100 words and never overlap.

quantlab_continuation (multiple choice): a prefix of 15-45 words, then the true next sentence (6-20
words) among four endings. The three distractors are sentences of the same source file, from another
document (or, in a single-document license file, at least 20 sentences away), with 0.5x-2x the true
sentence's word count, so neither topic nor length gives the answer away. The label position is drawn
from the seed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
HELDOUT = REPO / "calib_data" / "heldout"
SOURCES = ("apache-2.0.txt", "lgpl-2.1.txt", "mpl-2.0.txt", "stdlib_docstrings.jsonl")

_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')]?\s+(?=[\"'(]?[A-Z])")
_LIST_MARKER = re.compile(r"^(?:\(?[0-9]{1,2}(?:\.[0-9]{1,2})*[.)]|\(?[a-z][.)]|\([a-z]+\))\s+")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[,.;:!?\"')]*$")
_STOP = frozenset(
    "that this with from have been were will would shall which their there these those they them then "
    "than when what where your such into also only other each must upon under over more most some very "
    "does done being here about after before both either neither".split()
)
MIN_CLOZE_WORDS, MAX_CLOZE_WORDS = 30, 100
MIN_PREFIX_WORDS, MAX_PREFIX_WORDS = 15, 45
MIN_ENDING_WORDS, MAX_ENDING_WORDS = 6, 20
FAR_SENTENCES = 20  # distractors from a single-document file come at least this far from the truth


def documents() -> list[tuple[str, str]]:
    """(source name, text) for every held-out document: a .txt file is one, a JSONL row is one."""
    docs = []
    for name in SOURCES:
        path = HELDOUT / name
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                docs += [(name, json.loads(line)["text"]) for line in f if line.strip()]
        else:
            docs.append((name, path.read_text(encoding="utf-8")))
    return docs


def _prose(paragraph: str) -> str | None:
    """The paragraph as one line of prose, or None for headings, rules and code."""
    lines = [ln.strip() for ln in paragraph.strip().splitlines()]
    lines = [ln for ln in lines if ln and not re.fullmatch(r"[-=*_~#]{3,}", ln)]
    text = _LIST_MARKER.sub("", " ".join(" ".join(lines).split()))
    words = text.split()
    if len(words) < 6 or not text.endswith((".", "!", "?", ":", ";", ",", '"', ")")):
        return None
    if sum(bool(_WORD.match(w)) for w in words) < 0.8 * len(words):
        return None  # signatures, tables, code
    return text


def sentences(text: str) -> list[str]:
    """The prose sentences of one document, in order."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        prose = _prose(paragraph)
        if prose:
            out += [s.strip() for s in _SENT_SPLIT.split(prose) if s.strip()]
    return out


def _is_clean_sentence(s: str, lo: int, hi: int) -> bool:
    words = s.split()
    return lo <= len(words) <= hi and s.endswith((".", "!", "?")) and all(_WORD.match(w) for w in words)


def cloze_examples(docs: list[tuple[str, list[str]]]) -> list[dict]:
    """Non-overlapping passages whose final word already occurred earlier in the passage."""
    out = []
    for source, sents in docs:
        start = 0  # the next passage may not reuse sentences of the previous one
        for i in range(len(sents)):
            words = sents[i].split()
            target = words[-1].rstrip(".!?\"')")
            if not (target.isalpha() and len(target) >= 4 and target.lower() not in _STOP):
                continue
            j, n = i, len(words)
            while j > start and n < MIN_CLOZE_WORDS:
                j -= 1
                n += len(sents[j].split())
            if not MIN_CLOZE_WORDS <= n <= MAX_CLOZE_WORDS:
                continue
            context = " ".join(sents[j:i] + [" ".join(words[:-1])])
            if target not in re.findall(r"[A-Za-z]+", context):
                continue
            out.append({"context": context, "target": " " + target, "source": source})
            start = i + 1
    return out


def continuation_examples(docs: list[tuple[str, list[str]]], rng: random.Random) -> list[dict]:
    """Prefix + true next sentence + three length-matched distractors from the same source file."""
    pool: dict[str, list[tuple[int, int, str]]] = {}  # source -> (doc index, sentence index, sentence)
    for d, (source, sents) in enumerate(docs):
        pool.setdefault(source, []).extend(
            (d, k, s) for k, s in enumerate(sents) if _is_clean_sentence(s, MIN_ENDING_WORDS, MAX_ENDING_WORDS)
        )
    out = []
    for d, (source, sents) in enumerate(docs):
        start = 0
        for i in range(1, len(sents)):
            true = sents[i]
            if not _is_clean_sentence(true, MIN_ENDING_WORDS, MAX_ENDING_WORDS):
                continue
            j, n = i, 0
            while j > start and n < MIN_PREFIX_WORDS:
                j -= 1
                n += len(sents[j].split())
            if not MIN_PREFIX_WORDS <= n <= MAX_PREFIX_WORDS:
                continue
            size = len(true.split())
            candidates = [
                s for (dd, k, s) in pool[source]
                if (dd != d or abs(k - i) >= FAR_SENTENCES) and s != true and 0.5 * size <= len(s.split()) <= 2 * size
            ]
            if len(set(candidates)) < 3:
                continue
            endings = rng.sample(sorted(set(candidates)), 3)
            label = rng.randrange(4)
            endings.insert(label, true)
            out.append({"context": " ".join(sents[j:i]), "endings": endings, "label": label, "source": source})
            start = i + 1
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=300, help="examples per task (at most)")
    parser.add_argument("--out", type=Path, default=HERE / "data")
    args = parser.parse_args(argv)
    docs = [(source, sentences(text)) for source, text in documents()]
    rng = random.Random(args.seed)
    for name, rows in (("quantlab_cloze", cloze_examples(docs)), ("quantlab_continuation", continuation_examples(docs, rng))):
        rng.shuffle(rows)
        rows = rows[: args.num]
        _write(args.out / f"{name}.jsonl", rows)
        by_source = {s: sum(r["source"] == s for r in rows) for s in SOURCES}
        print(f"{name}: {len(rows)} examples {by_source}")


if __name__ == "__main__":
    main()

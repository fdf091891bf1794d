"""Summarise a long document chapter by chapter in parallel, then verify the result.

An example agent for zlink's fan-out/verify pattern, with no network and no
language model: the summariser is extractive. It scores every sentence of a
chapter by how frequent its content words are in that chapter and keeps the
best few, in their original order.

* ``summarize_chapter(title, text, max_sentences=3, number=None)`` -- one
  chapter's summary (a skill: chapters are summarised in parallel).
* ``verify_summary(chapter_summaries)`` -- checks that every chapter is there
  exactly once, in order, with a non-empty summary shorter than the chapter,
  and merges them into one summary of the document (a skill: the reduce step).
* ``summarize_stream(text, max_sentences=3)`` -- a generator skill doing the
  whole document on one node: it yields each chapter's summary as soon as it
  is ready and returns the verified merge.
* ``split_chapters(text)`` -- a plain helper: the chapters of a text, split on
  heading lines such as ``Chapter 3``, ``CHAPTER IV: The Storm`` or a markdown
  ``# Title``.

Everything the skills take and return is plain msgpack data (dicts with string
keys, lists, str, int, float, bool). Run it on a swarm::

    zlink node --skills nodes/summarize.py              # on each worker
    python -m nodes.summarize nodes/sample_book.txt     # with $ZLINK_JOIN set (a client's join string)

or in one process, without zlink::

    from nodes import summarize
    print(summarize.summarize_local(open("nodes/sample_book.txt").read())["summary"])
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import zlink

Result = dict[str, Any]

MAX_SENTENCES = 3
#: a one-sentence chapter cannot lose a sentence: its summary keeps this many words
SHORT_WORDS = 12

_HEADING = re.compile(
    r"^[ \t]*(?:"
    r"#[ \t]+(?P<md>\S.*?)"  # markdown "# Title" (not "## Section")
    r"|(?P<word>chapter)[ \t]+(?P<num>\d+|[ivxlcdm]+)\b(?P<rest>[^\n]{0,80}?)"  # "Chapter 3", "CHAPTER IV: Title"
    r")[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]*\s+(?=[\"'\u201c\u2018(]?[A-Z0-9])")
_WORD = re.compile(r"[a-z][a-z'\u2019]*")
_CHAPTER_NUMBER = re.compile(r"^\s*chapter\s+(\d+)\b", re.IGNORECASE)

_STOPWORDS = """
    a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her
    here hers herself him himself his how i if in into is it its itself just me more most my myself no nor
    not now of off on once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too under until up
    upon very was we were what when where which while who whom why will with would you your yours yourself
    yourselves one two said says say also into onto us let may might must shall ever every still yet
"""
STOPWORDS = frozenset(_STOPWORDS.split())


# --------------------------------------------------------------------------- plain helpers


def split_chapters(text: str) -> list[dict[str, Any]]:
    """The chapters of ``text``: ``[{"number": 1, "title": ..., "text": ...}, ...]``.

    A chapter starts at a heading line: ``Chapter N`` or ``CHAPTER N`` (arabic
    or roman numerals, optionally followed by a title) or a markdown ``# Title``.
    Chapters are numbered 1, 2, 3... in the order they appear; the title is the
    heading without its ``#``. Text before the first heading (a title page) is
    not a chapter; a text without any heading is one chapter, "Chapter 1".
    Chapters with no text under their heading are skipped.
    """
    headings = list(_HEADING.finditer(text))
    if not headings:
        body = text.strip()
        return [{"number": 1, "title": "Chapter 1", "text": body}] if body else []
    chapters: list[dict[str, Any]] = []
    for k, m in enumerate(headings):
        end = headings[k + 1].start() if k + 1 < len(headings) else len(text)
        body = text[m.end() : end].strip()
        if not body:
            continue
        title = (m.group("md") or m.group(0)).strip()
        chapters.append({"number": len(chapters) + 1, "title": title, "text": body})
    return chapters


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph-formatted text, whitespace collapsed."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]


def _words(sentence: str) -> list[str]:
    return [w for w in _WORD.findall(sentence.lower().replace("\u2019", "'")) if w not in STOPWORDS and len(w) > 2]


def chapter_number(title: str) -> int | None:
    """The number in a ``Chapter N ...`` title, if any."""
    m = _CHAPTER_NUMBER.match(title)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- skills


@zlink.skill(tags=["text", "summary"], examples=['["Chapter 1", "It rained. The roof leaked. We left."]'])
def summarize_chapter(title: str, text: str, max_sentences: int = MAX_SENTENCES, number: int | None = None) -> Result:
    """Extractive summary of one chapter: its ``max_sentences`` best sentences, in order.

    A sentence scores the mean frequency (relative to the chapter's most
    frequent content word) of its content words. A chapter with no more than
    ``max_sentences`` sentences still loses its weakest sentence, so a summary
    is always shorter than its chapter; a one-sentence chapter is cut to its
    first words. ``number`` defaults to the number in a "Chapter N" title.
    """
    if max_sentences < 1:
        raise ValueError("max_sentences must be at least 1")
    sentences = split_sentences(text)
    freq = Counter(w for s in sentences for w in _words(s))
    top = max(freq.values(), default=1)

    def score(sentence: str) -> float:
        words = _words(sentence)
        return sum(freq[w] for w in words) / (top * len(words)) if words else 0.0

    keep = min(max_sentences, max(1, len(sentences) - 1))
    ranked = sorted(range(len(sentences)), key=lambda i: (-score(sentences[i]), i))
    chosen = sorted(ranked[:keep])
    summary = " ".join(sentences[i] for i in chosen)
    if len(sentences) == 1:
        words = summary.split()
        if len(words) > SHORT_WORDS:
            summary = " ".join(words[:SHORT_WORDS]) + " ..."
    return {
        "number": chapter_number(title) if number is None else number,
        "title": title,
        "summary": summary,
        "sentences": len(sentences),
        "kept": chosen,
        "chars": len(text),
        "summary_chars": len(summary),
        "keywords": [w for w, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:5]],
    }


@zlink.skill(tags=["text", "summary"])
def verify_summary(chapter_summaries: list[Any]) -> Result:
    """Check the chapter summaries and merge them into one summary of the document.

    Every chapter 1..N must be there exactly once and in order, and each summary
    must be non-empty and shorter than its chapter. The result has ``ok``, the
    list of ``problems`` (empty when ok), ``chapters``, the merged ``summary``
    (one paragraph per chapter, headed by its title), ``chars`` (the document's
    length), ``summary_chars`` and ``ratio``.
    """
    problems: list[dict[str, Any]] = []
    numbers: list[int] = []
    parts: list[str] = []
    chars = 0
    for pos, item in enumerate(chapter_summaries):
        if not isinstance(item, dict) or not isinstance(item.get("summary"), str):
            problems.append({"position": pos, "issue": "not a chapter summary"})
            continue
        number = item.get("number")
        title = str(item.get("title", ""))
        if not isinstance(number, int):
            problems.append({"position": pos, "title": title, "issue": "no chapter number"})
        else:
            numbers.append(number)
        summary = item["summary"].strip()
        length = item.get("chars")
        if not summary:
            problems.append({"position": pos, "title": title, "issue": "empty summary"})
        if not isinstance(length, int) or len(summary) >= length:
            problems.append({"position": pos, "title": title, "issue": "summary not shorter than its chapter"})
        chars += length if isinstance(length, int) else 0
        parts.append(f"{title}\n{summary}")
    counts = Counter(numbers)
    for number in sorted(n for n, c in counts.items() if c > 1):
        problems.append({"chapter": number, "issue": f"present {counts[number]} times"})
    if numbers:
        for number in sorted(set(range(1, max(numbers) + 1)) - set(numbers)):
            problems.append({"chapter": number, "issue": "missing"})
    if numbers != sorted(numbers):
        problems.append({"issue": "chapters out of order", "order": numbers})
    if not chapter_summaries:
        problems.append({"issue": "no chapters"})
    merged = "\n\n".join(parts)
    return {
        "ok": not problems,
        "problems": problems,
        "chapters": len(chapter_summaries),
        "summary": merged,
        "chars": chars,
        "summary_chars": len(merged),
        "ratio": round(len(merged) / chars, 3) if chars else 0.0,
    }


@zlink.skill(tags=["text", "summary", "stream"])
def summarize_stream(text: str, max_sentences: int = MAX_SENTENCES) -> Generator[Result, None, Result]:
    """Generator skill: yield each chapter's summary as it is made; return the verified merge.

    ::

        s = client.stream("summarize_stream", book)
        for chapter in s:
            print(chapter["title"], chapter["summary"])
        print(s.result()["summary"])
    """
    done: list[Result] = []
    for chapter in split_chapters(text):
        if zlink.current_task().cancelled:
            break
        item = summarize_chapter(chapter["title"], chapter["text"], max_sentences, chapter["number"])
        done.append(item)
        yield item
    return verify_summary(done)


# --------------------------------------------------------------------------- running it


def chapter_args(chapters: Sequence[dict[str, Any]], max_sentences: int = MAX_SENTENCES) -> list[tuple[Any, ...]]:
    """``summarize_chapter`` arguments for each chapter, for ``map_reduce(..., unpack=True)``."""
    return [(c["title"], c["text"], max_sentences, c["number"]) for c in chapters]


def summarize_local(text: str, max_sentences: int = MAX_SENTENCES) -> Result:
    """The whole job in this process, without zlink (the reference for a swarm run)."""
    chapters = split_chapters(text)
    return verify_summary([summarize_chapter(*args) for args in chapter_args(chapters, max_sentences)])


def format_result(result: Result) -> str:
    """The merged summary and the verifier's verdict, for people."""
    head = (
        f"{result['chapters']} chapters, {result['chars']:,} characters -> "
        f"{result['summary_chars']:,} ({result['ratio']:.0%})"
    )
    lines = [head, "", result["summary"], ""]
    if result["ok"]:
        lines.append("verified: every chapter once, in order, each summary shorter than its chapter")
    else:
        lines.append(f"NOT VERIFIED: {len(result['problems'])} problem(s)")
        lines += [f"  {json.dumps(p)}" for p in result["problems"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nodes.summarize FILE``: summarise FILE on the swarm named by $ZLINK_JOIN."""
    parser = argparse.ArgumentParser(prog="python -m nodes.summarize", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="a text or markdown document with chapter headings")
    parser.add_argument("--sentences", type=int, default=MAX_SENTENCES, help="sentences kept per chapter")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per task")
    parser.add_argument("--json", action="store_true", help="print the verified result as JSON")
    parser.add_argument("--local", action="store_true", help="run in this process, without zlink")
    args = parser.parse_args(argv)
    try:
        text = args.file.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    chapters = split_chapters(text)
    if not chapters:
        print(f"{args.file} has no text to summarise", file=sys.stderr)
        return 2
    if args.local:
        result = summarize_local(text, args.sentences)
    else:
        try:
            with zlink.Client() as client:  # $ZLINK_JOIN
                result = client.map_reduce(
                    "summarize_chapter", chapter_args(chapters, args.sentences), "verify_summary",
                    unpack=True, timeout=args.timeout,
                )  # fmt: skip
        except zlink.ConfigError as exc:
            print(f"{exc}; or run it in this process with --local", file=sys.stderr)
            return 2
        except zlink.ZlinkError as exc:
            print(f"zlink: {exc}", file=sys.stderr)
            return 3 if isinstance(exc, zlink.ConnectError) else 1
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

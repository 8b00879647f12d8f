"""The clean stage's filters: records (doc_id, source, text) and the generator steps they flow through.

In the style of datatrove, each step takes and yields records, and says why it drops one (a
`DropCounter` counts drops per reason and modifications per step). The steps, in the order
`build_steps` chains them, are listed in llm/clean.py's docstring; llm.clean re-exports every name
here, so `from llm.clean import clean_texts` keeps working.

    from llm.clean_filters import clean_texts
    from llm.config import CleanConfig
    clean_texts(["\ufeffHello\r\nworld   "], CleanConfig(min_chars=0))   # ['Hello\nworld']

Run `python -m llm.clean_filters FILE` to print a text file as the default steps leave it.
"""
from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from llm.config import CleanConfig

DROP_REASONS = ("too_short", "no_text", "duplicate")
LETTER_RE = re.compile(r"[^\W\d_]")  # a letter of any script
JUNK_RE = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")  # control characters (not \t \n \v \f \r), U+FFFD


@dataclass
class Record:
    doc_id: str
    source: str
    text: str


class DropCounter:
    """Counts dropped records per reason (every known reason starts at 0) and modified ones per step."""

    def __init__(self, reasons: Iterable[str] = DROP_REASONS):
        self.dropped: dict[str, int] = {r: 0 for r in reasons}
        self.modified: dict[str, int] = {}
        self.dropped_by_source: dict[str, dict[str, int]] = {}

    def drop(self, reason: str, record: Record) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        per = self.dropped_by_source.setdefault(record.source, {})
        per[reason] = per.get(reason, 0) + 1

    def modify(self, step: str) -> None:
        self.modified[step] = self.modified.get(step, 0) + 1

    def total(self) -> int:
        return sum(self.dropped.values())


Step = Callable[[Iterable[Record]], Iterator[Record]]

# --------------------------------------------------------------------------------------- steps

def strip_bom(records: Iterable[Record]) -> Iterator[Record]:
    for r in records:
        if r.text.startswith("\ufeff"):
            r.text = r.text[1:]
        yield r


def normalize_newlines(records: Iterable[Record]) -> Iterator[Record]:
    for r in records:
        if "\r" in r.text:
            r.text = r.text.replace("\r\n", "\n").replace("\r", "\n")
        yield r


def normalize_unicode(form: str) -> Step:
    def step(records: Iterable[Record]) -> Iterator[Record]:
        for r in records:
            if not unicodedata.is_normalized(form, r.text):
                r.text = unicodedata.normalize(form, r.text)
            yield r
    return step


_PG = r"\*\*\*[ \t]*{what} OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK\b[^\n]*?\*\*\*[ \t]*$"
GUTENBERG_START = re.compile(_PG.format(what="START"), re.IGNORECASE | re.MULTILINE)
GUTENBERG_END = re.compile(_PG.format(what="END"), re.IGNORECASE | re.MULTILINE)


def gutenberg_body(text: str) -> Optional[str]:
    """The text strictly between the START and END marker lines (None if neither marker is present).

    Expects LF newlines. With only one marker present, the text after START (or before END) is kept.
    """
    start = GUTENBERG_START.search(text)
    end = GUTENBERG_END.search(text, start.end() if start else 0)
    if start is None and end is None:
        return None
    lo = 0
    if start is not None:
        nl = text.find("\n", start.end())
        lo = len(text) if nl < 0 else nl + 1
    hi = len(text)
    if end is not None:
        hi = max(lo, end.start() - 1 if end.start() > 0 and text[end.start() - 1] == "\n" else end.start())
    return text[lo:hi]


def strip_gutenberg(counter: DropCounter) -> Step:
    def step(records: Iterable[Record]) -> Iterator[Record]:
        for r in records:
            body = gutenberg_body(r.text)
            if body is not None:
                r.text = body
                counter.modify("gutenberg_stripped")
            yield r
    return step


_BLANKS = re.compile(r"\n{3,}")


def collapse_blank_lines(records: Iterable[Record]) -> Iterator[Record]:
    for r in records:
        r.text = _BLANKS.sub("\n\n", r.text)
        yield r


_TRAILING_WS = re.compile(r"[^\S\n]+$", re.MULTILINE)


def strip_whitespace(records: Iterable[Record]) -> Iterator[Record]:
    for r in records:
        text = _TRAILING_WS.sub("", r.text)
        r.text = text.lstrip("\n").rstrip()
        yield r


def drop_short(min_chars: int, counter: DropCounter) -> Step:
    def step(records: Iterable[Record]) -> Iterator[Record]:
        for r in records:
            if len(r.text) < min_chars or not r.text:
                counter.drop("too_short", r)
                continue
            yield r
    return step


def has_text(text: str) -> bool:
    """Whether a document is text: it has a letter, and no more control characters than letters."""
    if LETTER_RE.search(text) is None:
        return False
    junk = len(JUNK_RE.findall(text))
    return junk == 0 or junk <= len(LETTER_RE.findall(text))


def drop_no_text(counter: DropCounter) -> Step:
    def step(records: Iterable[Record]) -> Iterator[Record]:
        for r in records:
            if not has_text(r.text):
                counter.drop("no_text", r)
                continue
            yield r
    return step


def drop_duplicates(counter: DropCounter) -> Step:
    def step(records: Iterable[Record]) -> Iterator[Record]:
        seen: set[bytes] = set()
        for r in records:
            h = hashlib.blake2b(r.text.encode("utf-8"), digest_size=16).digest()
            if h in seen:
                counter.drop("duplicate", r)
                continue
            seen.add(h)
            yield r
    return step


def build_steps(cfg: CleanConfig, counter: DropCounter) -> list[Step]:
    """The configured step chain, in order."""
    steps = document_steps(cfg, counter)
    if cfg.dedup:
        steps.append(drop_duplicates(counter))
    return steps


def document_steps(cfg: CleanConfig, counter: DropCounter) -> list[Step]:
    """The steps that look at one document at a time (all but drop_duplicates), in order."""
    steps: list[Step] = [strip_bom, normalize_newlines]
    if cfg.normalize != "none":
        steps.append(normalize_unicode(cfg.normalize))
    if cfg.strip_gutenberg:
        steps.append(strip_gutenberg(counter))
    if cfg.collapse_blank_lines:
        steps.append(collapse_blank_lines)
    steps.append(strip_whitespace)
    steps.append(drop_short(cfg.min_chars, counter))
    steps.append(drop_no_text(counter))
    return steps


def apply_steps(records: Iterable[Record], steps: list[Step]) -> Iterator[Record]:
    for step in steps:
        records = step(records)
    return iter(records)


def clean_texts(texts: Iterable[str], cfg: Optional[CleanConfig] = None) -> list[str]:
    """Convenience: run the cleaning steps over plain strings (drops included), return the kept texts."""
    cfg = cfg or CleanConfig()
    recs = (Record(str(i), "text", t) for i, t in enumerate(texts))
    return [r.text for r in apply_steps(recs, build_steps(cfg, DropCounter()))]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m llm.clean_filters FILE")
    try:
        text = Path(sys.argv[1]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:  # bad input: one line, no traceback
        sys.exit(f"llm.clean_filters: error: {sys.argv[1]}: {e}")
    print("\n".join(clean_texts([text])) or "(dropped)")

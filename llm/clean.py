"""The clean stage: turn downloaded texts and user corpus files into one documents.parquet.

Input files become records (doc_id, source, text): a text file is one document; a .jsonl file is
one document per line (field "text"). Records then flow through small generator steps (in the
style of datatrove: each step takes and yields records, and says why it drops one):

    strip_bom            remove a leading U+FEFF
    normalize_newlines   CRLF / CR -> LF
    normalize_unicode    NFC or NFKC (cfg.normalize; "none" skips it)
    strip_gutenberg      keep strictly the text between the Project Gutenberg START and END marker
                         lines (both "*** START OF THIS PROJECT GUTENBERG EBOOK X ***" and
                         "***START OF THE PROJECT GUTENBERG EBOOK X***" forms)   [cfg.strip_gutenberg]
    collapse_blank_lines runs of 3+ newlines -> 2                                 [cfg.collapse_blank_lines]
    strip_whitespace     trailing whitespace of every line, leading blank lines and trailing
                         whitespace of the document
    drop_short           drop documents under cfg.min_chars characters   (reason "too_short")
    drop_no_text         drop documents without a letter, or with more control characters (NUL, ...)
                         than letters: binary data that happens to decode  (reason "no_text")
    drop_duplicates      drop exact duplicates by hash of the text       (reason "duplicate") [cfg.dedup]

A `DropCounter` collects drops per reason; every reason appears in the stage metrics as
dropped_<reason> (0 included). The-verdict.txt passes through unchanged, so its tokens are the
book's.

    from llm.clean import run_clean
    from llm.config import CleanConfig
    res = run_clean(CleanConfig(sources=["the_verdict"]), {"the_verdict": Path("data/raw/the-verdict.txt")},
                    Path("data/clean"))
    res.outputs["documents"]   # data/clean/documents.parquet (doc_id, source, text)

Run `python -m llm.clean OUT_DIR FILE_OR_FOLDER_OR_GLOB ...` to clean files by hand.
"""
from __future__ import annotations

import glob as globmod
import hashlib
import json
import os
import re
import sys
import unicodedata
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from llm.fsutil import atomic_write_text, publish_file, temp_file
from llm.config import CleanConfig
from llm.result import MetricLogger, StageResult, log_or_null

CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")
DROP_REASONS = ("too_short", "no_text", "duplicate")
LETTER_RE = re.compile(r"[^\W\d_]")  # a letter of any script
JUNK_RE = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")  # control characters (not \t \n \v \f \r), U+FFFD
SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string())])
ROW_GROUP_CHARS = 32 << 20  # flush a Parquet row group at this many text characters ...
ROW_GROUP_ROWS = 1024  # ... or this many documents


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

# --------------------------------------------------------------------------------- input files


def resolve_corpus(patterns: Iterable[str | Path]) -> list[Path]:
    """Files named by paths, folders (recursive *.txt, *.md, *.jsonl) or globs; sorted, deduplicated.

    A pattern that matches no file is a FileNotFoundError naming it.
    """
    found: dict[Path, None] = {}
    for pattern in patterns:
        raw = os.path.expanduser(str(pattern))
        p = Path(raw)
        if p.is_file():
            matches = [p]
        elif p.is_dir():
            matches = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in CORPUS_SUFFIXES]
        else:
            matches = []
            for m in globmod.glob(raw, recursive=True):
                mp = Path(m)
                if mp.is_file():
                    matches.append(mp)
                elif mp.is_dir():
                    matches.extend(f for f in mp.rglob("*") if f.is_file() and f.suffix.lower() in CORPUS_SUFFIXES)
        if not matches:
            what = "folder has no .txt/.md/.jsonl files" if p.is_dir() else "no such file, folder or glob match"
            raise FileNotFoundError(f"corpus {str(pattern)!r}: {what}")
        for m in matches:
            found[m.resolve()] = None
    return sorted(found)


def _decode(data: bytes, path: Path, base_offset: int = 0, line: Optional[int] = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{line}" if line is not None else str(path)
        raise ValueError(f"{where}: invalid UTF-8 at byte offset {base_offset + e.start} "
                         f"({e.reason}); expected UTF-8 text") from None


def iter_documents(path: str | Path, source: Optional[str] = None) -> Iterator[Record]:
    """Records of one file: a text file is one document; .jsonl is one per line (field "text").

    source defaults to the file stem. doc_id is the source (text file) or "<source>:<line>" (jsonl).
    """
    path = Path(path)
    source = source or path.stem
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    if path.suffix.lower() != ".jsonl":
        yield Record(source, source, _decode(path.read_bytes(), path))
        return
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            text_line = _decode(raw, path, offset, lineno)
            offset += len(raw)
            if lineno == 1:
                text_line = text_line.removeprefix("\ufeff")
            if not text_line.strip():
                continue
            try:
                obj = json.loads(text_line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                 'expected one object per line like {"text": "..."}') from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise ValueError(f"{path}:{lineno}: missing field 'text'; expected one object per line "
                                 'like {"text": "..."}')
            if not isinstance(obj["text"], str):
                raise ValueError(f"{path}:{lineno}: field 'text' must be a string, got {type(obj['text']).__name__}")
            yield Record(f"{source}:{lineno}", source, obj["text"])


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


# ------------------------------------------------------------------------------------ the stage

def _unique_ids(records: Iterable[Record]) -> Iterator[Record]:
    seen: dict[str, int] = {}
    for r in records:
        n = seen.get(r.doc_id, 0) + 1
        seen[r.doc_id] = n
        if n > 1:
            r.doc_id = f"{r.doc_id}~{n}"
        yield r


def clean_file(path: Path, source: str, cfg: CleanConfig) -> tuple[list[Record], DropCounter, int]:
    """One input file through the per-document steps: (kept records, its drop counter, documents read).

    What an executor runs per file (see run_clean); a module-level function so it pickles.
    """
    counter = DropCounter()
    n_in = 0

    def read() -> Iterator[Record]:
        nonlocal n_in
        for rec in iter_documents(path, source):
            n_in += 1
            yield rec

    kept = list(apply_steps(read(), document_steps(cfg, counter)))
    return kept, counter, n_in


def _merge_counts(into: DropCounter, part: DropCounter) -> None:
    for reason, n in part.dropped.items():
        into.dropped[reason] = into.dropped.get(reason, 0) + n
    for step, n in part.modified.items():
        into.modified[step] = into.modified.get(step, 0) + n
    for source, drops in part.dropped_by_source.items():
        per = into.dropped_by_source.setdefault(source, {})
        for reason, n in drops.items():
            per[reason] = per.get(reason, 0) + n


def _ordered_map(executor: Executor, fn: Callable, items: list, ahead: int) -> Iterator:
    """executor.submit(fn, *item) for each item, at most `ahead` in flight, results in item order."""
    pending: deque = deque()
    it = iter(items)
    for item in it:
        pending.append(executor.submit(fn, *item))
        if len(pending) >= ahead:
            break
    while pending:
        yield pending.popleft().result()
        for item in it:
            pending.append(executor.submit(fn, *item))
            break


def run_clean(cfg: CleanConfig, inputs: dict[str, Path], out_dir: Path, progress: bool = True,
              log: Optional[MetricLogger] = None, executor: Optional[Executor] = None,
              executor_slots: int = 1) -> StageResult:
    """Clean cfg.sources (from `inputs`, keyed by source name) plus cfg.corpus files into documents.parquet.

    If cfg.sources is empty every input is used. executor: run the per-document steps of each file
    on it (e.g. a Dask cluster's `client.get_executor()`), files in parallel (2 x executor_slots
    files in flight); deduplication and writing stay here, in file order, so the output is
    byte-identical to the default (everything streamed in this process). metrics: documents_in,
    documents_out, chars_out, dropped_<reason>. outputs: {"documents": out_dir/documents.parquet}.
    """
    log = log_or_null(log)
    out_dir = Path(out_dir)
    names = list(cfg.sources) if cfg.sources else list(inputs)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"clean.sources: {missing[0]!r} was not downloaded (inputs: {', '.join(inputs) or 'none'}); "
                         "add it to download.sources")
    files: list[tuple[Path, str]] = [(Path(inputs[n]), n) for n in names]
    files += [(p, p.stem) for p in resolve_corpus(cfg.corpus)]
    if not files:
        raise ValueError("clean: nothing to clean; set clean.sources (downloaded sources) or clean.corpus (files)")
    for path, _ in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: input file not found")

    counter = DropCounter()
    per_source: dict[str, dict[str, int]] = {}
    stats = {"documents_in": 0, "documents_out": 0, "chars_out": 0}

    def read_all() -> Iterator[Record]:
        for path, source in files:
            for rec in iter_documents(path, source):
                stats["documents_in"] += 1
                per_source.setdefault(source, {"documents_in": 0, "documents_out": 0, "chars_out": 0})
                per_source[source]["documents_in"] += 1
                yield rec

    def cleaned() -> Iterator[Record]:
        if executor is None:  # streamed: one document in memory at a time
            yield from apply_steps(read_all(), build_steps(cfg, counter))
            return
        dedup = drop_duplicates(counter) if cfg.dedup else (lambda records: records)

        def from_workers() -> Iterator[Record]:
            jobs = [(path, source, cfg) for path, source in files]
            for (path, source), (kept, part, n_in) in zip(files, _ordered_map(executor, clean_file, jobs,
                                                                              ahead=2 * max(1, executor_slots))):
                _merge_counts(counter, part)
                stats["documents_in"] += n_in
                if n_in:
                    ps = per_source.setdefault(source, {"documents_in": 0, "documents_out": 0, "chars_out": 0})
                    ps["documents_in"] += n_in
                yield from kept

        yield from dedup(from_workers())

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "documents.parquet"
    tmp = temp_file(out_dir, prefix=".documents.", suffix=".parquet.tmp")
    try:
        writer = pq.ParquetWriter(tmp, SCHEMA, compression="zstd")
        buf: dict[str, list[str]] = {"doc_id": [], "source": [], "text": []}
        buf_chars = 0

        def flush() -> None:
            nonlocal buf_chars
            if buf["doc_id"]:
                writer.write_table(pa.table(buf, schema=SCHEMA))
                for v in buf.values():
                    v.clear()
                buf_chars = 0

        with tqdm(desc="clean", unit="doc", disable=not progress) as bar:
            for rec in _unique_ids(cleaned()):
                buf["doc_id"].append(rec.doc_id)
                buf["source"].append(rec.source)
                buf["text"].append(rec.text)
                buf_chars += len(rec.text)
                stats["documents_out"] += 1
                stats["chars_out"] += len(rec.text)
                ps = per_source[rec.source]
                ps["documents_out"] += 1
                ps["chars_out"] += len(rec.text)
                bar.update(1)
                if buf_chars >= ROW_GROUP_CHARS or len(buf["doc_id"]) >= ROW_GROUP_ROWS:
                    flush()
                    log(dict(stats), stats["documents_out"])
            flush()
        writer.close()
        if stats["documents_out"] == 0:
            reasons = ", ".join(f"{k}={v}" for k, v in counter.dropped.items())
            named = ", ".join(str(p) for p, _ in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise ValueError(f"clean: no documents left after cleaning {stats['documents_in']} input document(s) "
                             f"(dropped: {reasons}; min_chars={cfg.min_chars}) of {named}")
        publish_file(tmp, final)  # fsync, rename, fsync the folder
    finally:
        if tmp.exists():
            tmp.unlink()

    for source, drops in counter.dropped_by_source.items():
        per_source.setdefault(source, {}).update({f"dropped_{k}": v for k, v in sorted(drops.items())})
    report = out_dir / "clean_report.json"
    atomic_write_text(report, json.dumps({"totals": {**stats, **{f"dropped_{k}": v for k, v in counter.dropped.items()},
                                                      **counter.modified},
                                          "sources": per_source,
                                          "files": [{"path": str(p), "source": s} for p, s in files]}, indent=2) + "\n")
    metrics = {k: float(v) for k, v in stats.items()}
    metrics.update({f"dropped_{k}": float(v) for k, v in counter.dropped.items()})
    metrics["gutenberg_stripped"] = float(counter.modified.get("gutenberg_stripped", 0))
    return StageResult(metrics=metrics, params={"clean_sources": ",".join(sorted(per_source))},
                       artifacts=[report], outputs={"documents": final})


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m llm.clean OUT_DIR FILE_OR_FOLDER_OR_GLOB ...")
    try:
        res = run_clean(CleanConfig(corpus=sys.argv[2:]), {}, Path(sys.argv[1]))
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"llm.clean: error: {e}")
    print(json.dumps(res.metrics, indent=2))

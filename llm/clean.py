"""The clean stage: turn downloaded texts and user corpus files into one documents.parquet.

Input files become records (doc_id, source, text): a text file is one document; a .jsonl file is
one document per line (field "text"). Records then flow through small generator steps (in the
style of datatrove: each step takes and yields records, and says why it drops one; they live in
llm/clean_filters.py and are re-exported here):

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
import json
import os
import sys
from collections import deque
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from llm.fsutil import atomic_write_text, publish_file, temp_file
from llm.config import CleanConfig
from llm.result import MetricLogger, StageResult, log_or_null
# The filters live in llm/clean_filters.py; every name stays importable from llm.clean.
from llm.clean_filters import (  # noqa: F401  (re-exported)
    DROP_REASONS, GUTENBERG_END, GUTENBERG_START, JUNK_RE, LETTER_RE, DropCounter, Record, Step, apply_steps,
    build_steps, clean_texts, collapse_blank_lines, document_steps, drop_duplicates, drop_no_text, drop_short,
    gutenberg_body, has_text, normalize_newlines, normalize_unicode, strip_bom, strip_gutenberg, strip_whitespace,
)

CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")
SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string())])
ROW_GROUP_CHARS = 32 << 20  # flush a Parquet row group at this many text characters ...
ROW_GROUP_ROWS = 1024  # ... or this many documents


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
    files = _input_files(cfg, inputs)
    tally = _Tally()
    if executor is None:  # streamed: one document in memory at a time
        records = apply_steps(_read_files(files, tally), build_steps(cfg, tally.drops))
    else:
        dedup = drop_duplicates(tally.drops) if cfg.dedup else (lambda records: records)
        records = dedup(_cleaned_on(executor, executor_slots, files, cfg, tally))
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "documents.parquet"
    tmp = temp_file(out_dir, prefix=".documents.", suffix=".parquet.tmp")
    try:
        _write_documents(_unique_ids(records), tmp, tally, progress, log)
        if tally.totals["documents_out"] == 0:
            reasons = ", ".join(f"{k}={v}" for k, v in tally.drops.dropped.items())
            named = ", ".join(str(p) for p, _ in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise ValueError(f"clean: no documents left after cleaning {tally.totals['documents_in']} input "
                             f"document(s) (dropped: {reasons}; min_chars={cfg.min_chars}) of {named}")
        publish_file(tmp, final)  # fsync, rename, fsync the folder
    finally:
        if tmp.exists():
            tmp.unlink()

    report = _write_report(out_dir, files, tally)
    metrics = {k: float(v) for k, v in tally.totals.items()}
    metrics.update({f"dropped_{k}": float(v) for k, v in tally.drops.dropped.items()})
    metrics["gutenberg_stripped"] = float(tally.drops.modified.get("gutenberg_stripped", 0))
    return StageResult(metrics=metrics, params={"clean_sources": ",".join(sorted(tally.per_source))},
                       artifacts=[report], outputs={"documents": final})


def _input_files(cfg: CleanConfig, inputs: dict[str, Path]) -> list[tuple[Path, str]]:
    """(path, source) of every file to clean: the downloaded sources cfg.sources names (all of
    `inputs` when it names none), then the cfg.corpus files; each checked to exist."""
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
    return files


class _Tally:
    """What one run counts: drops (a DropCounter), the totals and the same per source."""

    def __init__(self):
        self.drops = DropCounter()
        self.totals = {"documents_in": 0, "documents_out": 0, "chars_out": 0}
        self.per_source: dict[str, dict[str, int]] = {}

    def read(self, source: str, n: int) -> None:
        """n documents of `source` were read."""
        self.totals["documents_in"] += n
        if n:
            ps = self.per_source.setdefault(source, {"documents_in": 0, "documents_out": 0, "chars_out": 0})
            ps["documents_in"] += n

    def kept(self, rec: Record) -> None:
        """rec goes into documents.parquet."""
        self.totals["documents_out"] += 1
        self.totals["chars_out"] += len(rec.text)
        ps = self.per_source[rec.source]
        ps["documents_out"] += 1
        ps["chars_out"] += len(rec.text)


def _read_files(files: list[tuple[Path, str]], tally: _Tally) -> Iterator[Record]:
    """The records of every file, in order, counted as read."""
    for path, source in files:
        for rec in iter_documents(path, source):
            tally.read(source, 1)
            yield rec


def _cleaned_on(executor: Executor, executor_slots: int, files: list[tuple[Path, str]], cfg: CleanConfig,
                tally: _Tally) -> Iterator[Record]:
    """The records each file keeps after the per-document steps, run by clean_file on the executor
    (2 x executor_slots files in flight), in file order; their counts merged into tally."""
    jobs = [(path, source, cfg) for path, source in files]
    results = _ordered_map(executor, clean_file, jobs, ahead=2 * max(1, executor_slots))
    for (path, source), (kept, part, n_in) in zip(files, results):
        _merge_counts(tally.drops, part)
        tally.read(source, n_in)
        yield from kept


def _write_documents(records: Iterable[Record], path: Path, tally: _Tally, progress: bool, log: MetricLogger) -> None:
    """Stream records into the Parquet file `path` (a row group per ROW_GROUP_CHARS characters or
    ROW_GROUP_ROWS documents), counting each as kept."""
    writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
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
        for rec in records:
            buf["doc_id"].append(rec.doc_id)
            buf["source"].append(rec.source)
            buf["text"].append(rec.text)
            buf_chars += len(rec.text)
            tally.kept(rec)
            bar.update(1)
            if buf_chars >= ROW_GROUP_CHARS or len(buf["doc_id"]) >= ROW_GROUP_ROWS:
                flush()
                log(dict(tally.totals), tally.totals["documents_out"])
        flush()
    writer.close()


def _write_report(out_dir: Path, files: list[tuple[Path, str]], tally: _Tally) -> Path:
    """clean_report.json: the totals, the counts per source (drops included) and the input files."""
    for source, drops in tally.drops.dropped_by_source.items():
        tally.per_source.setdefault(source, {}).update({f"dropped_{k}": v for k, v in sorted(drops.items())})
    totals = {**tally.totals, **{f"dropped_{k}": v for k, v in tally.drops.dropped.items()}, **tally.drops.modified}
    report = out_dir / "clean_report.json"
    atomic_write_text(report, json.dumps({"totals": totals, "sources": tally.per_source,
                                          "files": [{"path": str(p), "source": s} for p, s in files]}, indent=2) + "\n")
    return report


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m llm.clean OUT_DIR FILE_OR_FOLDER_OR_GLOB ...")
    try:
        res = run_clean(CleanConfig(corpus=sys.argv[2:]), {}, Path(sys.argv[1]))
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"llm.clean: error: {e}")
    print(json.dumps(res.metrics, indent=2))

"""Read a file of JSON records: a JSON list of objects, or JSON Lines (one object per line).

The one loader behind the instruction data (llm/instruct.py), the preference data (llm/dpo.py) and
the judge's responses files (llm/judge/stage.py). The file is parsed as one JSON document first, so a
pretty-printed list or object is read as JSON whatever its suffix; only when that fails and the file
looks like JSON Lines (several lines, each starting with "{", or a first line that is a whole object)
is it read line by line. A single JSON object is one record (as a one-line JSON Lines file is); an
object that wraps the list ({"data": [...]}) is an error that says to write the list itself.

Errors are one line naming the file and where: `FILE: invalid JSON (MSG at line L column C)`,
`FILE: line L: record I: invalid JSON (MSG at column C)`; `where(i)` gives callers the prefix for their
schema errors: `FILE: record I` (JSON) or `FILE: line L: record I` (JSON Lines).

    from llm.records import read_records
    rows = read_records("data/instruction-data.json", "instruction data")
    for i, row in enumerate(rows):
        check(row, rows.where(i))

Run `python -m llm.records FILE` to print how a file is read (format and record count).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


class Records(list):
    """The records of one file (a list), with where(i): "FILE: record I" or "FILE: line L: record I"."""

    def __init__(self, rows: list, path: Path, lines: Optional[list[int]] = None, fmt: str = "json"):
        super().__init__(rows)
        self.path = path
        self.lines = lines
        self.format = fmt

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.path}: line {self.lines[i]}: record {i}"
        return f"{self.path}: record {i}"


def read_text(path: str | Path, what: str = "records") -> str:
    """A record file's text (UTF-8, a leading BOM dropped); one-line errors for a missing or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _looks_like_jsonl(lines: list[tuple[int, str]]) -> bool:
    """Several non-blank lines, each starting with "{", or a first one that is a whole JSON object."""
    if len(lines) < 2:
        return False
    if all(line.lstrip().startswith("{") for _, line in lines):
        return True
    try:
        return isinstance(json.loads(lines[0][1]), dict)
    except json.JSONDecodeError:
        return False


def _wrapped_list_key(obj: dict) -> Optional[str]:
    """The key of an object's list of objects ({"data": [{...}, ...]}), if it has one."""
    for key, value in obj.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return key
    return None


def parse_records(text: str, path: str | Path) -> Records:
    """Records of a record file's text (see the module docstring); `path` names the file in errors."""
    path = Path(path)
    lines = [(ln, line) for ln, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        return Records([], path)
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as e:
        if not _looks_like_jsonl(lines):
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        rows = []
        for i, (ln, line) in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {ln}: record {i}: invalid JSON ({e.msg} at column {e.colno})") from None
        return Records(rows, path, [ln for ln, _ in lines], "jsonl")
    if isinstance(data, list):
        return Records(data, path)
    if isinstance(data, dict):
        key = _wrapped_list_key(data)
        if key is not None:
            raise ValueError(f"{path}: expected a JSON list of records or JSON Lines, got an object with the list "
                             f"under {key!r}; write the list itself")
        one_line = [lines[0][0]] if len(lines) == 1 else None  # a one-line JSON Lines file: name its line
        return Records([data], path, one_line, "jsonl" if one_line else "json")
    raise ValueError(f"{path}: expected a JSON list of records or JSON Lines (one object per line), "
                     f"got {type(data).__name__}")


def read_records(path: str | Path, what: str = "records") -> Records:
    """Read a JSON / JSON Lines record file; `what` names it in the not-found error ("instruction data")."""
    return parse_records(read_text(path, what), path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m llm.records FILE")
    try:
        recs = read_records(sys.argv[1])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"llm.records: error: {e}")
    print(f"{recs.path}: {recs.format}, {len(recs)} record(s)")


def check_record(rec: Any, where: str, fields: Sequence[str]) -> dict:
    """`rec` as {field: str} for exactly `fields`, or one ValueError naming `where` and the field at fault."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with string fields {', '.join(fields)}; "
                         f"got {type(rec).__name__}")
    for f in fields:
        if f not in rec:
            raise ValueError(f"{where}: missing field '{f}' (expected a string)")
        if not isinstance(rec[f], str):
            raise ValueError(f"{where}: field '{f}' must be a string, got {type(rec[f]).__name__}")
    return {f: rec[f] for f in fields}


def read_string_records(path: str | Path, fields: Sequence[str], what: str) -> list[dict]:
    """Every record of a JSON / JSON Lines file checked to have string `fields` (check_record); at least
    one. `what` names them in errors: "instruction" -> "data.json: no instruction records"."""
    rows = read_records(path, f"{what} data")
    records = [check_record(rec, rows.where(i), fields) for i, rec in enumerate(rows)]
    if not records:
        raise ValueError(f"{path}: no {what} records")
    return records

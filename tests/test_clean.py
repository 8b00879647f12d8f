"""Tests for llm.clean: Gutenberg markers, BOM/CRLF, Unicode normalization, drops, corpus files.

Run: python -m pytest -x -q tests/test_clean.py

Fixtures are small files written into tmp_path (never the shared datasets).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llm.clean import Record, clean_texts, gutenberg_body, iter_documents, resolve_corpus, run_clean
from llm.config import CleanConfig

BODY = ("It was the best of times, it was the worst of times.\n\n"
        "Chapter 1\n\nThe end of the first chapter is here.")

OLD_FORM = ("\ufeffThe Project Gutenberg EBook of Two Cities, by Charles Dickens\r\n\r\n"
            "Release Date: January, 1994\r\n\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK A TALE OF TWO CITIES ***\r\n"
            + BODY.replace("\n", "\r\n") + "\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK A TALE OF TWO CITIES ***\r\n\r\n"
            "Updated editions will replace the previous one.\r\n")

NEW_FORM = ("\ufeffThe Project Gutenberg eBook of Jane Eyre\r\n"
            "***START OF THE PROJECT GUTENBERG EBOOK JANE EYRE***\r\n"
            "\r\n\r\n\r\nJANE EYRE   \r\nAN AUTOBIOGRAPHY\r\n"
            "***END OF THE PROJECT GUTENBERG EBOOK JANE EYRE***\r\n"
            "Section 1. General Terms of Use\r\n")


def test_gutenberg_body_both_marker_forms():
    assert gutenberg_body(OLD_FORM.lstrip("\ufeff").replace("\r\n", "\n")) == BODY
    assert gutenberg_body(NEW_FORM.lstrip("\ufeff").replace("\r\n", "\n")) == "\n\n\nJANE EYRE   \nAN AUTOBIOGRAPHY"
    assert gutenberg_body("no markers at all") is None
    assert gutenberg_body("*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
                          "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n") == ""


def test_steps_on_gutenberg_files():
    cfg = CleanConfig(min_chars=1)
    assert clean_texts([OLD_FORM], cfg) == [BODY]
    # BOM and CRLF gone, blank-line run collapsed, trailing spaces and leading blank lines removed.
    assert clean_texts([NEW_FORM], cfg) == ["JANE EYRE\nAN AUTOBIOGRAPHY"]
    assert clean_texts(["a\r\rb\rc"], cfg) == ["a\n\nb\nc"]
    # strip_gutenberg off keeps the whole file (headers included).
    kept = clean_texts([OLD_FORM], cfg.model_copy(update={"strip_gutenberg": False}))[0]
    assert kept.startswith("The Project Gutenberg EBook") and "\r" not in kept and "\ufeff" not in kept


def test_unicode_normalization():
    decomposed = "Cafe\u0301 na\u0131\u0308ve \ufb01le"  # e + combining acute, dotless i + diaeresis, fi ligature
    nfc = clean_texts([decomposed], CleanConfig(min_chars=0))[0]
    assert nfc == "Caf\u00e9 na\u0131\u0308ve \ufb01le"  # NFC composes é, keeps the ligature
    assert clean_texts([decomposed], CleanConfig(min_chars=0, normalize="NFKC"))[0] == "Caf\u00e9 na\u0131\u0308ve file"
    assert clean_texts([decomposed], CleanConfig(min_chars=0, normalize="none"))[0] == decomposed


def test_the_verdict_style_text_is_unchanged():
    text = 'I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it was no great surprise to me.\n\n"Yes--and by me!"'
    assert clean_texts([text], CleanConfig()) == [text]


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def test_run_clean_counts_and_parquet(tmp_path):
    raw = tmp_path / "raw"
    inputs = {
        "two_cities": write(raw / "98-0.txt", OLD_FORM),
        "jane": write(raw / "pg1260.txt", NEW_FORM),
        "dup": write(raw / "copy.txt", OLD_FORM.replace("\r\n", "\n")),  # same body after cleaning
        "unused": write(raw / "unused.txt", "not selected"),
    }
    lines = [{"text": "A long enough document number one, with some words in it."},
             {"text": "short"},
             {"text": "A long enough document number one, with some words in it."},
             {"text": "Another long enough document with different words in it."}]
    corpus = write(tmp_path / "mine" / "notes.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    cfg = CleanConfig(sources=["two_cities", "jane", "dup"], corpus=[str(corpus.parent)], min_chars=30)
    out = tmp_path / "clean"
    steps = []
    res = run_clean(cfg, inputs, out, progress=False, log=lambda m, s: steps.append(s))
    assert res.outputs == {"documents": out / "documents.parquet"}
    table = pq.read_table(out / "documents.parquet")
    assert table.schema.names == ["doc_id", "source", "text"]
    assert [str(t) for t in table.schema.types] == ["string", "string", "string"]
    rows = table.to_pylist()
    assert rows == [
        {"doc_id": "two_cities", "source": "two_cities", "text": BODY},
        {"doc_id": "notes:1", "source": "notes", "text": lines[0]["text"]},
        {"doc_id": "notes:4", "source": "notes", "text": lines[3]["text"]},
    ]
    # jane's body (26 chars) and "short" are too short; the copy and jsonl line 3 are duplicates.
    assert res.metrics == {"documents_in": 7, "documents_out": 3, "chars_out": float(sum(len(r["text"]) for r in rows)),
                           "dropped_too_short": 2, "dropped_no_text": 0, "dropped_duplicate": 2,
                           "gutenberg_stripped": 3}
    report = json.loads((out / "clean_report.json").read_text())
    assert report["sources"]["notes"] == {"documents_in": 4, "documents_out": 2, "chars_out": len(lines[0]["text"]) +
                                          len(lines[3]["text"]), "dropped_too_short": 1, "dropped_duplicate": 1}
    assert sorted(p.name for p in out.iterdir()) == ["clean_report.json", "documents.parquet"]


def test_run_clean_nothing_left_and_missing_source(tmp_path):
    f = write(tmp_path / "a.txt", "tiny")
    with pytest.raises(ValueError, match=r"no documents left after cleaning 1 input document\(s\) "
                                         r"\(dropped: too_short=1, no_text=0, duplicate=0; min_chars=100\) of .*a.txt$"):
        run_clean(CleanConfig(corpus=[str(f)]), {}, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "documents.parquet").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []
    with pytest.raises(ValueError, match=r"clean.sources: 'gutenberg_alice' was not downloaded"):
        run_clean(CleanConfig(sources=["gutenberg_alice"]), {"the_verdict": f}, tmp_path / "out", progress=False)


def test_jsonl_errors(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "unterminated}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        list(iter_documents(bad))
    missing = write(tmp_path / "missing.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"missing.jsonl:3: missing field 'text'"):
        list(iter_documents(missing))
    wrong = write(tmp_path / "wrong.jsonl", '{"text": 5}\n')
    with pytest.raises(ValueError, match=r"wrong.jsonl:1: field 'text' must be a string, got int"):
        list(iter_documents(wrong))
    latin1 = write(tmp_path / "latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: invalid UTF-8 at byte offset 28"):
        list(iter_documents(latin1))
    txt = write(tmp_path / "latin1.txt", b"abc caf\xe9")
    with pytest.raises(ValueError, match=r"latin1.txt: invalid UTF-8 at byte offset 7"):
        list(iter_documents(txt))
    bom = write(tmp_path / "bom.jsonl", '\ufeff{"text": "first"}\n')
    assert list(iter_documents(bom)) == [Record("bom:1", "bom", "first")]


def test_resolve_corpus(tmp_path):
    a = write(tmp_path / "docs" / "a.txt", "a")
    b = write(tmp_path / "docs" / "sub" / "b.md", "b")
    c = write(tmp_path / "docs" / "sub" / "c.jsonl", '{"text": "c"}')
    write(tmp_path / "docs" / "skip.csv", "x")
    d = write(tmp_path / "other" / "d.txt", "d")
    got = resolve_corpus([str(tmp_path / "docs"), str(tmp_path / "other" / "*.txt"), str(a), str(d)])
    assert got == sorted(p.resolve() for p in (a, b, c, d))
    with pytest.raises(FileNotFoundError, match=r"corpus '.*nothing\*.txt': no such file, folder or glob match"):
        resolve_corpus([str(tmp_path / "nothing*.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder has no .txt/.md/.jsonl files"):
        resolve_corpus([str(tmp_path / "empty")])

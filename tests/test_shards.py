"""Tests for llm.shards: exact tokens per row, splits, size-capped shards, manifest checks, TokenWindows.

Run: python -m pytest -x -q tests/test_shards.py

documents.parquet fixtures are written into tmp_path with pyarrow.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llm.config import ShardConfig
from llm.shards import TokenWindows, load_manifest, read_tokens, run_shard, sources
from llm.tokenizer import EOT, get_encoding

DOCS = [
    ("a", "verdict", 'I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough.\n\n'
                     '"Yes--and by me!" she said. Café, naïve, 日本語, 😀.'),
    ("b", "alice", "Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
                   "nothing to do: once or twice she had peeped into the book her sister was reading."),
    ("c", "alice", "   Whitespace   runs\n\n\nand <|endoftext|> inside a document, then more words follow here."),
    ("d", "verdict", "x" * 7 + " short"),
]


def write_docs(path: Path, docs=DOCS) -> Path:
    table = pa.table({"doc_id": [d[0] for d in docs], "source": [d[1] for d in docs], "text": [d[2] for d in docs]})
    pq.write_table(table, path)
    return path


def ids(text: str) -> list[int]:
    return get_encoding().encode(text, allowed_special="all") + [EOT]


def rows(shard_dir: Path, split: str) -> list[dict]:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    out = []
    for f in manifest["splits"][split]["files"]:
        out += pq.read_table(shard_dir / f["name"]).to_pylist()
    return out


def test_tail_split_tokens_exact(tmp_path):
    docs = write_docs(tmp_path / "documents.parquet")
    out = tmp_path / "shards"
    seen = []
    res = run_shard(ShardConfig(val_fraction=0.25), docs, out, progress=False, log=lambda m, s: seen.append(s))
    cuts = {d: int(0.75 * len(t)) for d, _, t in DOCS}
    train, val = rows(out, "train"), rows(out, "val")
    assert [(r["doc_id"], r["source"]) for r in train] == [(d, s) for d, s, _ in DOCS]
    assert [r["tokens"] for r in train] == [ids(t[:cuts[d]]) for d, _, t in DOCS]
    assert [r["tokens"] for r in val] == [ids(t[cuts[d]:]) for d, _, t in DOCS]
    # the cut is a character boundary (here inside the word "peeped"), not a token boundary
    assert cuts["b"] == 128 and DOCS[1][2][:128].endswith("she had p") and DOCS[1][2][128:].startswith("eeped")
    assert get_encoding().decode(train[1]["tokens"][:-1]) == DOCS[1][2][:128]
    assert 50256 in train[2]["tokens"][:-1]  # "<|endoftext|>" in text is the special token, as in the book
    schema = pq.read_schema(out / "train-00000.parquet")
    assert str(schema.field("tokens").type) == "list<element: uint16>"
    assert res.outputs == {"shards": out} and res.artifacts == [out / "manifest.json"]
    n_train = sum(len(r["tokens"]) for r in train)
    n_val = sum(len(r["tokens"]) for r in val)
    assert res.metrics == {"train_tokens": n_train, "val_tokens": n_val, "train_docs": 4, "val_docs": 4, "shards": 2}
    assert seen == [4]
    m = load_manifest(out)
    assert (m["tokenizer"], m["vocab_size"], m["eot"], m["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert m["totals"]["tokens"] == n_train + n_val and m["totals"]["files"] == 2
    assert m["sources"]["alice"]["train_docs"] == 2
    # Reader: rows concatenated in order; per-source filter.
    flat = read_tokens(out, "train")
    assert flat.dtype == np.uint16 and flat.tolist() == sum((r["tokens"] for r in train), [])
    assert read_tokens(out, "val", source="alice").tolist() == ids(DOCS[1][2][cuts["b"]:]) + ids(DOCS[2][2][cuts["c"]:])
    assert sources(out) == ["alice", "verdict"]
    with pytest.raises(ValueError, match="no split 'test'; splits: train, val"):
        read_tokens(out, "test")
    with pytest.raises(ValueError, match="no source 'moby'"):
        read_tokens(out, "train", source="moby")


def test_book_split_of_a_single_document(tmp_path):
    text = "".join(f"Sentence number {i} of the story.\n" for i in range(200))
    docs = write_docs(tmp_path / "d.parquet", [("the_verdict", "the_verdict", text)])
    run_shard(ShardConfig(), docs, tmp_path / "s", progress=False)
    split_idx = int(0.90 * len(text))  # the book's chapter 5 split
    assert read_tokens(tmp_path / "s", "train").tolist() == ids(text[:split_idx])
    assert read_tokens(tmp_path / "s", "val").tolist() == ids(text[split_idx:])


def test_document_split_is_seeded_and_whole(tmp_path):
    many = [(f"doc{i}", "src", f"Document {i} says hello to everyone in the room.") for i in range(40)]
    docs = write_docs(tmp_path / "d.parquet", many)
    cfg = ShardConfig(split="document", val_fraction=0.25, seed=7)
    res = run_shard(cfg, docs, tmp_path / "s1", progress=False)
    run_shard(cfg, docs, tmp_path / "s2", progress=False)
    val1 = [r["doc_id"] for r in rows(tmp_path / "s1", "val")]
    assert val1 == [r["doc_id"] for r in rows(tmp_path / "s2", "val")]  # deterministic
    train1 = [r["doc_id"] for r in rows(tmp_path / "s1", "train")]
    assert sorted(val1 + train1) == sorted(d for d, _, _ in many) and 3 <= len(val1) <= 20
    assert res.metrics["val_docs"] == len(val1) and res.metrics["train_docs"] == len(train1)
    by_id = {d: t for d, _, t in many}
    assert all(r["tokens"] == ids(by_id[r["doc_id"]]) for r in rows(tmp_path / "s1", "val"))
    other = [r["doc_id"] for r in rows(run_shard(cfg.model_copy(update={"seed": 8}), docs, tmp_path / "s3",
                                                 progress=False).outputs["shards"], "val")]
    assert other != val1


def test_shard_cap_creates_several_files(tmp_path, monkeypatch):
    import llm.shards

    monkeypatch.setattr(llm.shards, "SUB_BATCH_CHARS", 100)  # many tokenize/write steps, overlapped
    many = [(f"d{i}", "src", f"Row {i}: " + "word " * (5 + i)) for i in range(30)]
    docs = write_docs(tmp_path / "d.parquet", many)
    out = tmp_path / "s"
    cap_tokens = 40
    res = run_shard(ShardConfig(val_fraction=0.0, max_shard_mb=cap_tokens * 2 / 1e6), docs, out, progress=False)
    m = load_manifest(out)
    files = m["splits"]["train"]["files"]
    assert len(files) > 5 and res.metrics["shards"] == len(files) and m["splits"]["val"]["files"] == []
    assert [f["name"] for f in files] == [f"train-{i:05d}.parquet" for i in range(len(files))]
    lengths = [len(ids(t)) for _, _, t in many]
    for f in files:  # each file is under the cap unless it holds a single (longer) row
        assert f["tokens"] <= cap_tokens or f["rows"] == 1
    # greedy packing: a file is closed only when the next row would not fit
    i = 0
    for f in files:
        i += f["rows"]
        if i < len(lengths):
            assert f["tokens"] + lengths[i] > cap_tokens
    assert sum(f["rows"] for f in files) == 30
    assert read_tokens(out, "train").tolist() == sum((ids(t) for _, _, t in many), [])
    # A re-run with a larger cap into the same folder leaves no stale shards behind.
    run_shard(ShardConfig(val_fraction=0.0), docs, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-00000.parquet"]


def test_shards_are_byte_identical_however_the_work_is_cut(tmp_path, monkeypatch):
    """Sub-batches that span record batches, several in flight on 2 workers, pieces of long documents:
    the same shard bytes and manifest as one worker encoding whole batches."""
    import llm.shards
    from llm.tokenizer import EncoderPool

    many = [(f"d{i}", f"s{i % 3}", f"Row {i}:\n" + "word, more words.\n" * (3 + 7 * i)) for i in range(40)]
    docs = write_docs(tmp_path / "d.parquet", many)
    cfg = ShardConfig(val_fraction=0.2, max_shard_mb=0.002)
    run_shard(cfg.model_copy(update={"workers": 1}), docs, tmp_path / "one", progress=False)
    monkeypatch.setattr(llm.shards, "BATCH_ROWS", 3)
    monkeypatch.setattr(llm.shards, "SUB_BATCH_CHARS", 150)
    with EncoderPool(2, piece_chars=64) as pool:
        run_shard(cfg, docs, tmp_path / "two", progress=False, pool=pool)
        assert pool._executor is not None  # the work really went to the workers
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) > 4
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    assert read_tokens(tmp_path / "two", "train").tolist() == sum(
        (ids(t[:int(0.8 * len(t))]) for _, _, t in many), [])


def test_manifest_catches_modified_or_missing_files(tmp_path):
    docs = write_docs(tmp_path / "d.parquet")
    out = tmp_path / "s"
    run_shard(ShardConfig(), docs, out, progress=False)
    good = read_tokens(out, "val")
    f = out / "train-00000.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00000.parquet: sha256 [0-9a-f]{64} does not match"):
        load_manifest(out)
    with pytest.raises(ValueError, match="train-00000.parquet"):
        read_tokens(out, "val")  # every file is verified, not only the split's
    assert read_tokens(out, "val", verify=False).tolist() == good.tolist()
    f.unlink()
    with pytest.raises(FileNotFoundError, match=r"train-00000.parquet: shard file listed in .* is missing"):
        load_manifest(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"] = "cl100k_base"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tokenizer 'cl100k_base' .* expected 'gpt2' with 50257"):
        load_manifest(out, verify=False)
    with pytest.raises(FileNotFoundError, match="shard manifest not found"):
        load_manifest(tmp_path)


def test_bad_documents_file(tmp_path):
    pq.write_table(pa.table({"doc_id": ["a"], "body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: missing column 'source'"):
        run_shard(ShardConfig(), tmp_path / "bad.parquet", tmp_path / "s", progress=False)
    with pytest.raises(FileNotFoundError, match="documents file not found"):
        run_shard(ShardConfig(), tmp_path / "none.parquet", tmp_path / "s", progress=False)


def book_windows(tokens, max_length, stride):
    """The book's GPTDatasetV1 loop (chapter 2), verbatim in spirit."""
    inputs, targets = [], []
    for i in range(0, len(tokens) - max_length, stride):
        inputs.append(torch.tensor(tokens[i:i + max_length]))
        targets.append(torch.tensor(tokens[i + 1:i + max_length + 1]))
    return inputs, targets


def test_token_windows_match_the_book():
    toy = np.arange(10, dtype=np.uint16)
    ds = TokenWindows(toy, context_length=4, stride=3)
    assert len(ds) == 2
    x, y = ds[1]
    assert x.dtype == torch.int64 and x.tolist() == [3, 4, 5, 6] and y.tolist() == [4, 5, 6, 7]
    assert ds[-1][0].tolist() == [3, 4, 5, 6]
    with pytest.raises(IndexError):
        ds[2]
    assert len(TokenWindows(toy, 9)) == 1 and not TokenWindows(toy, 9).short
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 17, 64, 65, 100):
        arr = rng.integers(0, 50257, size=n).astype(np.uint16)
        for ctx in (1, 4, 16, 64):
            for stride in (1, 3, ctx):
                ds = TokenWindows(arr, ctx, stride)
                if n <= ctx:  # shorter than one window: the stated rule, tested below
                    assert len(ds) == (1 if n >= 2 else 0), (n, ctx, stride)
                    continue
                bx, by = book_windows(arr.astype(np.int64).tolist(), ctx, stride)
                assert len(ds) == len(bx), (n, ctx, stride)
                for i in range(len(ds)):
                    x, y = ds[i]
                    assert torch.equal(x, bx[i]) and torch.equal(y, by[i])
    loader = torch.utils.data.DataLoader(TokenWindows(np.arange(50, dtype=np.uint16), 8), batch_size=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 8) and torch.equal(yb[:, :-1], xb[:, 1:])
    with pytest.raises(ValueError, match="context_length"):
        TokenWindows(toy, 0)


def test_token_windows_long_split():
    ds = TokenWindows(np.arange(20, dtype=np.uint16), context_length=4)  # stride = context
    assert len(ds) == 4 and not ds.short
    assert [ds[i][0].tolist() for i in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert ds[3][1].tolist() == [13, 14, 15, 16]  # tokens 17..19 start no window: a 5th needs 21 tokens
    ds = TokenWindows(np.arange(20, dtype=np.uint16), context_length=4, stride=6)
    assert len(ds) == 3 and [ds[i][0].tolist()[0] for i in range(3)] == [0, 6, 12]


def test_token_windows_split_of_exactly_context_plus_one():
    ds = TokenWindows(np.arange(5, dtype=np.uint16), context_length=4, stride=1)
    assert len(ds) == 1 and not ds.short
    x, y = ds[0]
    assert x.tolist() == [0, 1, 2, 3] and y.tolist() == [1, 2, 3, 4]


def test_token_windows_split_shorter_than_a_window():
    """2..context tokens: ONE window of all of them (shorter than the context), whatever the stride."""
    for n, stride in ((4, 4), (3, 1), (2, 7)):
        ds = TokenWindows(np.arange(10, 10 + n, dtype=np.uint16), context_length=4, stride=stride)
        assert len(ds) == 1 and ds.short
        x, y = ds[0]
        assert x.tolist() == list(range(10, 10 + n - 1)) and y.tolist() == list(range(11, 10 + n))
        assert ds[-1][0].tolist() == x.tolist()
        with pytest.raises(IndexError):
            ds[1]


def test_token_windows_split_of_one_token():
    for n in (0, 1):
        ds = TokenWindows(np.arange(n, dtype=np.uint16), context_length=4)
        assert len(ds) == 0 and not ds.short
        with pytest.raises(IndexError):
            ds[0]


def test_short_train_split_is_an_error_short_val_split_is_one_window(tmp_path):
    docs = write_docs(tmp_path / "d.parquet")
    run_shard(ShardConfig(), docs, tmp_path / "s", progress=False)
    n_train, n_val = len(read_tokens(tmp_path / "s", "train")), len(read_tokens(tmp_path / "s", "val"))
    assert n_val < n_train
    with pytest.raises(ValueError, match=rf"the train split has {n_train} tokens, shorter than "
                                         rf"context_length\+1 = {n_train + 1}"):
        TokenWindows.from_shards(tmp_path / "s", "train", context_length=n_train)
    val = TokenWindows.from_shards(tmp_path / "s", "val", context_length=n_val)
    assert len(val) == 1 and val.short and val[0][0].tolist() == read_tokens(tmp_path / "s", "val")[:-1].tolist()


def test_token_windows_from_shards(tmp_path):
    docs = write_docs(tmp_path / "d.parquet")
    run_shard(ShardConfig(), docs, tmp_path / "s", progress=False)
    tokens = read_tokens(tmp_path / "s", "train")
    ds = TokenWindows.from_shards(tmp_path / "s", "train", context_length=16, stride=8)
    assert len(ds) == len(range(0, len(tokens) - 16, 8))
    assert ds[2][0].tolist() == tokens[16:32].tolist()


def test_written_files_get_normal_permissions(tmp_path):
    """Shards and documents.parquet are written via temp files; they end with the umask's mode, not 0600."""
    import os
    import stat

    from llm.clean import run_clean
    from llm.config import CleanConfig

    old = os.umask(0o022)
    try:
        src = tmp_path / "a.txt"
        src.write_text("Some text that is long enough to keep.\n" * 20)
        docs = run_clean(CleanConfig(corpus=[str(src)]), {}, tmp_path / "clean", progress=False).outputs["documents"]
        run_shard(ShardConfig(), docs, tmp_path / "shards", progress=False)
    finally:
        os.umask(old)
    written = [docs, *sorted((tmp_path / "shards").iterdir())]
    assert len(written) == 4
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p

"""The shard stage: documents.parquet -> tokenized Parquet shards + manifest.json, and their readers.

Writing (`run_shard`): documents are read in record batches (never the whole corpus at once),
split into train/val, tokenized with tiktoken's GPT-2 encoding on cfg.workers threads
(llm.tokenizer.EncoderPool; tiktoken releases the GIL while encoding), and streamed into shard files

    train-00000.parquet, train-00001.parquet, ..., val-00000.parquet, manifest.json

with one row per document part: `tokens` (list<uint16>: the GPT-2 ids followed by <|endoftext|>
50256), `doc_id`, `source`. A shard is closed when the next row would push its token payload
(2 bytes per token) over cfg.max_shard_mb (1 MB = 10^6 bytes); a single longer row gets a shard
of its own. Splits:
  - "tail" (the book's): the last val_fraction of every document's characters is its val row,
    split_idx = int((1 - val_fraction) * len(text)), as in chapter 5 (train_ratio 0.90);
  - "document": whole documents go to val when a seeded hash of doc_id falls under val_fraction.
manifest.json (written last, atomically) names the tokenizer and lists every file with its rows,
tokens, bytes and sha256.

Reading:

    from llm.shards import read_tokens, TokenWindows
    train = read_tokens("data/shards", "train")             # 1-D uint16, rows concatenated in order
    ds = TokenWindows.from_shards("data/shards", "train", context_length=256, stride=256)
    x, y = ds[0]                                            # int64 tensors, y is x shifted by one

Run `python -m llm.shards DOCUMENTS.parquet OUT_DIR` to shard by hand, or
`python -m llm.shards --show SHARD_DIR` to print a manifest summary.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from llm import tokenizer as tok
from llm.fsutil import atomic_write_text, publish_file, sha256_file, temp_file
from llm.config import ShardConfig
from llm.result import MetricLogger, StageResult, log_or_null

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SCHEMA = pa.schema([("tokens", pa.list_(pa.uint16())), ("doc_id", pa.string()), ("source", pa.string())])
BATCH_ROWS = 64  # documents per record batch read from documents.parquet
SUB_BATCH_CHARS = 1 << 21  # characters tokenized per step; the previous step is written meanwhile
ROW_GROUP_BYTES = 16 << 20  # token payload per Parquet row group inside a shard
MB = 1_000_000


_sha256 = sha256_file


class _SplitWriter:
    """Streams rows of one split into size-capped shard files (temp file, renamed when complete)."""

    def __init__(self, out_dir: Path, split: str, cap_bytes: int):
        self.out_dir, self.split, self.cap = out_dir, split, cap_bytes
        self.files: list[dict] = []
        self._writer: Optional[pq.ParquetWriter] = None
        self._tmp: Optional[Path] = None
        self._file_rows = self._file_tokens = 0
        self._buf: list[tuple[np.ndarray, str, str]] = []
        self._buf_bytes = 0
        self.rows = self.tokens = 0

    def add(self, tokens: np.ndarray, doc_id: str, source: str) -> None:
        if self._file_rows and (self._file_tokens + len(tokens)) * 2 > self.cap:
            self._finish_file()
        self._buf.append((tokens, doc_id, source))
        self._buf_bytes += tokens.nbytes
        self._file_rows += 1
        self._file_tokens += len(tokens)
        self.rows += 1
        self.tokens += len(tokens)
        if self._buf_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        if self._writer is None:
            self._tmp = temp_file(self.out_dir, prefix=f".{self.split}.", suffix=".parquet.tmp")
            # Parquet stores uint16 as INT32: zstd brings it back to ~1.6 bytes/token. Dictionary
            # encoding only for the string columns (on tokens it slows reading ~4x for no gain).
            self._writer = pq.ParquetWriter(self._tmp, SCHEMA, compression="zstd", use_dictionary=["doc_id", "source"])
        arrays = [t for t, _, _ in self._buf]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.empty(0, np.uint16)
        col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.uint16()))
        table = pa.table([col, pa.array([d for _, d, _ in self._buf], pa.string()),
                          pa.array([s for _, _, s in self._buf], pa.string())], schema=SCHEMA)
        self._writer.write_table(table)
        self._buf.clear()
        self._buf_bytes = 0

    def _finish_file(self) -> None:
        self._flush()
        if self._writer is None:
            return
        self._writer.close()
        final = self.out_dir / f"{self.split}-{len(self.files):05d}.parquet"
        publish_file(self._tmp, final)
        self.files.append({"name": final.name, "rows": self._file_rows, "tokens": self._file_tokens,
                           "bytes": final.stat().st_size, "sha256": _sha256(final)})
        self._writer, self._tmp = None, None
        self._file_rows = self._file_tokens = 0

    def close(self) -> None:
        self._finish_file()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()


def _in_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64 < val_fraction


def run_shard(cfg: ShardConfig, documents: Path, out_dir: Path, progress: bool = True,
              log: Optional[MetricLogger] = None, pool: Optional[tok.EncoderPool] = None) -> StageResult:
    """Tokenize documents.parquet into train/val shards in out_dir; see the module docstring.

    pool: an EncoderPool to tokenize on instead of cfg.workers threads, e.g. one over a Dask
    cluster (`EncoderPool(n, executor=client.get_executor())`); the caller closes it. The shards
    are byte-identical whichever pool tokenizes them.
    metrics: train_tokens, val_tokens, train_docs, val_docs, shards. outputs: {"shards": out_dir}.
    """
    log = log_or_null(log)
    documents, out_dir = Path(documents), Path(out_dir)
    pf = _open_documents(documents)
    _remove_old_shards(out_dir)
    n_docs = pf.metadata.num_rows
    out = _ShardOutput(out_dir, cap_bytes=max(1, int(cfg.max_shard_mb * MB)))
    own_pool = pool is None
    if pool is None:
        pool = tok.EncoderPool(cfg.workers)
    try:
        with contextlib.ExitStack() as stack:
            if own_pool:
                stack.enter_context(pool)
            wex = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="llmpipe-shard-writer"))
            bar = stack.enter_context(tqdm(total=n_docs, desc="shard", unit="doc", disable=not progress))
            feed = _TokenFeed(pool, wex, out.write)
            seen = 0
            for rows in _document_batches(pf):
                for i, (doc_id, source, text) in enumerate(rows):
                    if doc_id is None or source is None or text is None:
                        raise ValueError(f"{documents}: row {seen + i}: null doc_id/source/text")
                    feed.add(_split_document(cfg, doc_id, source, text), len(text))
                seen += len(rows)
                bar.update(len(rows))
                del rows  # the batch's texts go before the next batch is read
                log({"documents_done": seen, "train_tokens": feed.tokens_done["train"],
                     "val_tokens": feed.tokens_done["val"]}, seen)
            feed.finish()
        out.close()
    except BaseException:
        out.abort()
        raise
    _check_splits(cfg, documents, out, n_docs)

    atomic_write_text(out_dir / MANIFEST, json.dumps(_manifest(cfg, out, n_docs), indent=2) + "\n")
    train, val = out.writers["train"], out.writers["val"]
    metrics = {
        "train_tokens": float(train.tokens), "val_tokens": float(val.tokens),
        "train_docs": float(out.docs["train"]), "val_docs": float(out.docs["val"]),
        "shards": float(len(train.files) + len(val.files)),
    }
    return StageResult(metrics=metrics, params={"tokenizer": tok.ENCODING_NAME},
                       artifacts=[out_dir / MANIFEST], outputs={"shards": out_dir})


def _open_documents(documents: Path) -> pq.ParquetFile:
    """documents.parquet opened for reading in batches, after checking it has doc_id, source, text."""
    if not documents.is_file():
        raise FileNotFoundError(f"{documents}: documents file not found (run the clean stage first)")
    try:
        pf = pq.ParquetFile(documents)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{documents}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    for col in ("doc_id", "source", "text"):
        if col not in names:
            raise ValueError(f"{documents}: missing column {col!r}; expected doc_id, source, text (got {names})")
    return pf


def _remove_old_shards(out_dir: Path) -> None:
    """Create out_dir, emptied of a previous run's shards: a re-run into the same folder must not mix them in."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("train-*.parquet"), *out_dir.glob("val-*.parquet"), out_dir / MANIFEST]:
        old.unlink(missing_ok=True)


def _document_batches(pf: pq.ParquetFile) -> Iterator[list[tuple[str, str, str]]]:
    """The (doc_id, source, text) rows of documents.parquet, BATCH_ROWS at a time, in file order."""
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["doc_id", "source", "text"]):
        rows = list(zip(batch.column("doc_id").to_pylist(), batch.column("source").to_pylist(),
                        batch.column("text").to_pylist()))
        del batch
        yield rows
        del rows


def _split_document(cfg: ShardConfig, doc_id: str, source: str, text: str) -> list[tuple[str, str, str, str]]:
    """The (split, doc_id, source, text) parts of one document under cfg.split (see the module docstring)."""
    if cfg.split != "tail":
        split = "val" if _in_val(doc_id, cfg.seed, cfg.val_fraction) else "train"
        return [(split, doc_id, source, text)]
    parts = []
    cut = int((1.0 - cfg.val_fraction) * len(text))
    if cut > 0:
        parts.append(("train", doc_id, source, text[:cut]))
    if cut < len(text):
        parts.append(("val", doc_id, source, text[cut:]))
    return parts


class _TokenFeed:
    """Document parts -> the pool's tokenizer workers -> the one writer thread, in submission order.

    Parts gather into sub-batches of at least sub_batch_chars characters (spanning record batches,
    so small documents still fill every worker); two sub-batches are in flight, so the workers start
    on the next while the previous is assembled, and at most one waits for the writer.
    """

    def __init__(self, pool: tok.EncoderPool, wex: ThreadPoolExecutor, write):
        self.pool, self.wex, self.write = pool, wex, write
        # enough characters per step to keep every worker busy (a cluster may have many)
        self.sub_batch_chars = max(SUB_BATCH_CHARS, pool.workers * (pool.piece_chars // 2))
        self.parts: list[tuple[str, str, str, str]] = []  # (split, doc_id, source, text) not yet submitted
        self.chars = 0
        self.inflight: collections.deque = collections.deque()  # (parts, result getter) submitted to the pool
        self.pending: Optional[Future] = None  # the writer's current sub-batch
        self.tokens_done = {"train": 0, "val": 0}

    def add(self, parts: list[tuple[str, str, str, str]], chars: int) -> None:
        """Queue one document's parts (chars: the document's length)."""
        self.parts.extend(parts)
        self.chars += chars
        if self.chars >= self.sub_batch_chars:
            self._submit()
            if len(self.inflight) > 1:
                self._drain_one()

    def finish(self) -> None:
        """Tokenize what is left and wait until the writer has written all of it."""
        if self.parts:
            self._submit()
        while self.inflight:
            self._drain_one()
        if self.pending is not None:
            self.pending.result()

    def _submit(self) -> None:
        self.inflight.append((self.parts, self.pool.submit_documents([p[3] for p in self.parts])))
        self.parts, self.chars = [], 0

    def _drain_one(self) -> None:
        sub, result = self.inflight.popleft()
        encoded = result()
        for p, arr in zip(sub, encoded):
            self.tokens_done[p[0]] += len(arr)
        if self.pending is not None:
            self.pending.result()  # at most one sub-batch waits for the writer
        self.pending = self.wex.submit(self.write, sub, encoded)


class _ShardOutput:
    """The train and val writers of one run, and the per-split and per-source counts the manifest lists."""

    def __init__(self, out_dir: Path, cap_bytes: int):
        self.writers = {s: _SplitWriter(out_dir, s, cap_bytes) for s in SPLITS}
        self.docs = {"train": 0, "val": 0}
        self.per_source: dict[str, dict[str, int]] = {}

    def write(self, parts: list[tuple[str, str, str, str]], encoded: list[np.ndarray]) -> None:
        # Runs on the single writer thread, in submission order (Parquet compression releases the GIL,
        # so it overlaps with the tokenizer threads working on the next sub-batch).
        for (split, doc_id, source, _), ids_arr in zip(parts, encoded):
            self.writers[split].add(ids_arr, doc_id, source)
            self.docs[split] += 1
            ps = self.per_source.setdefault(source, {"train_docs": 0, "val_docs": 0, "train_tokens": 0, "val_tokens": 0})
            ps[f"{split}_docs"] += 1
            ps[f"{split}_tokens"] += len(ids_arr)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def _check_splits(cfg: ShardConfig, documents: Path, out: _ShardOutput, n_docs: int) -> None:
    """A ValueError when the split left train empty, or (split=document) val empty."""
    if out.writers["train"].rows == 0:
        raise ValueError(f"{documents}: no training tokens (documents: {n_docs}; split={cfg.split}, "
                         f"val_fraction={cfg.val_fraction})")
    if cfg.split == "document" and cfg.val_fraction > 0 and out.writers["val"].rows == 0:
        raise ValueError(f"{documents}: split=document put none of the {n_docs} document(s) in val "
                         f"(val_fraction={cfg.val_fraction}, seed={cfg.seed}); use split: tail for few documents")


def _manifest(cfg: ShardConfig, out: _ShardOutput, n_docs: int) -> dict:
    """manifest.json's content: the tokenizer, the split settings and every shard file."""
    writers = out.writers
    splits = {s: {"rows": w.rows, "tokens": w.tokens, "files": w.files} for s, w in writers.items()}
    all_files = [f for w in writers.values() for f in w.files]
    return {
        "format": 1,
        "tokenizer": tok.ENCODING_NAME,
        "vocab_size": tok.GPT2_VOCAB_SIZE,
        "eot": tok.EOT,
        "dtype": "uint16",
        "split": cfg.split,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "max_shard_mb": cfg.max_shard_mb,
        "documents": n_docs,
        "splits": splits,
        "sources": out.per_source,
        "totals": {"rows": sum(w.rows for w in writers.values()), "tokens": sum(w.tokens for w in writers.values()),
                   "files": len(all_files), "bytes": sum(f["bytes"] for f in all_files)},
    }


# ------------------------------------------------------------------------------------- readers

def load_manifest(shard_dir: str | Path, verify: bool = True) -> dict:
    """Read manifest.json; check the tokenizer and (verify=True) every listed file's sha256."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard manifest not found (run the shard stage first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{path}: expected an object with 'splits'; not an llmpipe shard manifest")
    if manifest.get("tokenizer") != tok.ENCODING_NAME or manifest.get("vocab_size") != tok.GPT2_VOCAB_SIZE:
        raise ValueError(f"{path}: tokenizer {manifest.get('tokenizer')!r} with vocab_size "
                         f"{manifest.get('vocab_size')!r}; expected {tok.ENCODING_NAME!r} with {tok.GPT2_VOCAB_SIZE}")
    if verify:
        for split, info in manifest["splits"].items():
            for f in info.get("files", []):
                fp = shard_dir / f["name"]
                if not fp.is_file():
                    raise FileNotFoundError(f"{fp}: shard file listed in {path} is missing")
                actual = _sha256(fp)
                if actual != f["sha256"]:
                    raise ValueError(f"{fp}: sha256 {actual} does not match {path} ({f['sha256']}); "
                                     "the shard was modified or is corrupt: re-run the shard stage")
    return manifest


def read_tokens(shard_dir: str | Path, split: str, source: Optional[str] = None, verify: bool = True) -> np.ndarray:
    """All tokens of one split as a 1-D uint16 array (rows concatenated in shard order).

    source: keep only rows of that source. verify: check shard hashes first (see load_manifest).
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir, verify=verify)
    if split not in manifest["splits"]:
        raise ValueError(f"{shard_dir / MANIFEST}: no split {split!r}; splits: {', '.join(manifest['splits'])}")
    if source is not None and source not in manifest.get("sources", {}):
        raise ValueError(f"{shard_dir / MANIFEST}: no source {source!r}; sources: "
                         f"{', '.join(manifest.get('sources', {})) or 'none'}")
    parts: list[np.ndarray] = []
    for f in manifest["splits"][split]["files"]:
        cols = ["tokens"] if source is None else ["tokens", "source"]
        table = pq.read_table(shard_dir / f["name"], columns=cols)
        if source is not None:
            table = table.filter(pc.equal(table.column("source"), source))
        for chunk in table.column("tokens").chunks:
            flat = chunk.flatten()  # respects offsets/slices
            parts.append(flat.to_numpy(zero_copy_only=False))
    if not parts:
        return np.empty(0, dtype=np.uint16)
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out.astype(np.uint16, copy=False)


def sources(shard_dir: str | Path) -> list[str]:
    """Source names present in a shard folder (from its manifest; no hash check)."""
    return sorted(load_manifest(shard_dir, verify=False).get("sources", {}))


class TokenWindows(torch.utils.data.Dataset):
    """(input, target) windows over a 1-D token array, without materialising them -- the one
    sliding-window dataset, used by pretrain (train and val) and by evaluate.

    Item i is (tokens[s:s+L], tokens[s+1:s+L+1]) as int64 tensors. The rule, by the array's length n:

      - n >= context_length + 1: the book's GPTDatasetV1 windows, L = context_length and
        s in range(0, n - context_length, stride) -- exactly the book's loop;
      - 2 <= n <= context_length: ONE window of all the tokens, L = n - 1 (shorter than the context;
        stride plays no part), so a short val split or source is scored rather than skipped;
      - n < 2: no window (len() == 0).

    `short` says whether the second case applied. A train split must give full windows:
    `from_shards(..., "train", ...)` raises ValueError naming the split and its token count when it
    holds fewer than context_length + 1 tokens.
    """

    def __init__(self, tokens: np.ndarray | torch.Tensor | Sequence[int], context_length: int,
                 stride: Optional[int] = None):
        if context_length < 1:
            raise ValueError(f"context_length: expected >= 1, got {context_length}")
        stride = context_length if stride is None else stride
        if stride < 1:
            raise ValueError(f"stride: expected >= 1, got {stride}")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens: expected a 1-D array, got shape {arr.shape}")
        self.tokens = arr
        self.context_length = context_length
        self.stride = stride
        n = len(arr)
        self.short = 2 <= n <= context_length
        self.length = context_length if n > context_length else max(0, n - 1)  # L: tokens per input
        if n > context_length:
            self._n = (n - context_length - 1) // stride + 1
        else:
            self._n = 1 if self.short else 0

    @classmethod
    def from_shards(cls, shard_dir: str | Path, split: str, context_length: int, stride: Optional[int] = None,
                    source: Optional[str] = None, verify: bool = True) -> "TokenWindows":
        """The windows of one split's tokens (read_tokens); a train split shorter than one full window
        is a ValueError."""
        ds = cls(read_tokens(shard_dir, split, source=source, verify=verify), context_length, stride)
        if split == "train" and len(ds.tokens) <= context_length:
            raise ValueError(f"{shard_dir}: the train split has {len(ds.tokens)} tokens, shorter than "
                             f"context_length+1 = {context_length + 1}; use more text or a smaller "
                             "pretrain.model.context_length")
        return ds

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"window {i} out of range (0..{self._n - 1})")
        s = i * self.stride
        chunk = self.tokens[s:s + self.length + 1].astype(np.int64)
        t = torch.from_numpy(chunk)
        return t[:-1], t[1:]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--show":
        m = load_manifest(sys.argv[2])
        print(json.dumps({k: m[k] for k in ("tokenizer", "split", "totals", "sources")}, indent=2))
    elif len(sys.argv) == 3:
        res = run_shard(ShardConfig(), Path(sys.argv[1]), Path(sys.argv[2]))
        print(json.dumps(res.metrics, indent=2))
    else:
        sys.exit("usage: python -m llm.shards DOCUMENTS.parquet OUT_DIR | --show SHARD_DIR")

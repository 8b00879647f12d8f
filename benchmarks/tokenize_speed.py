"""Benchmark: llmpipe's tokenize+shard path vs the fastest raw tiktoken paths, side by side.

The six Project Gutenberg books (default: ../shared/data/gutenberg) are cleaned with llm.clean's
steps and written once to a documents.parquet. Then each path runs in a fresh subprocess (so its
peak RSS is its own), best of --repeats:

  llmpipe run_shard        llm.shards.run_shard: read Parquet, tail split, tokenize on --workers
                           threads, write hashed shards + manifest (everything the stage does)
  llmpipe encode_documents llm.tokenizer.encode_documents on the in-memory texts (tokenizing only),
                           thread backend and process backend
  raw encode_to_numpy      tiktoken Encoding.encode_to_numpy per book, in this process
  raw encode_ordinary_batch tiktoken's thread-pool batch API (lists of ints), in this process
  raw 2 processes          encode_to_numpy per book in a 2-process pool (pool start included)

Throughput is MB/s of cleaned UTF-8 text per wall second (process start-up of the pools is
included, interpreter start-up is not). Each fresh process calls its path --calls times (default 2):
the first call is cold (page faults; every new tokenizer thread warms its own copy of tiktoken's
regex caches), a later one warm; on a 6 MB corpus the cold cost is a large share, on a corpus-sized
run it is not. Both ratios are printed: llmpipe run_shard vs the fastest raw path, cold and warm.
The token ids of llmpipe's shards are checked against tiktoken's for the same text.

    python benchmarks/tokenize_speed.py [--data ../shared/data/gutenberg] [--repeats 3] [--workers N]
    python benchmarks/tokenize_speed.py --scale 100 400        # peak RSS of run_shard at 100 and 400 MB of input

--workers defaults to every allowed core, like the raw batch API's threads (the stage's own default,
workers 0, is the same: the cores of this process's CPU affinity).
--scale MB ...: writes a documents.parquet of about MB megabytes (the cleaned books repeated under new
doc_ids, in row groups as the clean stage writes them) and reports run_shard's time, MB/s and peak
RSS (VmHWM of a fresh process) for each size: the peak should not grow with the corpus.

The machine may be shared: the load average before and after is printed with the figures.
"""
from __future__ import annotations

import os
import sys


import argparse
import json
import resource
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BOOKS = ["11-0.txt", "Pride_and_Prejudice_JaneAusten.txt", "98-0.txt", "145-0.txt", "2701-0.txt", "pg1260.txt"]


def _texts(documents: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(documents, columns=["text"]).column("text").to_pylist()


def _raw_encode(text: str):
    from llm.tokenizer import get_encoding

    return get_encoding().encode_to_numpy(text, allowed_special={"<|endoftext|>"}).astype("uint16")


def run_one(mode: str, documents: Path, workers: int, calls: int = 1) -> dict:
    """`calls` timed runs of one path in this (fresh) process: the first is cold, the later ones warm."""
    import multiprocessing

    from llm.tokenizer import encode_documents, get_encoding

    if mode == "llmpipe_run_shard":
        from llm.config import ShardConfig
        from llm.shards import run_shard  # imports torch (TokenWindows): only where it is used

    enc = get_encoding()  # build the ranks before timing, for every path
    # run_shard reads the file itself: loading the texts here would add the corpus to its peak RSS
    texts = _texts(documents) if mode != "llmpipe_run_shard" else []

    def once() -> int:
        if mode == "llmpipe_run_shard":
            with tempfile.TemporaryDirectory() as d:
                res = run_shard(ShardConfig(workers=workers), documents, Path(d) / "shards", progress=False)
                tokens = int(res.metrics["train_tokens"] + res.metrics["val_tokens"])
        elif mode == "llmpipe_encode_documents":
            tokens = sum(len(a) for a in encode_documents(texts, workers=workers))
        elif mode == "llmpipe_encode_processes":
            tokens = sum(len(a) for a in encode_documents(texts, workers=workers, backend="process"))
        elif mode == "raw_encode_to_numpy":
            tokens = sum(len(enc.encode_to_numpy(t, allowed_special={"<|endoftext|>"})) for t in texts)
        elif mode == "raw_encode_ordinary_batch":
            tokens = sum(len(x) for x in enc.encode_ordinary_batch(texts))
        elif mode == "raw_2_processes":
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(2, mp_context=ctx) as ex:
                tokens = sum(len(a) for a in ex.map(_raw_encode, texts))
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return tokens

    times = []
    for _ in range(calls):  # the first call in a fresh process is cold (page faults, each thread's regex caches)
        t0 = time.perf_counter()
        tokens = once()
        times.append(time.perf_counter() - t0)
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so it would include the parent's size.
    self_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"mode": mode, "seconds": times[0], "warm_seconds": min(times[1:]) if calls > 1 else None, "tokens": tokens, "rss_mb": self_kb / 1024, "child_rss_mb": child_kb / 1024}


def scale(documents: Path, sizes: list[float], workers: int, tmp: Path) -> None:
    """run_shard on corpora of `sizes` MB built from the books in `documents`; time and peak RSS each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm.clean import ROW_GROUP_CHARS, SCHEMA

    books = pq.read_table(documents).to_pylist()
    print(f"cpus: {len(os.sched_getaffinity(0))}, llmpipe workers: {workers}, load average before: {os.getloadavg()}")
    print(f"\n{'input MB':>9s} {'documents':>10s} {'seconds':>8s} {'MB/s':>7s} {'tokens':>12s} {'peak RSS MB':>12s}")
    for mb in sizes:
        path = tmp / f"documents-{mb:g}MB.parquet"
        writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
        total, n, buf, buf_chars = 0, 0, [], 0
        while total < mb * 1e6:
            b = books[n % len(books)]
            buf.append({"doc_id": f"{b['doc_id']}-copy{n}", "source": b["source"], "text": b["text"]})
            total += len(b["text"].encode("utf-8"))
            buf_chars += len(b["text"])
            n += 1
            if buf_chars >= ROW_GROUP_CHARS:
                writer.write_table(pa.Table.from_pylist(buf, schema=SCHEMA))
                buf, buf_chars = [], 0
        if buf:
            writer.write_table(pa.Table.from_pylist(buf, schema=SCHEMA))
        writer.close()
        out = subprocess.run([sys.executable, __file__, "--one", "llmpipe_run_shard", "--documents", str(path),
                              "--workers", str(workers)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"run_shard failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{total / 1e6:9.1f} {n:10d} {r['seconds']:8.2f} {total / 1e6 / r['seconds']:7.2f} {r['tokens']:12,d} "
              f"{r['rss_mb']:12.0f}", flush=True)
        path.unlink()
    print(f"load average after: {os.getloadavg()}")


MODES = ["llmpipe_run_shard", "llmpipe_encode_documents", "llmpipe_encode_processes", "raw_encode_to_numpy",
         "raw_encode_ordinary_batch", "raw_2_processes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gutenberg"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="llmpipe tokenizer workers (default: every allowed core; 0 = the stage default, the free cores)")
    ap.add_argument("--scale", type=float, nargs="+", metavar="MB", help="measure run_shard's peak RSS at these input sizes")
    ap.add_argument("--calls", type=int, default=2,
                    help="calls per fresh process: the first is cold, the best later one is the warm figure")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--documents", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, Path(args.documents), args.workers, args.calls)))
        return

    from llm.clean import run_clean
    from llm.config import CleanConfig, ShardConfig
    from llm.shards import read_tokens, run_shard
    from llm.tokenizer import EOT, get_encoding

    data = Path(args.data)
    files = {Path(b).stem: data / b for b in BOOKS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        sys.exit(f"benchmark data not found: {', '.join(missing)} (use --data)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean = run_clean(CleanConfig(), files, tmp / "clean", progress=False)
        documents = clean.outputs["documents"]
        if args.scale:
            return scale(documents, args.scale, args.workers, tmp)
        texts = _texts(documents)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        print(f"corpus: {len(texts)} cleaned books, {sum(map(len, texts)):,} chars, {nbytes / 1e6:.2f} MB UTF-8")
        print(f"cpus: {len(os.sched_getaffinity(0))}, "
              f"llmpipe workers: {args.workers or 'allowed cores'}, load average before: {os.getloadavg()}")

        # Correctness: llmpipe's shard tokens equal tiktoken's ids for the same train/val text parts.
        res = run_shard(ShardConfig(workers=args.workers), documents, tmp / "shards", progress=False)
        enc = get_encoding()
        expect_train, expect_val = [], []
        for t in texts:
            cut = int(0.9 * len(t))
            expect_train += enc.encode(t[:cut], allowed_special="all") + [EOT]
            expect_val += enc.encode(t[cut:], allowed_special="all") + [EOT]
        ok = (read_tokens(tmp / "shards", "train").tolist() == expect_train
              and read_tokens(tmp / "shards", "val").tolist() == expect_val)
        print(f"llmpipe shard tokens == tiktoken ids: {ok} ({int(res.metrics['train_tokens'] + res.metrics['val_tokens']):,} tokens)")

        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:  # interleaved, so load changes hit every path alike
                out = subprocess.run([sys.executable, __file__, "--one", mode, "--documents", str(documents),
                                      "--workers", str(args.workers), "--calls", str(args.calls)],
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    sys.exit(f"{mode} failed:\n{out.stderr}")
                results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"load average after: {os.getloadavg()}")
        print(f"\n{'path':28s} {'cold s':>8s} {'MB/s':>7s} {'warm s':>8s} {'MB/s':>7s} {'tokens':>10s} "
              f"{'peak RSS MB':>12s} {'workers RSS MB':>15s}")
        cold, warm = {}, {}
        for mode, runs in results.items():
            r = min(runs, key=lambda x: x["seconds"])
            cold[mode] = nbytes / 1e6 / r["seconds"]
            w = min((x["warm_seconds"] for x in runs if x["warm_seconds"]), default=None)
            warm[mode] = nbytes / 1e6 / w if w else None
            print(f"{mode:28s} {r['seconds']:8.3f} {cold[mode]:7.2f} {w or float('nan'):8.3f} {warm[mode] or float('nan'):7.2f} "
                  f"{r['tokens']:10,d} {max(x['rss_mb'] for x in runs):12.0f} {max(x['child_rss_mb'] for x in runs):15.0f}")
        for label, best in (("cold (first call in a fresh process)", cold), ("warm (a later call)", warm)):
            raw = {m: v for m, v in best.items() if m.startswith("raw_") and v}
            if not raw or not best["llmpipe_run_shard"]:
                continue
            fastest = max(raw, key=raw.get)
            print(f"\n{label}: llmpipe run_shard / fastest raw ({fastest}): {best['llmpipe_run_shard'] / raw[fastest]:.2f}x; "
                  f"llmpipe encode_documents / fastest raw: {best['llmpipe_encode_documents'] / raw[fastest]:.2f}x")


if __name__ == "__main__":
    main()

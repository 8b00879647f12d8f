"""Benchmark: the clean and shard stages on threads (default) vs a local Dask cluster, side by side.

The text files of --data (default: the six Project Gutenberg books in ../shared/data/gutenberg,
copied --copies times to look like a bigger corpus; dedup is off so the copies stay) are cleaned
and sharded by llm/ exactly as the stages do it:

  threads   run_clean streamed in this process, run_shard on cfg.workers tokenizer threads
  dask      a distributed.LocalCluster of --workers single-threaded processes (start-up timed
            separately), run_clean with the cluster's executor, run_shard with an EncoderPool on it

Prints wall seconds per path (best of --repeats), the ratio dask/threads, and checks that both
wrote byte-identical documents.parquet and shards. Measured here (2 cores, load ~3, 12 files,
11.8 MB): threads 1.25 s, dask 1.75 s + 1.1 s cluster start = ratio 1.40. On a 2-core machine expect the Dask path to be
no faster (pickling text to worker processes costs what threads get for free); it exists for
clusters with many cores, where the ratio is what this prints on them.

    python benchmarks/task_runners.py [--data ../shared/data/gutenberg] [--copies 4] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def _run(files: list[Path], out: Path, executor=None, slots: int = 0) -> float:
    from llm.clean import run_clean
    from llm.config import CleanConfig, ShardConfig
    from llm.shards import run_shard
    from llm.tokenizer import EncoderPool

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    cfg = CleanConfig(corpus=[str(f) for f in files], strip_gutenberg=True, dedup=False)  # copies stay
    docs = run_clean(cfg, {}, out / "clean", progress=False, executor=executor, executor_slots=slots)
    pool = EncoderPool(slots, executor=executor) if executor is not None else None
    run_shard(ShardConfig(), docs.outputs["documents"], out / "shards", progress=False, pool=pool)
    return time.perf_counter() - t0


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix == ".parquet")
    return bool(names) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/gutenberg", help="a folder of .txt files")
    ap.add_argument("--copies", type=int, default=4, help="each file this many times (as distinct files)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="Dask worker processes")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    src = sorted(Path(args.data).glob("*.txt"))
    if not src:
        raise SystemExit(f"--data {args.data}: no .txt files")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = []
        for i in range(args.copies):
            for f in src:
                dst = tmp / "corpus" / f"{f.stem}-{i}.txt"
                dst.parent.mkdir(exist_ok=True)
                dst.write_bytes(f.read_bytes())
                files.append(dst)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} files, {mb:.1f} MB; load average {os.getloadavg()[0]:.2f}")
        threads = min(_run(files, tmp / "threads") for _ in range(args.repeats))
        import distributed

        t0 = time.perf_counter()
        with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster, set_as_default=False) as client:
            startup = time.perf_counter() - t0
            ex = client.get_executor()
            dask = min(_run(files, tmp / "dask", ex, args.workers) for _ in range(args.repeats))
        same = _same(tmp / "threads", tmp / "dask")
        print(f"threads  {threads:7.2f} s  {mb / threads:6.2f} MB/s")
        print(f"dask     {dask:7.2f} s  {mb / dask:6.2f} MB/s  (+ {startup:.2f} s cluster start, {args.workers} workers)")
        print(f"ratio dask/threads time: {dask / threads:.2f}   byte-identical outputs: {same}")
        print(f"load average after {os.getloadavg()[0]:.2f}")
        if not same:
            raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()

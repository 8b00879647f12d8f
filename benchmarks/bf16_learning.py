"""Check that bf16 autocast training learns as fp32 does: the same pretrain run twice, side by side.

Cleans and shards a preset's corpus from a local mirror (once, into --work), then pretrains the
preset's model twice with identical settings except `pretrain.dtype` (float32, then bfloat16) and
prints both loss histories, the final val losses and their relative gap at the same step, and the
tokens/s of each (both runs share the machine's load; the load average is printed).

    python benchmarks/bf16_learning.py --preset tiny
    python benchmarks/bf16_learning.py --preset gutenberg --set pretrain.max_steps=60 pretrain.eval_every=20 \\
        pretrain.warmup_steps=10 pretrain.eval_batches=10

--mirror: the folder holding the datasets (default ../shared/data); --work: where the clean/shard
outputs and the two runs go (default a temporary folder). The question the issue asks: is the bf16
val loss within ~1% of fp32's at the same step?
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder's tokenize.py would shadow the standard library's module
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--mirror", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--work", help="folder for the clean/shard outputs and the runs (default: a temp folder)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    a = ap.parse_args()

    from llm.clean import run_clean
    from llm.config import load_config
    from llm.shards import run_shard
    from llm.sources import load_sources
    from llm.precision import resolve_dtype
    from llm.train import run_pretrain

    cfg = load_config(a.preset, overrides=a.overrides)
    sources = load_sources()
    names = cfg.clean.sources
    inputs = {n: Path(a.mirror) / sources[n].file for n in names}
    missing = [str(p) for p in inputs.values() if not p.is_file()]
    if missing:
        sys.exit(f"not in the mirror: {', '.join(missing)} (use --mirror)")
    work = Path(a.work or tempfile.mkdtemp(prefix="llmpipe-bf16-"))
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        docs = run_clean(cfg.clean, inputs, work / "clean", progress=False).outputs["documents"]
        run_shard(cfg.shard, docs, shards, progress=False)
    import torch

    print(f"preset {a.preset} {' '.join(a.overrides)}; torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}; load average {os.getloadavg()}")
    print("dtype auto here would be:", resolve_dtype("auto", torch.device("cpu"), cfg.pretrain.model.emb_dim
                                                     if cfg.pretrain.model.emb_dim else 768, cfg.pretrain.book_compat))
    results = {}
    for dtype in a.dtypes:
        out = work / f"run-{dtype}"
        pc = cfg.pretrain.model_copy(update={"dtype": dtype})
        t = time.perf_counter()
        res = run_pretrain(pc, shards, out, progress=False)
        hist = json.loads((out / "history.json").read_text())
        results[dtype] = (res, hist, time.perf_counter() - t)
        print(f"\n{dtype}: {res.params['dtype']} ({res.params['dtype_reason']}), {time.perf_counter() - t:.0f} s, "
              f"{res.metrics['tokens_per_sec']:.0f} tokens/s, load average {os.getloadavg()}")
        for s, tr, va in zip(hist["step"], hist["train_loss"], hist["val_loss"]):
            print(f"  step {s:5d}  train {tr:.4f}  val {va if va is None else round(va, 4)}")
    if len(results) == 2:
        (d0, (r0, h0, _)), (d1, (r1, h1, _)) = results.items()
        v0, v1 = r0.metrics.get("val_loss"), r1.metrics.get("val_loss")
        print(f"\nfinal (step {h0['step'][-1]}): val {d0} {v0:.4f}, {d1} {v1:.4f}: {d1} is "
              f"{100 * (v1 - v0) / v0:+.2f}% vs {d0}; train {r0.metrics['train_loss']:.4f} vs {r1.metrics['train_loss']:.4f}; "
              f"speed {r1.metrics['tokens_per_sec'] / r0.metrics['tokens_per_sec']:.2f}x")


if __name__ == "__main__":
    main()

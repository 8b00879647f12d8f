"""Benchmark: pretrain GPT-2 124M at context 1024 on a CUDA GPU through llmpipe's own pretrain stage,
and report tokens/s and MFU against the GPU's bf16 dense peak.

It runs llm.train.run_pretrain (the code the pipeline runs) with dtype auto (bf16 autocast where the
GPU has it), compile on and the fused AdamW, on the gutenberg preset's six books cleaned and
sharded from --mirror (random token ids when no mirror is found: the speed does not depend on the
text). Model: OpenAI GPT-2 small's shape (12 layers, 768 wide, 12 heads, context 1024, tied head,
qkv bias), dropout 0, as nanoGPT's 124M run. tokens/s is that of the last eval segment, so the
compile time of the first steps is not in it (it is printed separately).

    python benchmarks/gpu_pretrain.py [--steps 300] [--batch 16] [--mirror ../shared/data] [--peak-tflops N]

Anchors: nanoGPT ~29% MFU on an A100 for 124M; llm.c ~60%; the book's A100 table 12.5k -> 142k
tokens/s with bf16 + SDPA + compile + fused AdamW (context 1024).
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

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def gpu_peak(name: str) -> float | None:
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):  # most specific name first
        if key in name:
            return BF16_PEAK_TFLOPS[key]
    return None


def shards_for(mirror: Path, work: Path) -> tuple[Path, str]:
    from llm.clean import run_clean
    from llm.config import load_config
    from llm.shards import run_shard
    from llm.sources import load_sources

    cfg = load_config("gutenberg")
    sources = load_sources()
    inputs = {n: mirror / sources[n].file for n in cfg.clean.sources}
    out = work / "shards"
    if all(p.is_file() for p in inputs.values()):
        docs = run_clean(cfg.clean, inputs, work / "clean", progress=False).outputs["documents"]
        run_shard(cfg.shard, docs, out, progress=False)
        return out, f"gutenberg preset's six books from {mirror}"
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)  # a corpus of random common words, about 1.5M tokens
    words = rng.choice(np.array("the of and to a in that it was he his I with as for had you not be her".split()),
                       1_500_000)
    (work / "docs").mkdir(parents=True, exist_ok=True)
    table = pa.table({"doc_id": ["random"], "source": ["random"], "text": [" ".join(words.tolist())]})
    pq.write_table(table, work / "docs" / "documents.parquet")
    run_shard(cfg.shard, work / "docs" / "documents.parquet", out, progress=False)
    return out, f"random words (no gutenberg books under {mirror})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--mirror", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from a table by name)")
    ap.add_argument("--compile", default="on", choices=["on", "off"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    a = ap.parse_args()

    import torch

    from llm.config import PretrainConfig
    from llm.model import GPT, GPTConfig
    from llm.train import run_pretrain

    if not torch.cuda.is_available():
        sys.exit("gpu_pretrain.py needs a CUDA GPU")
    name = torch.cuda.get_device_name(0)
    peak = a.peak_tflops or gpu_peak(name)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; GPU {name}; torch {torch.__version__}; "
          f"bf16 dense peak {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s")
    a_, b_ = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a_ @ b_
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a_ @ b_
    torch.cuda.synchronize()
    print(f"measured bf16 matmul (8192^3): {20 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s")
    del a_, b_
    work = Path(tempfile.mkdtemp(prefix="llmpipe-gpu-"))
    shards, what = shards_for(Path(a.mirror), work)
    print(f"data: {what}")
    cfg = PretrainConfig.model_validate(dict(
        model={"name": "gpt2-small", "drop_rate": 0.0}, epochs=1000, max_steps=a.steps, batch_size=a.batch,
        lr=6e-4, min_lr=6e-5, warmup_steps=min(100, a.steps // 3), eval_every=a.eval_every, eval_batches=10,
        checkpoint_every=10 ** 9, keep_checkpoints=1, dtype=a.dtype, compile=a.compile, device="cuda", seed=123))
    flops_tok = GPT(GPTConfig.named("gpt2-small", drop_rate=0.0)).flops_per_token()
    logs: list[tuple[int, dict]] = []
    t0 = time.perf_counter()
    res = run_pretrain(cfg, shards, work / "run", progress=False, log=lambda m, s: logs.append((s, dict(m))))
    wall = time.perf_counter() - t0
    for s, m in logs:
        print(f"  step {s:5d}  train {m.get('train_loss', float('nan')):.4f}  val {m.get('val_loss', float('nan')):.4f}"
              f"  {m['tokens_per_sec']:,.0f} tokens/s")
    tps = logs[-1][1]["tokens_per_sec"]  # the last segment: no compilation in it
    mfu = tps * flops_tok / (peak * 1e12) if peak else None
    print(f"\n124M, context 1024, batch {a.batch}: {tps:,.0f} tokens/s (last {a.eval_every} steps), "
          f"{flops_tok / 1e6:.0f} MFLOP/token, MFU {f'{100 * mfu:.1f}%' if mfu else '?'} of the bf16 dense peak; "
          f"dtype {res.params['dtype']} ({res.params['dtype_reason']}), compile {res.params['compile']}; "
          f"whole run {wall:.0f} s incl. compile; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(json.dumps({"gpu": name, "tokens_per_sec": tps, "mfu": mfu, "steps": a.steps, "batch": a.batch,
                      "dtype": res.params["dtype"], "compile": res.params["compile"], "wall_s": wall}))


if __name__ == "__main__":
    main()

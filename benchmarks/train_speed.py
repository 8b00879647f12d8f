"""Benchmark: tokens/s of llmpipe's training step vs the book's reference GPTModel, side by side.

Both train the same architecture on the same random batch with AdamW: the reference is the
PyPI package `llms_from_scratch` (the book's own code: ch04.GPTModel, its calc_loss_batch-style
step, torch.optim.AdamW defaults); llmpipe is llm.model.GPT with llm.train's step (SDPA attention,
fused qkv, fused AdamW, optional torch.compile). Configs:

  tiny   the `tiny` preset's model: 2 layers, emb 64, 2 heads, context 64, vocab 50257, batch 8
  124m   the book's GPT_CONFIG_124M at context 256 (untied head, no qkv bias), batch 4

For each config it prints tokens/s, the ratio to the reference and the MFU against the machine's
fp32 matmul peak measured in the same run (a large square matmul); FLOPs per token are the PaLM
estimate 6N + 12*L*d*T (llm.model.GPT.flops_per_token). On the tiny config it also measures the
share of the 50257-wide output head (its matmul and the cross-entropy, forward and backward).

    python benchmarks/train_speed.py [--configs tiny 124m] [--steps 3] [--warmup 2] [--compile auto|on|off]

Run it on an otherwise idle machine; the load average before and after is printed with the figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# This folder holds benchmarks/tokenize.py, which would shadow the standard library's `tokenize`.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llm.model import GPT, GPTConfig  # noqa: E402
from llm.train import batch_loss, make_optimizer  # noqa: E402
from llm.config import PretrainConfig  # noqa: E402

CONFIGS = {
    "tiny": dict(cfg=dict(vocab_size=50257, context_length=64, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0,
                          qkv_bias=False, tie_weights=False), batch=8),
    "124m": dict(cfg=dict(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1,
                          qkv_bias=False, tie_weights=False), batch=4),
}


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """fp32 GFLOP/s of a large square matmul (best of reps)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def time_pair(step_a, step_b, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds per call of step_a and step_b, calls interleaved (a, b, a, b, ...) after warmup, so a
    busy machine slows both alike."""
    for _ in range(warmup):
        step_a()
        step_b()
    ta, tb = [], []
    for _ in range(steps):
        t = time.perf_counter()
        step_a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        step_b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def reference_step(cfg: dict, x, y):
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(123)
    model = GPTModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)  # the book's chapter-5 call

    def step():
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
    return step


def llmpipe_step(cfg: dict, x, y, compile_: bool):
    torch.manual_seed(123)
    model = GPT(GPTConfig(**cfg)).train()
    pcfg = PretrainConfig(lr=4e-4, weight_decay=0.1)
    opt = make_optimizer(model, pcfg, torch.device("cpu"))
    fwd = torch.compile(model) if compile_ else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(fwd, x, y, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step, model


def head_share(cfg: dict, x, y, step_s: float, warmup: int, steps: int) -> tuple[float, float]:
    """(time share, FLOP share) of the output head + cross-entropy in one training step."""
    d, v = cfg["emb_dim"], cfg["vocab_size"]
    h = torch.randn(x.shape[0], x.shape[1], d, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(v, d) * 0.02)

    def head():
        w.grad = None
        h.grad = None
        loss = F.cross_entropy((h @ w.t()).flatten(0, 1), y.flatten())
        loss.backward()
    t = time_steps(head, warmup, steps)
    model = GPT(GPTConfig(**cfg))
    flop_share = 6 * v * d / model.flops_per_token()
    return t / step_s, flop_share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "124m"], choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="auto: measure llmpipe both eager and compiled")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all allowed cores)")
    a = ap.parse_args()
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads, load average before: {os.getloadavg()}")
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3, best of 10): {peak:.1f} GFLOP/s")
    for name in a.configs:
        spec = CONFIGS[name]
        cfg, b = spec["cfg"], spec["batch"]
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg["vocab_size"], (b, cfg["context_length"]), generator=g)
        y = torch.randint(0, cfg["vocab_size"], (b, cfg["context_length"]), generator=g)
        tokens = b * cfg["context_length"]
        flops_tok = GPT(GPTConfig(**cfg)).flops_per_token()
        rows = []
        ref_step = reference_step(cfg, x, y)
        variants = {"auto": [False, True], "on": [True], "off": [False]}[a.compile]
        for comp in variants:
            t0 = time.perf_counter()
            step, _ = llmpipe_step(cfg, x, y, comp)
            step()  # includes compilation when compiled
            first = time.perf_counter() - t0
            ref_s, s = time_pair(ref_step, step, a.warmup, a.steps)
            rows.append((f"book GPTModel + AdamW (paired with the next row)", ref_s, ref_s))
            rows.append((f"llmpipe {'compiled' if comp else 'eager'} (first step {first:.1f}s)", s, ref_s))
            del step
        print(f"\n[{name}] batch {b} x context {cfg['context_length']} = {tokens} tokens/step, "
              f"{flops_tok / 1e6:.1f} MFLOP/token")
        for label, s, ref_s in rows:
            tps = tokens / s
            mfu = tps * flops_tok / (peak * 1e9)
            print(f"  {label:50s} {s * 1000:9.1f} ms/step {tps:10.1f} tokens/s  x{ref_s / s:4.2f} vs book  "
                  f"MFU {100 * mfu:5.1f}%")
        if name == "tiny":
            best = min(s for label, s, _ in rows if label.startswith("llmpipe"))
            t_share, f_share = head_share(cfg, x, y, best, a.warmup, a.steps)
            print(f"  output head + cross-entropy: {100 * t_share:.0f}% of the fastest llmpipe step's time, "
                  f"{100 * f_share:.0f}% of its FLOPs")
    print(f"\nfp32 matmul peak again: {matmul_peak():.1f} GFLOP/s; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

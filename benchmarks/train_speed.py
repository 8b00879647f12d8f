"""Benchmark: tokens/s of llmpipe's training step in fp32 and bf16 vs the book's reference GPTModel, side by side.

All variants train the same architecture on the same random batch with AdamW: the reference is the
PyPI package `llms_from_scratch` (the book's own code: ch04.GPTModel, its calc_loss_batch-style
step, torch.optim.AdamW defaults, fp32 as the book runs on a CPU); llmpipe is llm.model.GPT with
llm.train's step (SDPA attention, fused qkv, fused AdamW, clipping) in fp32 and under bf16 autocast
(loss in fp32), optionally torch.compile'd. Configs:

  tiny   the `tiny` preset's model: 2 layers, emb 64, 2 heads, context 64, vocab 50257, batch 8
  124m   the book's GPT_CONFIG_124M at context 256 (untied head, no qkv bias, dropout 0.1), batch 4

For each config it prints, per variant, ms/step, tokens/s, the ratio to the book's reference and the
MFU against the peak of the precision that variant computes in (fp32 or bf16 matmul peak, a large
square matmul measured in the same run); FLOPs per token are the PaLM estimate 6N + 12*L*d*T
(llm.model.GPT.flops_per_token). The row "llmpipe default" is what `dtype: auto` picks here for that
model (llm.precision.resolve_dtype; the reason is printed). All variants of a config run round-robin
(book, fp32, bf16, book, ...) so load from other processes slows them alike. On the tiny config it
also measures the share of the 50257-wide output head (its matmul and the cross-entropy).

    python benchmarks/train_speed.py [--configs tiny 124m] [--steps 3] [--warmup 2] [--compile off|on|both]
                                     [--dtypes float32 bfloat16]

Run it on an otherwise idle machine; the load average before and after is printed with the figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llm.model import GPT, GPTConfig  # noqa: E402
from llm.precision import cpu_bf16_instructions, resolve_dtype  # noqa: E402
from llm.pretrain_data import batch_loss  # noqa: E402
from llm.train import make_optimizer  # noqa: E402
from llm.config import PretrainConfig  # noqa: E402

CONFIGS = {
    "tiny": dict(cfg=dict(vocab_size=50257, context_length=64, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0,
                          qkv_bias=False, tie_weights=False), batch=8),
    "124m": dict(cfg=dict(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1,
                          qkv_bias=False, tie_weights=False), batch=4),
}


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of a large square matmul in `dtype` (best of reps)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
        if best > 5.0:  # emulated bf16 on a CPU without bf16 instructions: one rep says enough
            break
    return 2 * n ** 3 / best / 1e9


def time_round_robin(steps: dict, warmup: int, reps: int) -> dict:
    """Median seconds per call of each step, calls interleaved (a, b, c, a, b, c, ...) after warmup,
    so a busy machine slows every variant alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def time_steps(step, warmup: int, steps: int) -> float:
    return time_round_robin({0: step}, warmup, steps)[0]


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


def llmpipe_step(cfg: dict, x, y, compile_: bool, amp: Optional[torch.dtype] = None):
    torch.manual_seed(123)
    model = GPT(GPTConfig(**cfg)).train()
    pcfg = PretrainConfig(lr=4e-4, weight_decay=0.1)
    opt = make_optimizer(model, pcfg)
    fwd = torch.compile(model) if compile_ else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(fwd, x, y, amp)
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
    ap.add_argument("--compile", choices=["off", "on", "both"], default="off",
                    help="llmpipe eager (off), compiled (on) or both")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all allowed cores)")
    a = ap.parse_args()
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu}; torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, bf16 instructions: "
          f"{cpu_bf16_instructions() or 'none'}; {threads} threads; load average before: {os.getloadavg()}")
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    print("matmul peak (2048^3, best of 10): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    amps = {"float32": None, "bfloat16": torch.bfloat16}
    report = []
    for name in a.configs:
        spec = CONFIGS[name]
        cfg, b = spec["cfg"], spec["batch"]
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg["vocab_size"], (b, cfg["context_length"]), generator=g)
        y = torch.randint(0, cfg["vocab_size"], (b, cfg["context_length"]), generator=g)
        tokens = b * cfg["context_length"]
        flops_tok = GPT(GPTConfig(**cfg)).flops_per_token()
        default_amp, why = resolve_dtype("auto", torch.device("cpu"), cfg["emb_dim"])
        default = "bfloat16" if default_amp is not None else "float32"
        steps, dtypes, firsts = {"book GPTModel + AdamW (fp32)": reference_step(cfg, x, y)}, {}, {}
        dtypes["book GPTModel + AdamW (fp32)"] = "float32"
        for comp in {"off": [False], "on": [True], "both": [False, True]}[a.compile]:
            for dt in a.dtypes:
                label = f"llmpipe {dt} {'compiled' if comp else 'eager'}"
                t0 = time.perf_counter()
                step, _ = llmpipe_step(cfg, x, y, comp, amps[dt])
                step()  # includes compilation when compiled
                firsts[label] = time.perf_counter() - t0
                steps[label], dtypes[label] = step, dt
        secs = time_round_robin(steps, a.warmup, a.steps)
        report.append((name, b, cfg, tokens, flops_tok, default, why, secs, dtypes, firsts, x, y))
        del steps
    again = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    print("matmul peak again: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in again.items())
          + f"; load average after: {os.getloadavg()}; MFU below is against the higher of the two measurements")
    peaks = {k: max(peaks[k], again[k]) for k in peaks}
    for name, b, cfg, tokens, flops_tok, default, why, secs, dtypes, firsts, x, y in report:
        ref_s = secs["book GPTModel + AdamW (fp32)"]
        print(f"\n[{name}] batch {b} x context {cfg['context_length']} = {tokens} tokens/step, "
              f"{flops_tok / 1e6:.1f} MFLOP/token; dtype auto here: {default} ({why})")
        for label, s in secs.items():
            tps = tokens / s
            mfu = tps * flops_tok / (peaks[dtypes[label]] * 1e9)
            mark = "  <- llmpipe default" if label == f"llmpipe {default} eager" else ""
            first = f" (first step {firsts[label]:.1f}s)" if "compiled" in label else ""
            print(f"  {label + first:45s} {s * 1000:9.1f} ms/step {tps:10.1f} tokens/s  x{ref_s / s:4.2f} vs book  "
                  f"MFU {100 * mfu:5.1f}% of {dtypes[label]} peak{mark}")
        if name == "tiny":
            best = min(s for label, s in secs.items() if label.startswith("llmpipe"))
            t_share, f_share = head_share(cfg, x, y, best, a.warmup, a.steps)
            print(f"  output head + cross-entropy (fp32): {100 * t_share:.0f}% of the fastest llmpipe step's time, "
                  f"{100 * f_share:.0f}% of its FLOPs")


if __name__ == "__main__":
    main()

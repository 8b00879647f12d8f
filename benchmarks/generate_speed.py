"""Benchmark: greedy generation with the KV cache vs recomputing the whole context each step.

A 124M GPT (default: OpenAI GPT-2 small's shape, context 1024; or --checkpoint DIR with an llmpipe or
Hugging Face GPT-2 folder) continues a prompt for --new-tokens tokens (default 200) twice with
llm.generate.generate: use_cache=True (one new token per forward pass) and use_cache=False (the
book's chapter-4 loop: the whole sequence every step). It prints tokens/s of each, the speed-up,
and checks the two token sequences are identical. A random model is initialised with PyTorch's
default init (as the book's GPTModel is): its large logits make greedy ties, which rounding could
flip between the two paths, unlikely.

    python benchmarks/generate_speed.py [--new-tokens 200] [--checkpoint DIR] [--repeats 1] [--device auto|cpu|cuda]

--device auto runs on a CUDA GPU when there is one (fp32 weights; each step's .item() synchronises).

Run it on an otherwise idle machine; the load average before and after is printed with the figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# This folder holds benchmarks/tokenize.py, which would shadow the standard library's `tokenize`.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llm.generate import generate  # noqa: E402
from llm.model import GPT, GPTConfig  # noqa: E402
from llm.tokenizer import get_encoding  # noqa: E402
from llm.pretrain_rules import book_init_  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt", default="Every effort moves you")
    ap.add_argument("--checkpoint", help="llmpipe or Hugging Face GPT-2 folder (default: a random 124M GPT)")
    ap.add_argument("--repeats", type=int, default=1, help="best of N for each path")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all allowed cores)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a = ap.parse_args()
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads, load average before: {os.getloadavg()}")
    if a.checkpoint:
        from llm.weights import load_pretrained
        model = load_pretrained(a.checkpoint)
    else:
        model = GPT(GPTConfig.named("gpt2-small", drop_rate=0.0))
        book_init_(model, 123)
    model.to(device).eval()
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    ids = get_encoding().encode(a.prompt)
    print(f"model: {model.num_params():,} parameters, context {model.cfg.context_length}; prompt {len(ids)} tokens, "
          f"{a.new_tokens} new tokens, greedy")
    generate(model, ids, 5)  # warm-up
    results = {}
    for label, cache in (("KV cache", True), ("recompute", False)):
        best, out = float("inf"), None
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = generate(model, ids, a.new_tokens, eos_id=None, use_cache=cache)
            best = min(best, time.perf_counter() - t)
        results[label] = (best, out)
        print(f"  {label:10s} {best:7.2f} s  {a.new_tokens / best:7.1f} tokens/s")
    (tc, oc), (tr, orec) = results["KV cache"], results["recompute"]
    print(f"  speed-up x{tr / tc:.1f}; tokens identical: {oc == orec}")
    if oc != orec:
        first = next(i for i, (p, q) in enumerate(zip(oc, orec)) if p != q)
        print(f"  first difference at new token {first}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

"""Precision and compilation choices of a training run: which autocast dtype (`resolve_dtype`) and
whether to torch.compile (`use_compile`), with the reason recorded as run params.

    from llm.precision import resolve_dtype
    amp, why = resolve_dtype("auto", torch.device("cpu"), width=768)   # (torch.bfloat16 or None, reason)

dtype "auto" is bf16 autocast on a CUDA GPU that supports it (else fp32 with TF32 matmuls); on a CPU
it is bf16 autocast for models at least BF16_CPU_MIN_WIDTH wide when the CPU has AMX or AVX512-BF16
and a ~1 s micro-benchmark, cached per machine in ~/.cache/llmpipe/cpu-bf16.json (LLMPIPE_CACHE_DIR
moves it), shows bf16 faster, else fp32 (bf16 is ~20x slower on an AVX2-only CPU). book_compat stays
fp32. No command line: the training recipes (llm.train, benchmarks/train_speed.py) call it.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from llm.fsutil import atomic_write_text

# bf16 autocast on a CPU pays off only for matrices wide enough that the bf16 matmul saving beats
# the casts (measured on an AVX512-BF16 EPYC, 2 threads, training step vs fp32: width 64 1.03x,
# 128 1.12x, 256 1.28x, 384 1.56x, 768 1.5x). Below this width `dtype: auto` stays fp32 on every CPU,
# which also keeps the tiny preset and the tests exact and machine-independent.
BF16_CPU_MIN_WIDTH = 256
BF16_CPU_MIN_SPEEDUP = 1.2  # the micro-benchmark must show at least this gain
BF16_BENCH_VERSION = 2


def _cache_dir() -> Path:
    return Path(os.environ.get("LLMPIPE_CACHE_DIR") or Path.home() / ".cache" / "llmpipe")


def cpu_bf16_instructions() -> Optional[str]:
    """The CPU's native bf16 matmul instructions as torch sees them ("AMX", "AVX512-BF16"), "" when an
    x86 CPU has neither (bf16 is then emulated, ~20x slower than fp32), None when unknown (not x86)."""
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    avx = getattr(cpu, "_is_avx512_bf16_supported", None)
    avx2 = getattr(cpu, "_is_avx2_supported", None)
    try:
        if amx is not None and amx():
            return "AMX"
        if avx is not None and avx():
            return "AVX512-BF16"
        if avx2 is not None and avx2():
            return ""  # an x86 CPU without bf16 instructions
    except RuntimeError:  # pragma: no cover - a torch without cpuinfo
        return None
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine()


def bf16_microbench(width: int = 768, tokens: int = 1024, reps: int = 3) -> float:
    """Speed-up of bf16 autocast over fp32 for one Linear(width, 4*width) forward + backward on
    `tokens` rows, timed interleaved (so load from other processes hits both alike); ~1 s."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(width, 4 * width)
    x = torch.randn(tokens, width, generator=g, requires_grad=True)

    def run(amp: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = lin(x)
        y.float().sum().backward()
        return time.perf_counter() - t

    run(False), run(True)
    t32, t16 = [], []
    for _ in range(reps):
        t32.append(run(False))
        t16.append(run(True))
        if t16[-1] > 3 * t32[-1]:  # emulated bf16: no need to wait for more
            break
    return statistics.median(t32) / statistics.median(t16)


def bf16_cache_key(isa: Optional[str] = None) -> str:
    """This machine's entry in cpu-bf16.json: CPU model, bf16 instructions, torch version."""
    isa = cpu_bf16_instructions() if isa is None else isa
    return f"{_cpu_name()} | {isa or 'unknown ISA'} | torch {torch.__version__} | v{BF16_BENCH_VERSION}"


def cpu_bf16_fast() -> tuple[bool, str]:
    """(whether bf16 autocast is faster than fp32 on this CPU, why). x86 CPUs without AMX or
    AVX512-BF16 answer no at once; otherwise a ~1 s micro-benchmark decides, cached per machine
    (CPU model, instructions, torch version) in ~/.cache/llmpipe/cpu-bf16.json (LLMPIPE_CACHE_DIR
    moves it), so every run on one machine makes the same choice."""
    isa = cpu_bf16_instructions()
    if isa == "":
        return False, "this CPU has no AMX or AVX512-BF16 instructions (bf16 matmuls would be emulated, many times slower)"
    key, path = bf16_cache_key(isa), _cache_dir() / "cpu-bf16.json"
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("speedup"), (int, float))):
        threads = torch.get_num_threads()
        torch.set_num_threads(min(threads, 2))  # the same answer on a 2-core box and a 64-core one
        try:
            with torch.random.fork_rng(devices=[]):  # the Linear's init must not move the run's RNG
                entry = {"speedup": round(bf16_microbench(), 3), "measured": time.strftime("%Y-%m-%d")}
        finally:
            torch.set_num_threads(threads)
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
        except OSError:  # a read-only home: measure again next time
            pass
    speedup = float(entry["speedup"])
    fast = speedup >= BF16_CPU_MIN_SPEEDUP
    what = f"this CPU ({isa or 'bf16 support unknown'}) runs a bf16 Linear forward+backward {speedup:.2f}x as fast as fp32"
    return fast, f"{what} (micro-benchmark of {entry.get('measured', '?')}, cached in {path})"


def resolve_dtype(dtype: str, device: torch.device, width: Optional[int] = None,
                  book_compat: bool = False) -> tuple[Optional[torch.dtype], str]:
    """(autocast dtype, None = plain fp32; the reason) for pretrain.dtype on `device` for a model of
    emb_dim `width`. auto: fp32 for book_compat; on CUDA bf16 autocast where the GPU has it, else fp32
    with TF32 matmuls; on a CPU bf16 autocast when the model is at least BF16_CPU_MIN_WIDTH wide and
    the CPU runs bf16 fast (`cpu_bf16_fast`), else fp32."""
    if dtype == "float32":
        return None, "set in the config (dtype: float32)"
    if dtype == "bfloat16":
        return torch.bfloat16, "set in the config (dtype: bfloat16)"
    if book_compat:
        return None, "auto: book_compat replays the book's fp32 run exactly"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"auto: the GPU ({name}) supports bf16"
        return None, f"auto: the GPU ({name}) has no bf16; fp32 with TF32 matmuls where it has them"
    if width is not None and width < BF16_CPU_MIN_WIDTH:
        return None, (f"auto: on a CPU a model of width {width} < {BF16_CPU_MIN_WIDTH} gains little or nothing from bf16 "
                      "(casts cost what the matmuls save), so fp32")
    fast, why = cpu_bf16_fast()
    if fast:
        return torch.bfloat16, f"auto: {why}"
    return None, f"auto: {why}, so fp32"


def autocast_dtype(dtype: str, device: torch.device, width: Optional[int] = None,
                   book_compat: bool = False) -> Optional[torch.dtype]:
    """None = plain fp32; otherwise the autocast dtype (see `resolve_dtype`)."""
    return resolve_dtype(dtype, device, width, book_compat)[0]


COMPILE_CPU_MIN_FLOPS = 1e14  # ~15 min of training at 100 GFLOP/s: worth a minute or two of compiling


def use_compile(mode: str, device: torch.device, total_flops: float) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    # auto: always on CUDA; on CPU only when the run is long enough to repay the compile time.
    return device.type == "cuda" or total_flops >= COMPILE_CPU_MIN_FLOPS

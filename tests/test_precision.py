"""Tests of the precision and device choice in llm/train.py (`dtype: auto`), and the CUDA-marked
tests that benchmarks/gpu_check.sh runs on a GPU (bf16 autocast, torch.compile, DDP over NCCL in a
world of 1); those skip themselves on a machine without CUDA.

Run: python -m pytest -q tests/test_precision.py          (GPU part: python -m pytest -q -m cuda)
"""
import json

import pytest
import torch

from llm.precision import (BF16_CPU_MIN_WIDTH, bf16_cache_key, cpu_bf16_fast, cpu_bf16_instructions,
                           resolve_dtype)
from llm.pretrain_data import batch_loss
from llm.train import make_optimizer, run_pretrain
from llm.training import TrainingInterrupted
from test_train import TINY, shards, tiny_cfg, weights  # noqa: F401  (shards is a fixture)

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("LLMPIPE_CACHE_DIR", str(d))
    return d


def test_explicit_dtypes_and_book_compat_are_never_second_guessed(cache_dir):
    assert resolve_dtype("float32", CPU, 768) == (None, "set in the config (dtype: float32)")
    assert resolve_dtype("bfloat16", CPU, 32) == (torch.bfloat16, "set in the config (dtype: bfloat16)")
    assert resolve_dtype("auto", CPU, 768, book_compat=True) == (
        None, "auto: book_compat replays the book's fp32 run exactly")
    assert not cache_dir.exists()  # nothing was measured


def test_auto_keeps_small_models_fp32_on_every_cpu(cache_dir):
    """The tiny preset (width 64) and every test model: fp32 whatever the CPU, without measuring anything."""
    for width in (16, 64, BF16_CPU_MIN_WIDTH - 1):
        amp, why = resolve_dtype("auto", CPU, width)
        assert amp is None
        assert why.startswith(f"auto: on a CPU a model of width {width} < {BF16_CPU_MIN_WIDTH}")
    assert not cache_dir.exists()


def test_auto_on_a_wide_model_follows_the_cpus_cached_measurement(cache_dir):
    isa = cpu_bf16_instructions()
    if isa == "":  # x86 without AMX / AVX512-BF16: decided without a benchmark
        fast, why = cpu_bf16_fast()
        assert not fast and "no AMX or AVX512-BF16" in why and not cache_dir.exists()
        assert resolve_dtype("auto", CPU, 768)[0] is None
        return
    torch.manual_seed(5)
    fast, why = cpu_bf16_fast()  # measures once and caches, without moving the global RNG
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))
    entry = json.loads((cache_dir / "cpu-bf16.json").read_text())[bf16_cache_key()]
    assert fast == (entry["speedup"] >= 1.2) and f"{entry['speedup']:.2f}x" in why
    assert resolve_dtype("auto", CPU, 768) == ((torch.bfloat16 if fast else None),
                                               f"auto: {why}" + ("" if fast else ", so fp32"))
    # the cached answer decides, not a new measurement: write both verdicts and read them back
    for speedup, expect in ((0.5, None), (3.0, torch.bfloat16)):
        (cache_dir / "cpu-bf16.json").write_text(json.dumps(
            {bf16_cache_key(): {"speedup": speedup, "measured": "2026-01-01"}}))
        amp, why = resolve_dtype("auto", CPU, BF16_CPU_MIN_WIDTH)
        assert amp == expect and f"{speedup:.2f}x as fast as fp32 (micro-benchmark of 2026-01-01" in why


def test_pretrain_records_the_dtype_and_why(shards, tmp_path, cache_dir):
    res = run_pretrain(tiny_cfg(max_steps=2), shards, tmp_path / "auto", progress=False)
    assert res.params["dtype"] == "float32"
    assert res.params["dtype_reason"].startswith("auto: on a CPU a model of width 32 < ")
    res = run_pretrain(tiny_cfg(max_steps=2, dtype="bfloat16"), shards, tmp_path / "bf16", progress=False)
    assert (res.params["dtype"], res.params["dtype_reason"]) == ("bfloat16", "set in the config (dtype: bfloat16)")


def test_bf16_on_cpu_learns_like_fp32_and_resumes_exactly(shards, tmp_path):
    """bf16 autocast: the loss is computed in fp32 from the logits; the run learns as fp32 does (same
    data, same init) and a stopped bf16 run resumes to the same weights as an uninterrupted one."""
    cfg32 = tiny_cfg(dtype="float32")
    cfg16 = tiny_cfg(dtype="bfloat16")
    full32 = run_pretrain(cfg32, shards, tmp_path / "fp32", progress=False)
    full16 = run_pretrain(cfg16, shards, tmp_path / "bf16", progress=False)
    h32 = json.loads((tmp_path / "fp32" / "history.json").read_text())
    h16 = json.loads((tmp_path / "bf16" / "history.json").read_text())
    assert h32["val_loss"][0] > h32["val_loss"][-1] + 0.5 and h16["val_loss"][0] > h16["val_loss"][-1] + 0.5
    assert full16.metrics["val_loss"] == pytest.approx(full32.metrics["val_loss"], rel=0.03)
    with pytest.raises(TrainingInterrupted):
        run_pretrain(cfg16, shards, tmp_path / "cut", progress=False, stop_after=6)
    run_pretrain(cfg16, shards, tmp_path / "cut", progress=False)
    a, b = weights(tmp_path / "bf16" / "model"), weights(tmp_path / "cut" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in b.values())  # master weights stay fp32


# ------------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@needs_cuda
def test_cuda_auto_is_bf16_or_tf32():
    amp, why = resolve_dtype("auto", torch.device("cuda", 0), 64)
    if torch.cuda.is_bf16_supported():
        assert amp == torch.bfloat16 and why.startswith("auto: the GPU (") and "supports bf16" in why
    else:
        assert amp is None and "TF32" in why


@pytest.mark.cuda
@needs_cuda
def test_cuda_bf16_pretrain_learns_like_fp32(shards, tmp_path):
    base = dict(device="cuda", model={"name": None, **TINY, "drop_rate": 0.0})
    r32 = run_pretrain(tiny_cfg(dtype="float32", **base), shards, tmp_path / "fp32", progress=False)
    r16 = run_pretrain(tiny_cfg(dtype="auto", **base), shards, tmp_path / "auto", progress=False)
    assert r16.params["device"].startswith("cuda")
    assert r16.params["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert r16.metrics["val_loss"] == pytest.approx(r32.metrics["val_loss"], rel=0.03)


@pytest.mark.cuda
@needs_cuda
def test_cuda_compiled_training_matches_eager(shards, tmp_path):
    base = dict(device="cuda", dtype="auto", max_steps=8, eval_every=4)
    eager = run_pretrain(tiny_cfg(compile="off", **base), shards, tmp_path / "eager", progress=False)
    comp = run_pretrain(tiny_cfg(compile="on", **base), shards, tmp_path / "compiled", progress=False)
    assert comp.params["compile"] is True and eager.params["compile"] is False
    assert comp.metrics["val_loss"] == pytest.approx(eager.metrics["val_loss"], rel=0.02)


@pytest.mark.cuda
@needs_cuda
def test_cuda_ddp_over_nccl_in_a_world_of_one_equals_plain_training(tmp_path):
    """One DDP rank over NCCL (bf16 autocast, fused AdamW): the same weights as the plain model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from llm.model import GPT, GPTConfig

    dev = torch.device("cuda", 0)
    cfg = tiny_cfg()
    x = torch.randint(0, TINY["vocab_size"], (4, TINY["context_length"]), device=dev)
    y = torch.randint(0, TINY["vocab_size"], (4, TINY["context_length"]), device=dev)
    models = []
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for wrap in (False, True):
            torch.manual_seed(0)
            model = GPT(GPTConfig(**{**TINY, "drop_rate": 0.0})).to(dev)
            fwd = DDP(model, device_ids=[0]) if wrap else model
            opt = make_optimizer(model, cfg)
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                batch_loss(fwd, x, y, torch.bfloat16).backward()
                opt.step()
            models.append(model)
        assert dist.get_backend() == "nccl"
    finally:
        dist.destroy_process_group()
    a, b = (m.state_dict() for m in models)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

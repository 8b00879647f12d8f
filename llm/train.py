"""Pretraining stage (book chapter 5): one readable recipe from shards to a trained GPT checkpoint.

    from llm.train import run_pretrain
    result = run_pretrain(cfg.pretrain, Path("data/shards"), Path("out/pretrain"))
    result.outputs["checkpoint"]        # out/pretrain/model (model.safetensors + config.json)

    python -m llm.train --config pretrain.json --shards DIR --out DIR   # pretrain.json: a PretrainConfig

The recipe, top to bottom (`train_loop`):
  1. model: GPTConfig.named(cfg.model.name, **overrides) (or every field given), or cfg.init
     (OpenAI GPT-2 / a HF folder / an llmpipe checkpoint via llm.weights.load_pretrained);
  2. data: llm.shards.TokenWindows over the train/val shards (the book's GPTDatasetV1 windows,
     stride cfg.stride or context_length); each epoch visits the windows in a seeded permutation
     (torch.Generator), so the data position is (epoch, step within the epoch);
  3. AdamW (fused when the device has it), weight decay on 2-D weights only, linear warmup then
     cosine decay to min_lr (or constant), gradient clipping, gradient accumulation;
  4. every eval_every steps: train loss (mean over the steps since the last eval) and val loss
     (over all val windows or eval_batches batches), streamed to `log(metrics, step)`;
  5. every checkpoint_every steps and at the end: out_dir/checkpoints/step-XXXXXX/ holding
     model.safetensors + config.json + optimizer.safetensors (optimizer state, RNG states) +
     state.json (step, data position, tokens seen, loss history, python/numpy RNG). Each folder
     is written under a hidden temp name and renamed, so a killed run never leaves a partial
     checkpoint that looks complete; the last keep_checkpoints are kept. A new run in the same
     out_dir resumes from the newest checkpoint and ends exactly where an uninterrupted run would;
  6. out_dir/model (final weights), loss-vs-tokens plot (the book's figure 5.12), samples.txt.

Devices and speed: dtype "auto" (`resolve_dtype`) is bf16 autocast on a CUDA GPU that supports it
(else fp32 with TF32 matmuls); on a CPU it is bf16 autocast for models at least 256 wide when the
CPU has AMX or AVX512-BF16 and a ~1 s micro-benchmark, cached per machine in ~/.cache/llmpipe,
shows bf16 faster, else fp32 (bf16 is ~20x slower on an AVX2-only CPU). book_compat stays fp32. The
loss (cross-entropy over fp32 logits), the residual stream and the LayerNorms stay fp32 under
autocast. The choice and why are the run params `dtype` and `dtype_reason`. compile "auto" compiles on CUDA, or on CPU for
runs of at least 1e14 training FLOPs (~15 min); threads 0 uses the cores that are actually free
(affinity minus load average).

cfg.book_compat replays the book's loop exactly (PyTorch default init, decay on all parameters,
DataLoader shuffles drawn from the global RNG, the book's eval schedule), see the `verdict` preset.

Distributed data parallel: with cfg.nproc > 1, run_pretrain launches
    python -m torch.distributed.run --standalone --nproc_per_node N -m llm.train --config ... --shards ... --out ...
(gloo on CPU, nccl on GPUs). Every optimizer step consumes batch_size * grad_accum * nproc
windows: the permutation is cut into per-rank micro-batches (repeating windows when there are
fewer than one global batch), gradients are averaged, rank 0 writes checkpoints and artifacts
and streams metrics back to the parent through out_dir/.ddp_events.jsonl. Multi-node: on each
node run (out_dir and the shards on a shared filesystem)
    torchrun --nnodes 2 --node_rank R --nproc_per_node G --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 --rdzv_id JOB -m llm.train --config pretrain.json --shards DIR --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from llm.checkpoint import (atomic_write_text, list_checkpoints, optimizer_from_flat, save_checkpoint,  # noqa: F401
                            save_model)
from llm.fsutil import save_figure
from llm.precision import (BF16_CPU_MIN_WIDTH, autocast_dtype, bf16_cache_key, cpu_bf16_fast,  # noqa: F401
                           cpu_bf16_instructions, resolve_dtype, use_compile)
from llm.training import (STATE_VERSION, TrainingInterrupted, make_adamw, param_groups, pick_device,  # noqa: F401
                          restore_rng, rng_state_json, rng_state_tensors)
from llm.config import PretrainConfig
from llm.model import GPT, GPTConfig
from llm.result import MetricLogger, StageResult, log_or_null



# --------------------------------------------------------------------------------------------
# Environment: processes, device, threads, precision
# --------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def free_cores(nproc: int = 1) -> int:
    """Cores this process may use: allowed cores minus the load others put on them, shared by nproc."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, (cores - int(load)) // max(1, nproc))


# --------------------------------------------------------------------------------------------
# Model and optimizer
# --------------------------------------------------------------------------------------------

def model_config(cfg: PretrainConfig) -> GPTConfig:
    """GPTConfig from the pretrain section: a named base plus overrides, or every field given."""
    fields = cfg.model.model_dump(exclude={"name"}, exclude_none=True)
    if cfg.model.name:
        return GPTConfig.named(cfg.model.name, **fields)
    needed = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    missing = [f for f in needed if f not in fields]
    if missing:
        raise ValueError(f"pretrain.model: without a name, set {', '.join('pretrain.model.' + m for m in missing)}")
    return GPTConfig(**fields)


def book_init_(model: GPT, seed: int) -> None:
    """Re-initialise `model` exactly as the book's GPTModel is after torch.manual_seed(seed):
    PyTorch's default init (Embedding ~ N(0, 1), Linear kaiming-uniform), drawn in the book's
    module order (W_query, W_key, W_value, out_proj, then the two feed-forward Linears, per block)."""
    torch.manual_seed(seed)

    def linear(out_f: int, in_f: int, bias: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        w = torch.empty(out_f, in_f)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        b = None
        if bias:
            bound = 1 / math.sqrt(in_f)
            b = torch.empty(out_f)
            nn.init.uniform_(b, -bound, bound)
        return w, b

    c = model.cfg
    d = c.emb_dim
    with torch.no_grad():
        model.tok_emb.weight.copy_(torch.empty(c.vocab_size, d).normal_(0, 1))
        model.pos_emb.weight.copy_(torch.empty(c.context_length, d).normal_(0, 1))
        for blk in model.trf_blocks:
            qkv = [linear(d, d, c.qkv_bias) for _ in range(3)]  # W_query, W_key, W_value
            blk.att.qkv.weight.copy_(torch.cat([w for w, _ in qkv]))
            if c.qkv_bias:
                blk.att.qkv.bias.copy_(torch.cat([b for _, b in qkv]))
            for lin, (i, o) in ((blk.att.out_proj, (d, d)), (blk.ff.fc1, (d, 4 * d)), (blk.ff.fc2, (4 * d, d))):
                w, b = linear(o, i, True)
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            for ln in (blk.norm1, blk.norm2):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
        model.final_norm.weight.fill_(1.0)
        model.final_norm.bias.zero_()
        if not c.tie_weights:
            model.out_head.weight.copy_(linear(c.vocab_size, d, False)[0])


def build_model(cfg: PretrainConfig) -> GPT:
    torch.manual_seed(cfg.seed)
    if cfg.init:
        from llm.weights import load_pretrained

        model = load_pretrained(cfg.init, drop_rate=cfg.model.drop_rate or 0.0,
                                context_length=cfg.model.context_length)
        return model.train()
    model = GPT(model_config(cfg))
    if cfg.book_compat:
        book_init_(model, cfg.seed)
    return model


def make_optimizer(model: nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with cfg's lr and betas, weight decay on matrices (book_compat: on every parameter)."""
    return make_adamw(model, cfg.lr, cfg.weight_decay, betas=tuple(cfg.betas), eps=1e-8,
                      decay_all=cfg.book_compat, foreach=True)


def lr_at(step: int, cfg: PretrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine to min_lr.
    Warmup: lr * (step + 1) / warmup_steps; with cfg.book_compat the book's appendix D instead,
    initial_lr + step * (lr - initial_lr) / warmup_steps (reaching lr at the first step after warmup)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        if cfg.book_compat:
            return cfg.initial_lr + step * (cfg.lr - cfg.initial_lr) / cfg.warmup_steps
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_windows(shard_dir: Path, split: str, context_length: int, stride: int):
    from llm.shards import TokenWindows

    return TokenWindows.from_shards(Path(shard_dir), split, context_length, stride)


def draw_seed() -> int:
    """A seed drawn from the global torch RNG, as torch's DataLoader/RandomSampler draw theirs."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class DataOrder:
    """Which windows each rank's micro-batch holds at (epoch, step within the epoch).

    Each epoch is one permutation of the n train windows; optimizer step s of the epoch takes
    permutation positions [s*G, (s+1)*G) with G = batch_size * grad_accum * world, micro-batch m
    of rank r the slice starting at (m*world + r) * batch_size. An epoch has n // G steps (the
    book's drop_last) and at least one: with fewer than G windows the permutation repeats.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, world: int):
        self.n, self.b, self.accum, self.world = n, batch_size, grad_accum, world
        self.global_batch = batch_size * grad_accum * world
        self.steps_per_epoch = max(1, n // self.global_batch)

    def permutation(self, perm_seed: int) -> torch.Tensor:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(perm_seed))
        need = self.steps_per_epoch * self.global_batch
        if need > self.n:
            perm = perm.repeat(math.ceil(need / self.n))[:need]
        return perm

    def micro_batch(self, perm: torch.Tensor, epoch_step: int, micro: int, rank: int) -> list[int]:
        start = epoch_step * self.global_batch + (micro * self.world + rank) * self.b
        return perm[start:start + self.b].tolist()


def collate(ds, indices: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in indices))
    return torch.stack(xs).to(device, non_blocking=True), torch.stack(ys).to(device, non_blocking=True)


def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: Optional[torch.dtype]) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch (the book's calc_loss_batch)."""
    with torch.autocast(device_type=x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def loss_sums(model: nn.Module, ds, indices: list[int], batch_size: int, device: torch.device,
              amp: Optional[torch.dtype] = None) -> tuple[float, int]:
    """(sum of token losses, token count) over the windows `indices`, in batches."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(indices), batch_size):
            x, y = collate(ds, indices[i:i + batch_size], device)
            total += float(batch_loss(model, x, y, amp)) * y.numel()
            count += y.numel()
    finally:
        model.train(was)
    return total, count


def all_reduce_sums(values: list[float], d: Dist, device: torch.device) -> list[float]:
    if not d.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# Checkpoints (no pickles: tensors in safetensors, scalars in JSON)
# --------------------------------------------------------------------------------------------

def resume_finetune(ckpt_root: Path, identity: dict, model: nn.Module, opt: torch.optim.Optimizer,
                    device: torch.device, stage: str) -> Optional[dict]:
    """For the finetune stages (spam, instruct): drop temp folders of a killed save, then load the
    newest complete checkpoint in ckpt_root into model, optimizer and RNGs and return its state
    (None when there is none). A checkpoint whose state["identity"] differs is a ValueError."""
    from llm.checkpoint import load_weights_into

    for stale in ckpt_root.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    ckpts = list_checkpoints(ckpt_root)
    if not ckpts:
        return None
    latest = ckpts[-1]
    state = json.loads((latest / "state.json").read_text())
    if state.get("identity") != identity:
        raise ValueError(f"{latest / 'state.json'}: this checkpoint was made with a different {stage} config, "
                         "data or base model; use a new output folder (or delete its checkpoints/) to start over")
    load_weights_into(model, load_file(str(latest / "model.safetensors"), device=str(device)), latest)
    tensors = load_file(str(latest / "optimizer.safetensors"))
    optimizer_from_flat(opt, tensors, state["optimizer_param_groups"])
    restore_rng(state["rng"], tensors, device)
    return state


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------

def plot_losses(history: dict, steps_per_epoch: int, path: Path) -> Path:
    """Train and val loss against epochs, with a tokens-seen top axis (the book's figure 5.12)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [s / steps_per_epoch for s in history["step"]]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(epochs, history["train_loss"], label="Training loss")
    val = [(e, v) for e, v in zip(epochs, history["val_loss"]) if v is not None]
    if val:
        ax1.plot(*zip(*val), linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()
    ax2.plot(history["tokens_seen"], history["train_loss"], alpha=0)  # invisible: aligns the top axis
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def sample_text(model: GPT, prompt: str, max_new_tokens: int = 50) -> str:
    """Greedy continuation of `prompt` (the book's generate_and_print_sample)."""
    from llm.generate import generate
    from llm.tokenizer import get_encoding

    enc = get_encoding()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
    return prompt + enc.decode(generate(model, ids, max_new_tokens, eos_id=None))


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------

class Events:
    """Where metrics and checkpoint notices go: the caller's callbacks, or (DDP rank 0) a JSONL file
    the launching process tails."""

    def __init__(self, log: Optional[MetricLogger], on_checkpoint: Optional[Callable[[Path, int], None]],
                 file: Optional[Path] = None):
        self.log_fn, self.ckpt_fn, self.file = log_or_null(log), on_checkpoint, file

    def _write(self, obj: dict) -> None:
        with open(self.file, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def log(self, metrics: dict, step: int) -> None:
        if self.file:
            self._write({"log": metrics, "step": step})
        else:
            self.log_fn(metrics, step)

    def checkpoint(self, path: Path, step: int) -> None:
        if self.file:
            self._write({"checkpoint": str(path), "step": step})
        elif self.ckpt_fn is not None:
            self.ckpt_fn(path, step)


def train_loop(cfg: PretrainConfig, shard_dir: Path, out_dir: Path, progress: bool = True,
               events: Optional[Events] = None, d: Optional[Dist] = None,
               stop_after: Optional[int] = None) -> dict:
    """Train (or resume) in this process; returns the run summary (rank 0's is authoritative)."""
    from tqdm import tqdm

    d = d or Dist()
    events = events or Events(None, None)
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    device = pick_device(cfg.device, d.local_rank, "pretrain.device")
    torch.set_num_threads(cfg.threads or free_cores(d.world if device.type == "cpu" else 1))
    if cfg.book_compat and d.active:
        raise ValueError("pretrain.book_compat replays the book's single-process loop; set pretrain.nproc: 1")

    # 1. seeds and model (the book seeds right before building the model)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg).to(device)
    mcfg = model.cfg
    ctx = mcfg.context_length
    stride = cfg.stride or ctx

    # 2. data
    train_ds = load_windows(shard_dir, "train", ctx, stride)
    val_ds = load_windows(shard_dir, "val", ctx, ctx)  # every val token scored once
    if len(train_ds) == 0:
        n = len(getattr(train_ds, "tokens", []))
        raise ValueError(f"{shard_dir}: the train split has {n} tokens, shorter than context_length+1 = {ctx + 1}; "
                         "use more text or a smaller pretrain.model.context_length")
    for split, ds in (("train", train_ds), ("val", val_ds)):
        top = int(ds.tokens.max()) if len(getattr(ds, "tokens", [])) else -1
        if top >= mcfg.vocab_size:
            raise ValueError(f"{shard_dir}: {split} token id {top} is outside the model's vocabulary "
                             f"(pretrain.model.vocab_size = {mcfg.vocab_size})")
    val_note = None
    if len(val_ds) == 0:
        n = len(getattr(val_ds, "tokens", []))
        val_note = f"skipped: the val split has {n} tokens, fewer than context_length+1 = {ctx + 1}"
        if d.main:
            warnings.warn(f"{shard_dir}: validation {val_note}", stacklevel=2)
    order = DataOrder(len(train_ds), cfg.batch_size, cfg.grad_accum, d.world)
    total_steps = cfg.epochs * order.steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    tokens_per_step = order.global_batch * ctx
    eval_windows = len(val_ds) if cfg.eval_batches is None else min(len(val_ds), cfg.eval_batches * cfg.batch_size)

    # 3. optimizer, precision, compilation, DDP
    opt = make_optimizer(model, cfg, device)
    amp, amp_reason = resolve_dtype(cfg.dtype, device, mcfg.emb_dim, cfg.book_compat)
    if d.active and cfg.dtype == "auto":  # every rank must compute alike: bf16 only if all ranks chose it
        flag = torch.tensor([1.0 if amp is not None else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if amp is not None and flag.item() == 0.0:
            amp, amp_reason = None, amp_reason + "; but another DDP rank chose fp32, so fp32"
    compiled = use_compile(cfg.compile, device, total_steps * tokens_per_step * model.flops_per_token())
    if device.type == "cuda" and cfg.dtype == "auto":  # TF32 matmuls; an explicit float32 stays exact fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fwd: nn.Module = model
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        fwd = torch.compile(fwd)

    # resume from the newest complete checkpoint
    step, epoch, epoch_step, tokens_seen, train_time = 0, 0, 0, 0, 0.0
    history = {"step": [], "tokens_seen": [], "train_loss": [], "val_loss": [], "lr": []}
    samples: list[str] = []
    run_sum, run_n = 0.0, 0  # training loss since the last eval
    perm_seed: Optional[int] = None
    resumed_from = None
    if d.main:
        for stale in ckpt_root.glob(".step-*"):  # temp folders of a killed save
            shutil.rmtree(stale, ignore_errors=True)
    ckpts = list_checkpoints(ckpt_root)
    if ckpts:
        latest = ckpts[-1]
        state = json.loads((latest / "state.json").read_text())
        if state.get("model_config") != mcfg.to_dict():
            raise ValueError(f"{latest / 'state.json'}: checkpoint model config {state.get('model_config')} differs "
                             f"from this run's {mcfg.to_dict()}; use a new output folder or the same config")
        if state.get("global_batch") != order.global_batch or state.get("train_windows") != len(train_ds):
            raise ValueError(f"{latest / 'state.json'}: checkpoint was made with global batch "
                             f"{state.get('global_batch')} over {state.get('train_windows')} windows, this run has "
                             f"{order.global_batch} over {len(train_ds)}; resume with the same data and "
                             "batch_size * grad_accum * nproc")
        weights = load_file(str(latest / "model.safetensors"), device=str(device))
        if mcfg.tie_weights and "out_head.weight" not in weights:
            weights["out_head.weight"] = weights["tok_emb.weight"]
        model.load_state_dict(weights)
        tensors = load_file(str(latest / "optimizer.safetensors"))
        optimizer_from_flat(opt, tensors, state["optimizer_param_groups"])
        restore_rng(state["rng"], tensors, device)
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        tokens_seen, train_time = state["tokens_seen"], state["train_time"]
        history, samples = state["history"], state["samples"]
        run_sum, run_n, perm_seed = state["run_loss_sum"], state["run_loss_count"], state["perm_seed"]
        resumed_from = step

    def evaluate_now() -> tuple[Optional[float], Optional[float]]:
        """(train_loss, val_loss) at an eval point, averaged over ranks."""
        nonlocal run_sum, run_n
        if cfg.book_compat:  # the book re-measures train loss on eval_batches batches of a fresh shuffle
            draw_seed()  # DataLoader iterator base seed
            perm = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(draw_seed()))
            full = len(train_ds) // cfg.batch_size  # len(train_loader) with drop_last=True
            nb = min(cfg.eval_batches or full, full)
            s, c = loss_sums(model, train_ds, perm[: nb * cfg.batch_size].tolist(), cfg.batch_size, device, amp)
            tr = s / c if c else None
        else:
            s, c = all_reduce_sums([run_sum, float(run_n)], d, device)
            tr = s / c if c else None
        run_sum, run_n = 0.0, 0
        va = None
        if eval_windows:
            if cfg.book_compat:
                draw_seed()  # the val DataLoader's iterator draws a base seed too
            idx = list(range(eval_windows))[d.rank::d.world]
            s, c = all_reduce_sums(list(loss_sums(model, val_ds, idx, cfg.batch_size, device, amp)), d, device)
            va = s / c
        return tr, va

    def save(step_now: int) -> None:
        state = {
            "version": STATE_VERSION, "step": step_now, "epoch": epoch, "epoch_step": epoch_step,
            "perm_seed": perm_seed, "tokens_seen": tokens_seen, "train_time": train_time,
            "history": history, "samples": samples, "run_loss_sum": run_sum, "run_loss_count": run_n,
            "global_batch": order.global_batch, "train_windows": len(train_ds), "world_size": d.world,
            "model_config": mcfg.to_dict(), "pretrain_config": cfg.model_dump(mode="json"), "rng": rng_state_json(),
        }
        if d.main:
            path = save_checkpoint(ckpt_root, step_now, model, opt, state, rng_state_tensors(device), cfg.keep_checkpoints)
            events.checkpoint(path, step_now)
        if d.active:
            torch.distributed.barrier()

    # 4. the loop
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not (progress and d.main))
    t_seg, tok_seg = 0.0, 0
    perm = None
    model.train()
    while step < total_steps:
        if perm is None or epoch_step >= order.steps_per_epoch:
            if epoch_step >= order.steps_per_epoch:  # the previous epoch is complete
                epoch, epoch_step, perm_seed = epoch + 1, 0, None
            if perm_seed is None:
                if cfg.book_compat:
                    draw_seed()  # DataLoader iterator base seed, then RandomSampler's seed
                    perm_seed = draw_seed()
                else:
                    perm_seed = cfg.seed * 100_003 + epoch
            perm = order.permutation(perm_seed)

        t0 = time.perf_counter()
        lr = lr_at(step, cfg, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            x, y = collate(train_ds, order.micro_batch(perm, epoch_step, micro, d.rank), device)
            sync = contextlib.nullcontext()
            if d.active and micro < cfg.grad_accum - 1:
                sync = fwd.no_sync() if hasattr(fwd, "no_sync") else getattr(fwd, "_orig_mod", fwd).no_sync()
            with sync:
                loss = batch_loss(fwd, x, y, amp)
                (loss / cfg.grad_accum).backward()
            run_sum += float(loss.detach()) if device.type == "cpu" else loss.detach()
            run_n += 1
        if cfg.grad_clip is not None and not (cfg.book_compat and step < cfg.warmup_steps):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # book: only after warmup (app. D)
        opt.step()
        step += 1
        epoch_step += 1
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        train_time += dt
        t_seg += dt
        tok_seg += tokens_per_step
        bar.update(1)
        if progress and d.main and (device.type == "cpu" or step % 10 == 0):  # .item() syncs a GPU: not every step
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_seg / t_seg:,.0f}",
                            refresh=False)

        is_eval = ((step - 1) % cfg.eval_every == 0) if cfg.book_compat else (step % cfg.eval_every == 0 or step == total_steps)
        if is_eval:
            if device.type == "cuda":
                torch.cuda.synchronize()
            run_sum = float(run_sum)
            tr, va = evaluate_now()
            tps = tok_seg / t_seg if t_seg > 0 else 0.0
            history["step"].append(step)
            history["tokens_seen"].append(tokens_seen)
            history["train_loss"].append(tr)
            history["val_loss"].append(va)
            history["lr"].append(lr)
            metrics = {"train_loss": tr, "tokens_seen": tokens_seen, "lr": lr, "tokens_per_sec": tps}
            if va is not None:
                metrics["val_loss"] = va
            if d.main:
                events.log({k: v for k, v in metrics.items() if v is not None}, step)
                if progress:
                    bar.write(f"step {step}/{total_steps}: train loss {tr if tr is None else round(tr, 3)}, "
                              f"val loss {va if va is None else round(va, 3)}, lr {lr:.2e}, {tps:,.0f} tokens/s")
            t_seg, tok_seg = 0.0, 0
        if epoch_step >= order.steps_per_epoch and d.main:  # the book prints a sample after each epoch
            samples.append(f"epoch {epoch + 1} (step {step}): " + sample_text(model, cfg.sample_prompt).replace("\n", " "))
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            run_sum = float(run_sum)
            save(step)
        if stop_after is not None and step >= stop_after and step < total_steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {step} (test hook)")
    bar.close()

    # 5. final artifacts (rank 0)
    summary: dict = {}
    if d.main:
        params_total = model.num_params()
        final = {"train_loss": history["train_loss"][-1] if history["train_loss"] else None,
                 "val_loss": next((v for v in reversed(history["val_loss"]) if v is not None), None),
                 "tokens_seen": tokens_seen,
                 "tokens_per_sec": tokens_seen / train_time if train_time > 0 else 0.0,
                 "params_total": params_total, "params_trainable": model.num_params(trainable_only=True),
                 "steps": step}
        if not samples or not samples[-1].startswith(f"epoch {epoch + 1} (step {step})"):
            samples.append(f"final (step {step}): " + sample_text(model, cfg.sample_prompt).replace("\n", " "))
        model_dir = save_model(model, out_dir / "model", extra={
            "tokenizer": "gpt2", "stage": "pretrain", "steps": step, "tokens_seen": tokens_seen,
            "train_loss": final["train_loss"], "val_loss": final["val_loss"]})
        artifacts = []
        if history["step"]:
            artifacts.append(plot_losses(history, order.steps_per_epoch, out_dir / "loss.png"))
        atomic_write_text(out_dir / "samples.txt", "\n\n".join(samples) + "\n")
        atomic_write_text(out_dir / "history.json", json.dumps(history, indent=1))
        artifacts += [out_dir / "samples.txt", out_dir / "history.json"]
        summary = {
            "metrics": {k: float(v) for k, v in final.items() if v is not None},
            "params": {"device": str(device), "dtype": str(amp or torch.float32).replace("torch.", ""),
                       "dtype_reason": amp_reason,
                       "compile": compiled, "threads": torch.get_num_threads(), "world_size": d.world,
                       "train_windows": len(train_ds), "val_windows": len(val_ds), "steps_per_epoch": order.steps_per_epoch,
                       "total_steps": total_steps, "global_batch": order.global_batch,
                       "resumed_from_step": resumed_from, **({"val": val_note} if val_note else {})},
            "artifacts": [str(a) for a in artifacts],
            "outputs": {"checkpoint": str(model_dir)},
        }
    if d.active:
        torch.distributed.barrier()
    return summary


def _summary_to_result(summary: dict) -> StageResult:
    return StageResult(metrics=summary["metrics"], params=summary["params"],
                       artifacts=[Path(a) for a in summary["artifacts"]],
                       outputs={k: Path(v) for k, v in summary["outputs"].items()})


def _check_data(cfg: PretrainConfig, shard_dir: Path) -> None:
    """Fail in the launching process (not inside torchrun) on data too short to train on."""
    if cfg.init:
        return  # the context length is only known once the weights are read; train_loop checks
    ctx = model_config(cfg).context_length
    ds = load_windows(shard_dir, "train", ctx, cfg.stride or ctx)
    if len(ds) == 0:
        n = len(getattr(ds, "tokens", []))
        raise ValueError(f"{shard_dir}: the train split has {n} tokens, shorter than context_length+1 = {ctx + 1}; "
                         "use more text or a smaller pretrain.model.context_length")


def run_pretrain(cfg: PretrainConfig, shard_dir: Path, out_dir: Path, progress: bool = True,
                 log: Optional[MetricLogger] = None, on_checkpoint: Optional[Callable[[Path, int], None]] = None,
                 stop_after: Optional[int] = None) -> StageResult:
    """The pretrain stage: train a GPT on the shards, resuming from out_dir/checkpoints if present.

    `stop_after` (tests) raises TrainingInterrupted after that optimizer step, as a kill would."""
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.nproc > 1:
        _check_data(cfg, shard_dir)
        return _launch_ddp(cfg, shard_dir, out_dir, progress, Events(log, on_checkpoint), stop_after)
    threads = torch.get_num_threads()
    try:
        return _summary_to_result(train_loop(cfg, shard_dir, out_dir, progress, Events(log, on_checkpoint),
                                             stop_after=stop_after))
    finally:
        torch.set_num_threads(threads)  # the caller's setting, not ours, once the stage is done


def _launch_ddp(cfg: PretrainConfig, shard_dir: Path, out_dir: Path, progress: bool, events: Events,
                stop_after: Optional[int]) -> StageResult:
    """Run train_loop in cfg.nproc torchrun processes; relay rank 0's events; return its summary."""
    ddp_dir = out_dir / ".ddp"
    ddp_dir.mkdir(exist_ok=True)
    cfg_file, events_file, result_file = ddp_dir / "config.json", ddp_dir / "events.jsonl", ddp_dir / "result.json"
    atomic_write_text(cfg_file, cfg.model_dump_json())
    for f in (events_file, result_file):
        f.unlink(missing_ok=True)
    events_file.touch()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
           "-m", "llm.train", "--config", str(cfg_file), "--shards", str(shard_dir), "--out", str(out_dir),
           "--events", str(events_file), "--result", str(result_file)]
    if not progress:
        cmd.append("--no-progress")
    if stop_after is not None:
        cmd += ["--stop-after", str(stop_after)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if (cfg.device == "cpu" or not torch.cuda.is_available()) and not cfg.threads:
        env["OMP_NUM_THREADS"] = str(free_cores(cfg.nproc))
    if cfg.dtype == "auto" and not cfg.init and (cfg.device == "cpu" or not torch.cuda.is_available()) \
            and model_config(cfg).emb_dim >= BF16_CPU_MIN_WIDTH:
        cpu_bf16_fast()  # measure once here, so every rank reads the same cached answer
    proc = subprocess.Popen(cmd, env=env)
    offset = 0

    def relay() -> None:
        nonlocal offset
        with open(events_file) as f:
            f.seek(offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break
                offset += len(line.encode())
                ev = json.loads(line)
                if "log" in ev:
                    events.log(ev["log"], ev["step"])
                else:
                    events.checkpoint(Path(ev["checkpoint"]), ev["step"])

    try:
        while proc.poll() is None:
            time.sleep(0.5)
            relay()
        relay()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if proc.returncode != 0:
        if stop_after is not None and not result_file.exists():
            raise TrainingInterrupted(f"DDP run stopped after step {stop_after} (test hook)")
        raise RuntimeError(f"DDP pretraining ({cfg.nproc} processes) failed with exit code {proc.returncode}; "
                           "see the output above")
    return _summary_to_result(json.loads(result_file.read_text()))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="JSON or YAML file holding a PretrainConfig")
    p.add_argument("--shards", required=True, help="shard folder (the shard stage's output)")
    p.add_argument("--out", required=True, help="output folder (checkpoints/, model/, plots)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--events", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import yaml

    path = Path(a.config)
    if not path.exists():
        raise SystemExit(f"{path}: config file not found")
    raw = yaml.safe_load(path.read_text())
    cfg = PretrainConfig.model_validate(raw.get("pretrain", raw) if isinstance(raw, dict) else raw)
    d = init_distributed(cfg.device)
    if not d.active and cfg.nproc > 1 and not a.events:
        res = run_pretrain(cfg, Path(a.shards), Path(a.out), progress=not a.no_progress)
        print(json.dumps(res.metrics))
        return 0
    try:
        events = Events(None, None, Path(a.events) if (a.events and d.main) else None)
        summary = train_loop(cfg, Path(a.shards), Path(a.out), not a.no_progress, events, d, a.stop_after)
        if d.main:
            if a.result:
                atomic_write_text(Path(a.result), json.dumps(summary))
            else:
                print(json.dumps(summary["metrics"]))
    finally:
        if d.active:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# TEMPORARY (issue 12): names llm.spam, llm.instruct, llm.dpo still import from here; they move to
# llm.training in those recipes' branches, and this block goes at the merge.
_rng_json, _rng_tensors = rng_state_json, rng_state_tensors

"""The pretrain recipe's data (llm.train): token windows from the shards, checked against the model,
the order an epoch visits them in per rank and micro-batch, batches and their loss.

    from llm.pretrain_data import DataOrder, load_windows, loss_sums
    ds = load_windows(Path("data/shards"), "val", context_length=256, stride=256)
    total, count = loss_sums(model, ds, list(range(len(ds))), batch_size=8, device=torch.device("cpu"))

No command line: llm.train (and llm.evaluate's loss) use it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.config import PretrainConfig
from llm.ddp import Dist
from llm.model import GPTConfig
from llm.shards import TokenWindows


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


def load_windows(shard_dir: Path, split: str, context_length: int, stride: int) -> TokenWindows:
    return TokenWindows.from_shards(Path(shard_dir), split, context_length, stride)


def check_train_windows(ds: TokenWindows, shard_dir: Path, ctx: int) -> None:
    if len(ds) == 0:
        n = len(getattr(ds, "tokens", []))
        raise ValueError(f"{shard_dir}: the train split has {n} tokens, shorter than context_length+1 = {ctx + 1}; "
                         "use more text or a smaller pretrain.model.context_length")


@dataclass
class Data:
    train: TokenWindows
    val: TokenWindows
    order: "DataOrder"
    eval_windows: int            # val windows scored at each eval
    val_note: Optional[str]      # why validation is skipped, if it is


def load_data(cfg: PretrainConfig, shard_dir: Path, mcfg: GPTConfig, d: Dist) -> Data:
    """The train windows (stride cfg.stride), the val windows (every val token scored once), checked
    against the model, and the order the train windows are visited in."""
    ctx = mcfg.context_length
    train_ds = load_windows(shard_dir, "train", ctx, cfg.stride or ctx)
    val_ds = load_windows(shard_dir, "val", ctx, ctx)
    check_train_windows(train_ds, shard_dir, ctx)
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
            warnings.warn(f"{shard_dir}: validation {val_note}", stacklevel=4)
    eval_windows = len(val_ds) if cfg.eval_batches is None else min(len(val_ds), cfg.eval_batches * cfg.batch_size)
    order = DataOrder(len(train_ds), cfg.batch_size, cfg.grad_accum, d.world)
    return Data(train_ds, val_ds, order, eval_windows, val_note)

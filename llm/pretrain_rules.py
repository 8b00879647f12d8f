"""The pretrain loop's rules (llm.train): how an epoch is seeded, when the loop evaluates and clips
gradients, how it measures the train loss (`Rules`), and the book's chapter-5 loop replayed exactly
for pretrain.book_compat (`BookReplay`, `book_init_`, `draw_seed`).

    from llm.pretrain_rules import BookReplay, Rules
    rules = BookReplay(cfg) if cfg.book_compat else Rules(cfg)

The book's loop differs from ours in: PyTorch's default init drawn in the book's module order
(`book_init_`), DataLoader-style shuffles drawn from the global torch RNG (`draw_seed`), eval after
optimizer steps 1, 1 + eval_every, ... with the train loss re-measured on eval_batches batches,
gradient clipping only after the warmup; and, outside this module, weight decay on every parameter
(llm.train.make_optimizer), appendix D's warmup from initial_lr (llm.train.lr_at) and fp32
(llm.precision.resolve_dtype). No command line: llm.train uses it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from llm import ddp
from llm.config import PretrainConfig
from llm.model import GPT
from llm.pretrain_data import loss_sums
from llm.training import TrainState

if TYPE_CHECKING:  # the recipe's run; llm.train imports this module
    from llm.train import Run


class Rules:
    """How this recipe seeds epochs, when it evaluates and clips, how it measures the train loss."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def epoch_seed(self, epoch: int) -> int:
        return self.cfg.seed * 100_003 + epoch

    def is_eval(self, step: int, total_steps: int) -> bool:
        """After optimizer step `step` (1-based count of steps done)."""
        return step % self.cfg.eval_every == 0 or step == total_steps

    def clip(self, step: int) -> bool:
        return self.cfg.grad_clip is not None

    def train_loss(self, run: Run, st: TrainState) -> Optional[float]:
        """Mean loss of the micro-batches since the last eval, over every rank."""
        s, c = ddp.all_reduce_sums([float(st.sums["loss"]), float(st.sums["count"])], run.d, run.device)
        return s / c if c else None

    def before_val(self) -> None:
        pass


class BookReplay(Rules):
    """The book's chapter-5 loop (with appendix D), replayed exactly with cfg.book_compat. Besides these
    rules: PyTorch's default init drawn in the book's module order (`book_init_`), weight decay on
    every parameter (`make_optimizer`), appendix D's warmup from initial_lr (`lr_at`), fp32 (`resolve_dtype`)."""

    def epoch_seed(self, epoch: int) -> int:
        draw_seed()  # the DataLoader iterator's base seed, then RandomSampler's seed
        return draw_seed()

    def is_eval(self, step: int, total_steps: int) -> bool:
        return (step - 1) % self.cfg.eval_every == 0  # after optimizer steps 1, 1 + eval_every, ...

    def clip(self, step: int) -> bool:
        return self.cfg.grad_clip is not None and step >= self.cfg.warmup_steps  # only after warmup (app. D)

    def train_loss(self, run: Run, st: TrainState) -> Optional[float]:
        """Re-measured on eval_batches batches of a fresh shuffle, as the book's calc_loss_loader does."""
        cfg, ds = self.cfg, run.data.train
        draw_seed()  # DataLoader iterator base seed
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(draw_seed()))
        full = len(ds) // cfg.batch_size  # len(train_loader) with drop_last=True
        nb = min(cfg.eval_batches or full, full)
        s, c = loss_sums(run.model, ds, perm[: nb * cfg.batch_size].tolist(), cfg.batch_size, run.device, run.amp)
        return s / c if c else None

    def before_val(self) -> None:
        draw_seed()  # the val DataLoader's iterator draws a base seed too


def draw_seed() -> int:
    """A seed drawn from the global torch RNG, as torch's DataLoader/RandomSampler draw theirs."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


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

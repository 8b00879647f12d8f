"""Low-rank adaptation (LoRA, the book's appendix E) for the GPT model's Linear layers.

    from llm.lora import apply_lora, merge_lora
    apply_lora(model, rank=16, alpha=16, targets=["att", "ff", "out_head"])  # base weights frozen
    ... train: only the A/B matrices (and anything you unfreeze yourself) get gradients ...
    merge_lora(model)          # folds B@A*scale into each base weight; plain nn.Linear again

A `LoRALinear` wraps an `nn.Linear` and adds ``scaling * (x @ A @ B)`` to its output, with
A (in_features, rank) initialised kaiming-uniform exactly as the book does and B (rank,
out_features) zeros, so a freshly wrapped model computes exactly what it did before.
``scaling = alpha / rank`` (the LoRA paper's convention; the book multiplies by alpha alone).

Book mode (``apply_lora(..., book=True)``, from a recipe's ``book_compat: true``) replays appendix E:
scaling is ``alpha`` itself, and the fused attention projection ``qkv`` gets three adapters, one per
Q, K and V slice of its output (the book's separate W_query, W_key, W_value LinearWithLoRA layers):
``qkv(x) + alpha * concat(x A_q B_q, x A_k B_k, x A_v B_v)``. On GPT-2 124M with a 2-class head at
rank 16 that is the book's 2,666,528 trainable parameters (one fused adapter: 2,371,616).

Targets name modules by the components of their dotted names in llm.model.GPT:
``att`` (both attention projections ``qkv`` and ``out_proj``; ``attn`` is accepted as an
alias), ``qkv``, ``out_proj``, ``ff`` (``fc1`` and ``fc2``), ``fc1``, ``fc2``, ``out_head``, or
any full dotted module name (``trf_blocks.11.att.qkv``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
import torch.nn as nn

ALIASES = {"attn": "att"}


class LoRALinear(nn.Module):
    """``linear(x) + scaling * (x @ A @ B)`` with the wrapped Linear frozen; scaling = alpha / rank, or alpha
    when book. With parts > 1 the output is cut into that many equal slices, each with its own adapter
    (A: (parts, in, rank), B: (parts, rank, out / parts)), as the book's separate Q, K, V layers."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, book: bool = False, parts: int = 1):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(linear).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if parts < 1 or linear.out_features % parts:
            raise ValueError(f"LoRA parts={parts} must divide out_features={linear.out_features}")
        self.linear = linear
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.parts = int(parts)
        self.scaling = self.alpha if book else self.alpha / self.rank
        w = linear.weight
        kw = dict(dtype=w.dtype, device=w.device)
        if parts == 1:
            self.A = nn.Parameter(torch.empty(linear.in_features, self.rank, **kw))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as in the book's LoRALayer
            self.B = nn.Parameter(torch.zeros(self.rank, linear.out_features, **kw))
        else:
            self.A = nn.Parameter(torch.empty(parts, linear.in_features, self.rank, **kw))
            with torch.no_grad():
                for i in range(parts):  # each slice initialised as one book LoRALayer's A
                    nn.init.kaiming_uniform_(self.A[i], a=math.sqrt(5))
            self.B = nn.Parameter(torch.zeros(parts, self.rank, linear.out_features // parts, **kw))
        for p in self.linear.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:  # so code reading `.weight.shape` keeps working
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts == 1:
            return self.linear(x) + self.scaling * ((x @ self.A) @ self.B)
        delta = torch.cat([(x @ self.A[i]) @ self.B[i] for i in range(self.parts)], dim=-1)
        return self.linear(x) + self.scaling * delta

    def delta_weight(self) -> torch.Tensor:
        """The update to the base weight, shaped like it: (out_features, in_features)."""
        if self.parts == 1:
            return (self.scaling * (self.A @ self.B)).T
        return torch.cat([(self.scaling * (self.A[i] @ self.B[i])).T for i in range(self.parts)], dim=0)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (base weight + delta)."""
        lin = self.linear
        out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                        device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(lin.weight + self.delta_weight())
            if lin.bias is not None:
                out.bias.copy_(lin.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, parts={self.parts}"


def _matches(name: str, target: str) -> bool:
    target = ALIASES.get(target, target)
    if "." in target:
        return name == target or name.startswith(target + ".")
    return target in name.split(".")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str], book: bool = False) -> list[str]:
    """Freeze every parameter of `model`, then wrap each targeted nn.Linear in a LoRALinear
    (book: the appendix-E adapters, scaling alpha and separate Q/K/V adapters on each fused qkv).

    Returns the dotted names of the wrapped modules. A target that matches no Linear raises
    ValueError naming it and the Linear layers that exist.
    """
    targets = list(targets)
    if not targets:
        raise ValueError("apply_lora: targets is empty; expected names like 'att', 'ff', 'out_head'")
    for p in model.parameters():
        p.requires_grad_(False)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and not isinstance(m, LoRALinear) and not n.endswith(".linear")]
    chosen: list[str] = []
    for t in targets:
        hits = [n for n, _ in linears if _matches(n, t)]
        if not hits:
            names = sorted({c for n, _ in linears for c in n.split(".") if not c.isdigit()})
            raise ValueError(f"apply_lora: target {t!r} matches no nn.Linear module; expected one of "
                             f"att, attn, ff, {', '.join(names)} or a full module name")
        chosen.extend(h for h in hits if h not in chosen)
    modules = dict(linears)
    for name in chosen:
        parts = 3 if book and name.split(".")[-1] == "qkv" else 1
        _set_submodule(model, name, LoRALinear(modules[name], rank, alpha, book=book, parts=parts))
    return chosen


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` by an equivalent plain nn.Linear (in place); returns model.

    A merged weight that was tied to another parameter (GPT's out_head tied to tok_emb) is
    untied: the merged head gets its own tensor, and a GPT's cfg.tie_weights becomes False so
    that a saved checkpoint reloads both matrices.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        lora = model.get_submodule(name)
        base = lora.linear.weight
        tied = any(p is base for n, p in model.named_parameters(remove_duplicate=False)
                   if not n.startswith(name + "."))
        _set_submodule(model, name, lora.merged())
        cfg = getattr(model, "cfg", None)
        if tied and dataclasses.is_dataclass(cfg) and getattr(cfg, "tie_weights", False):
            model.cfg = dataclasses.replace(cfg, tie_weights=False)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B matrices of every LoRALinear in `model`."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.A, m.B)]

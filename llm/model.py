"""The GPT-2 model of the book (chapters 3-4), in small readable modules driven by one config.

    from llm.model import GPT, GPTConfig
    cfg = GPTConfig.named("gpt2-124m-256")        # or GPTConfig(vocab_size=..., ...)
    model = GPT(cfg)
    logits = model(torch.tensor([[1212, 318]]))     # (batch, tokens, vocab)

Differences from the book's listing, all numerically equivalent in fp32:
- the query/key/value projections are one fused Linear (`qkv`), as in GPT-2's `c_attn`;
- attention is torch's scaled_dot_product_attention (flash/memory-efficient kernels);
- LayerNorm and the tanh-GELU are torch's built-ins;
- a KV cache (`KVCache`) lets generation feed one new token per step.

Module names follow the book (tok_emb, pos_emb, trf_blocks, final_norm, out_head) so its
weight-loading recipes read across. Run `python -m llm.model` to print parameter counts.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.config import NAMED_CONFIGS  # the named shapes live with the config (no torch) to be checked up front
from llm.fsutil import atomic_write_text

EOT_ID = 50256


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    tie_weights: bool = True

    def __post_init__(self):
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        for f in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    @classmethod
    def named(cls, name: str, **overrides) -> "GPTConfig":
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown model config {name!r}; expected one of {', '.join(sorted(NAMED_CONFIGS))}")
        return cls(**{**NAMED_CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "GPTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


class KVCache:
    """Per-layer key/value tensors of the tokens seen so far: (batch, heads, tokens, head_dim)."""

    def __init__(self, n_layers: int):
        self.k: list[Optional[torch.Tensor]] = [None] * n_layers
        self.v: list[Optional[torch.Tensor]] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def crop(self, max_len: int) -> None:
        """Keep only the last max_len positions (sliding window past the context length)."""
        for i in range(len(self.k)):
            if self.k[i] is not None and self.k[i].shape[2] > max_len:
                self.k[i] = self.k[i][:, :, -max_len:]
                self.v[i] = self.v[i][:, :, -max_len:]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.dropout = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        past = 0
        if cache is not None:
            past = 0 if cache.k[layer] is None else cache.k[layer].shape[2]
            k, v = cache.update(layer, k, v)
        drop = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:  # several new tokens after a cached prefix: query i sees keys 0..past+i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_drop(self.out_proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        x = x + self.att(self.norm1(x), cache, layer)
        return x + self.ff(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * cfg.n_layers) ** 0.5)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Final-norm hidden states (batch, tokens, emb_dim)."""
        b, t = idx.shape
        past = cache.length if cache is not None else 0
        if past + t > self.cfg.context_length:
            raise ValueError(
                f"sequence of {past + t} tokens exceeds the model's context length {self.cfg.context_length}"
            )
        pos = torch.arange(past, past + t, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        for i, block in enumerate(self.trf_blocks):
            x = block(x, cache, i)
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for token ids idx (batch, tokens)."""
        return self.out_head(self.hidden(idx, cache))

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count; tied weights count once (torch deduplicates shared tensors)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), the PaLM appendix B estimate."""
        c = self.cfg
        n = sum(p.numel() for n_, p in self.named_parameters() if not n_.startswith(("tok_emb", "pos_emb")))
        if c.tie_weights:  # the tied matrix is listed once, as tok_emb, but the head is a real matmul
            n += self.out_head.weight.numel()
        return 6 * n + 12 * c.n_layers * c.emb_dim * c.context_length


def count_untied(cfg: GPTConfig) -> int:
    """Parameters as the book counts them for an untied model (163,009,536 for 124M)."""
    return GPT(dataclasses.replace(cfg, tie_weights=False)).num_params()


if __name__ == "__main__":
    for name in ("gpt2-124m", "gpt2-124m-256", "gpt2-small", "gpt2-medium"):
        cfg = GPTConfig.named(name)
        m = GPT(dataclasses.replace(cfg, tie_weights=False))
        tied = m.num_params() - m.out_head.weight.numel()
        print(f"{name}: {m.num_params():,} untied / {tied:,} tied")

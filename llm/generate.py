"""Text generation with a GPT: greedy, temperature, top-k, top-p, stop token, KV cache.

    from llm.generate import generate
    new_ids = generate(model, prompt_ids, max_new_tokens=50)                 # greedy, cached
    new_ids = generate(model, prompt_ids, 50, temperature=0.8, top_k=40, seed=1)

`generate` returns only the new token ids. With the KV cache (default) each step feeds one
token; without it each step re-runs the whole (cropped) context, as the book's chapter 4 does.
Both give identical greedy tokens. Past the context length the cache is rebuilt on the last
context_length tokens, so long generations stay correct.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from llm.model import EOT_ID, GPT


def check_sampling(temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> None:
    """ValueError naming the argument unless temperature >= 0 (0 = greedy), top_k >= 1 or None (no top-k
    filter), 0 < top_p <= 1 or None."""
    if not 0.0 <= temperature < math.inf:
        raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected an integer >= 1 or None (no top-k filter), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a number in (0, 1] or None, got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token id (batch,) from last-position logits (batch, vocab)."""
    check_sampling(temperature, top_k, top_p)
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = EOT_ID,
             use_cache: bool = True, seed: Optional[int] = None) -> list[int]:
    """Continue one prompt; returns the new token ids (stops after eos_id, which is not returned)."""
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens}")
    ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("generate: the prompt has no tokens")
    device = next(model.parameters()).device
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    ctx = model.cfg.context_length
    out: list[int] = []
    cache = None
    try:
        for _ in range(max_new_tokens):
            if use_cache:
                if cache is None or cache.length >= ctx:
                    cache = model.new_cache()
                    logits = model(ids[:, -ctx:], cache)
                else:
                    logits = model(ids[:, -1:], cache)
            else:
                logits = model(ids[:, -ctx:])
            nxt = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, gen)
            tok = int(nxt.item())
            if eos_id is not None and tok == eos_id:
                break
            out.append(tok)
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    finally:
        model.train(was_training)
    return out


def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, **kw) -> str:
    """Convenience: encode prompt, generate, decode the new tokens."""
    ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})
    return tokenizer.decode(generate(model, ids, max_new_tokens, **kw))

"""Tests for llm/lora.py: exact no-op start, targets, frozen base, merge equivalence, plain export.

Run: python -m pytest -x -q tests/test_lora.py
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from llm.checkpoint import load_model, save_model
from llm.lora import LoRALinear, apply_lora, lora_parameters, merge_lora
from llm.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (3, 12), generator=g)


def test_lora_linear_init_is_exact_noop_and_book_init():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    lora = LoRALinear(lin, rank=4, alpha=8)
    x = torch.randn(5, 7, 32)
    assert torch.equal(lora(x), lin(x))
    assert lora.A.shape == (32, 4) and lora.B.shape == (4, 48)
    assert torch.count_nonzero(lora.B) == 0
    # kaiming_uniform_(a=sqrt(5)) on an (in, rank) tensor: fan_in = rank, bound = 1/sqrt(rank)
    assert lora.A.abs().max() <= 1 / math.sqrt(4) and lora.A.abs().max() > 0.3
    assert lora.scaling == 2.0
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert lora.A.requires_grad and lora.B.requires_grad


def test_apply_lora_targets_and_noop_on_model():
    model = tiny_gpt()
    x = ids()
    before = model(x)
    wrapped = apply_lora(model, rank=4, alpha=4, targets=["att", "ff", "out_head"])
    assert wrapped == [
        "trf_blocks.0.att.qkv", "trf_blocks.0.att.out_proj", "trf_blocks.1.att.qkv", "trf_blocks.1.att.out_proj",
        "trf_blocks.0.ff.fc1", "trf_blocks.0.ff.fc2", "trf_blocks.1.ff.fc1", "trf_blocks.1.ff.fc2", "out_head",
    ]
    assert torch.equal(model(x), before)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{w}.{ab}" for w in wrapped for ab in ("A", "B"))
    assert len(lora_parameters(model)) == 2 * len(wrapped)


def test_apply_lora_aliases_and_single_layers():
    m = tiny_gpt()
    assert apply_lora(m, 2, 2, ["attn"]) == ["trf_blocks.0.att.qkv", "trf_blocks.0.att.out_proj",
                                            "trf_blocks.1.att.qkv", "trf_blocks.1.att.out_proj"]
    m = tiny_gpt()
    assert apply_lora(m, 2, 2, ["fc2", "trf_blocks.1.att.qkv"]) == [
        "trf_blocks.0.ff.fc2", "trf_blocks.1.ff.fc2", "trf_blocks.1.att.qkv"]


def test_apply_lora_unknown_target_names_it():
    with pytest.raises(ValueError, match=r"apply_lora: target 'mlp' matches no nn.Linear module"):
        apply_lora(tiny_gpt(), 2, 2, ["mlp"])
    with pytest.raises(ValueError, match="targets is empty"):
        apply_lora(tiny_gpt(), 2, 2, [])


def test_frozen_base_unchanged_after_step_and_adapters_move():
    model = tiny_gpt()
    apply_lora(model, rank=4, alpha=8, targets=["att", "ff", "out_head"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    loss = model(ids()).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    # B starts at zero and gets a gradient at once; A's first gradient is zero (it flows through B)
    assert all(torch.count_nonzero(m.B) > 0 for m in model.modules() if isinstance(m, LoRALinear))


def test_merge_lora_matches_unmerged_and_exports_plain_model(tmp_path):
    model = tiny_gpt()
    x = ids()
    apply_lora(model, rank=4, alpha=8, targets=["att", "ff", "out_head"])
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.normal_(0, 0.05)
    unmerged = model(x)
    assert not torch.allclose(unmerged, tiny_gpt()(x), atol=1e-4)  # the adapters do something
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(x), unmerged, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(tiny_gpt().state_dict())
    # the LoRA'd out_head was tied to tok_emb: merging unties it, and the config says so
    assert model.cfg.tie_weights is False and model.out_head.weight is not model.tok_emb.weight
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert torch.allclose(loaded(x), unmerged, atol=1e-5, rtol=1e-5)

"""Tests of llm/model.py: parameter counts of the book's configs, shapes, the KV cache, config validation.

Run: python -m pytest -q tests/test_model.py
"""
import dataclasses

import pytest
import torch

from llm.model import GPT, GPTConfig, KVCache, count_untied


def _meta_model(cfg: GPTConfig) -> GPT:
    with torch.device("meta"):  # counts parameters without allocating 124M floats
        return GPT(cfg)


def test_gpt2_124m_parameter_counts_match_the_book():
    untied = GPTConfig.named("gpt2-124m")
    assert untied.tie_weights is False
    assert _meta_model(untied).num_params() == 163_009_536
    assert _meta_model(dataclasses.replace(untied, tie_weights=True)).num_params() == 124_412_160
    # The chapter-5 variant differs only by the position table (256 vs 1024 rows).
    assert _meta_model(GPTConfig.named("gpt2-124m-256")).num_params() == 163_009_536 - 768 * 768
    # OpenAI's released GPT-2 small: qkv bias, tied head.
    assert _meta_model(GPTConfig.named("gpt2")).num_params() == 124_439_808


def test_count_untied_helper():
    cfg = GPTConfig(vocab_size=100, context_length=8, emb_dim=16, n_heads=2, n_layers=1)
    m = GPT(cfg)
    assert count_untied(cfg) == m.num_params() + 100 * 16


def test_tied_head_shares_the_embedding():
    m = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, tie_weights=True))
    assert m.out_head.weight is m.tok_emb.weight


def test_forward_shapes_and_context_limit():
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
    m = GPT(cfg).eval()
    x = torch.randint(0, 97, (3, 16))
    assert m(x).shape == (3, 16, 97)
    assert m.hidden(x).shape == (3, 16, 32)
    with pytest.raises(ValueError, match="exceeds the model's context length 16"):
        m(torch.randint(0, 97, (1, 17)))


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    m = GPT(cfg).eval()
    x = torch.randint(0, 97, (2, 20))
    full = m(x)
    cache = m.new_cache()
    parts = [m(x[:, :7], cache), m(x[:, 7:8], cache), m(x[:, 8:20], cache)]  # prefix, one token, a chunk
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_crop():
    c = KVCache(2)
    for layer in range(2):
        c.update(layer, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
    c.crop(3)
    assert c.length == 3 and c.v[1].shape[2] == 3


def test_config_validation_and_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(emb_dim=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown model config"):
        GPTConfig.named("gpt5")
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"emb_dim": 8, "hidden": 3})
    cfg = GPTConfig.named("gpt2-124m-256", drop_rate=0.0)
    assert cfg.context_length == 256 and cfg.drop_rate == 0.0 and cfg.qkv_bias is False
    cfg.save(tmp_path / "c.json")
    assert GPTConfig.load(tmp_path / "c.json") == cfg


def test_flops_per_token_counts_the_tied_head_once_as_a_matmul():
    cfg = GPTConfig(vocab_size=100, context_length=8, emb_dim=16, n_heads=2, n_layers=1, tie_weights=True)
    tied = GPT(cfg)
    untied = GPT(dataclasses.replace(cfg, tie_weights=False))
    assert tied.flops_per_token() == untied.flops_per_token()
    non_emb = untied.num_params() - 100 * 16 - 8 * 16
    assert untied.flops_per_token() == 6 * non_emb + 12 * 1 * 16 * 8

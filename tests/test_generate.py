"""Tests of llm/generate.py: cached == uncached decoding, sampling filters, seeds, stop token.

Run: python -m pytest -q tests/test_generate.py
"""
import pytest
import torch

from llm.generate import generate, sample_next
from llm.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=120, context_length=16, emb_dim=32, n_heads=4, n_layers=2))
    with torch.no_grad():  # larger logits than the 0.02-init gives, so greedy paths are not flat
        m.out_head.weight.mul_(20)
    return m.eval()


def test_cached_and_uncached_greedy_agree_including_past_the_context_length(model):
    prompt = [5, 17, 3, 99, 42]
    n = 40  # 5 + 40 tokens: more than twice the context length (16), so the cache is rebuilt
    cached = generate(model, prompt, n, eos_id=None, use_cache=True)
    uncached = generate(model, prompt, n, eos_id=None, use_cache=False)
    assert len(cached) == n
    assert cached == uncached
    # and both agree with a plain argmax loop written out here
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-16:]]))
        ids.append(int(logits[0, -1].argmax()))
    assert ids[len(prompt):] == cached


def test_cached_and_uncached_sampling_agree_with_a_seed(model):
    kw = dict(temperature=1.0, top_k=20, seed=7, eos_id=None)
    assert generate(model, [1, 2, 3], 30, use_cache=True, **kw) == generate(model, [1, 2, 3], 30, use_cache=False, **kw)


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    a = generate(model, [1, 2], 25, temperature=1.5, seed=1, eos_id=None)
    b = generate(model, [1, 2], 25, temperature=1.5, seed=1, eos_id=None)
    c = generate(model, [1, 2], 25, temperature=1.5, seed=2, eos_id=None)
    assert a == b and a != c


def test_stops_at_eos_and_does_not_return_it(model):
    full = generate(model, [1, 2, 3], 20, eos_id=None)
    eos = full[5]
    first = full.index(eos)
    out = generate(model, [1, 2, 3], 20, eos_id=eos)
    assert out == full[:first]


def test_top_k_one_is_greedy_and_top_k_restricts_the_support():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=5.0, top_k=1, generator=g).item() == 1
    seen = {sample_next(logits, temperature=100.0, top_k=2, generator=g).item() for _ in range(200)}
    assert seen == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, temperature=1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    seen = {sample_next(logits, temperature=1.0, top_p=0.45, generator=g).item() for _ in range(100)}
    assert seen == {0}


def test_temperature_zero_is_argmax_and_low_temperature_concentrates():
    logits = torch.tensor([[1.0, 2.0, 1.9]])
    assert sample_next(logits, temperature=0.0).item() == 1
    g = torch.Generator().manual_seed(0)
    cold = [sample_next(logits, temperature=0.01, generator=g).item() for _ in range(50)]
    assert set(cold) == {1}
    hot = {sample_next(logits, temperature=10.0, generator=g).item() for _ in range(200)}
    assert hot == {0, 1, 2}


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, [], 5)


def test_generate_restores_training_mode(model):
    model.train()
    generate(model, [1], 3)
    assert model.training
    model.eval()

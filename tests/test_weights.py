"""Tests of llm/weights.py against a tiny random transformers GPT2LMHeadModel saved to tmp_path.

Run: python -m pytest -q tests/test_weights.py
"""
import json
import logging

import pytest
import torch

from llm.checkpoint import save_model
from llm.generate import generate
from llm.model import GPT, GPTConfig
from llm.weights import load_hf_gpt2, load_pretrained

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=300,
                                  bos_token_id=299, eos_token_id=299)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm/bias values so a wrong mapping cannot hide behind ones/zeros
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf.save_pretrained(folder, safe_serialization=True)
    return folder, hf


def test_logits_match_transformers(hf_folder):
    folder, hf = hf_folder
    model = load_hf_gpt2(folder)
    assert model.cfg == GPTConfig(vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                                  drop_rate=0.0, qkv_bias=True, tie_weights=True)
    assert model.out_head.weight is model.tok_emb.weight
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match_transformers_generate(hf_folder):
    folder, hf = hf_folder
    model = load_pretrained(str(folder))
    prompt = [5, 17, 200, 3]
    ours = generate(model, prompt, 20, eos_id=None)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             pad_token_id=0)
    assert ours == theirs[0, len(prompt):].tolist()


def test_keys_without_the_transformer_prefix(hf_folder, tmp_path):
    folder, hf = hf_folder
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)  # old exports carry the causal mask buffer
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(bare, str(tmp_path / "model.safetensors"))
    a, b = load_hf_gpt2(folder), load_hf_gpt2(tmp_path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_context_length_override_crops_positions(hf_folder):
    folder, _ = hf_folder
    m = load_hf_gpt2(folder, context_length=16)
    assert m.cfg.context_length == 16 and m.pos_emb.weight.shape == (16, 64)
    with pytest.raises(ValueError, match="exceeds n_positions 32"):
        load_hf_gpt2(folder, context_length=64)


def test_llmpipe_checkpoint_folder_is_detected(tmp_path):
    m = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    save_model(m, tmp_path / "ckpt")
    loaded = load_pretrained(str(tmp_path / "ckpt"))
    assert loaded.cfg == m.cfg
    for (ka, va), (kb, vb) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    dropped = load_pretrained(str(tmp_path / "ckpt"), drop_rate=0.2)  # e.g. for finetuning
    assert dropped.cfg.drop_rate == 0.2 and dropped.trf_blocks[0].att.dropout == 0.2
    assert torch.equal(dropped.tok_emb.weight, m.tok_emb.weight) and dropped.out_head.weight is dropped.tok_emb.weight


def test_clear_errors(hf_folder, tmp_path):
    folder, _ = hf_folder
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pretrained(str(tmp_path / "nope"))
    # missing weights file
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"noweights/model.safetensors: missing model weights"):
        load_hf_gpt2(d)
    # garbled weights file
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"noweights/model.safetensors: not a readable safetensors file"):
        load_hf_gpt2(d)
    # garbled config.json
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"noweights/config.json: not valid JSON"):
        load_hf_gpt2(d)
    # unsupported architecture
    cfg = json.loads((folder / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture model_type='llama'"):
        load_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function 'relu' is not supported"):
        load_hf_gpt2(d)
    # weights that do not fit the config
    e = tmp_path / "mismatch"
    e.mkdir()
    (e / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
    (e / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"mismatch/model.safetensors: tensor 'wte.weight' has shape \(300, 64\)"):
        load_hf_gpt2(e)


def test_hub_name_offline_without_cache_says_to_pass_a_folder(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", "from llm.weights import load_pretrained; load_pretrained('gpt2')"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: cannot fetch openai-community/gpt2")
    assert "pass a local folder" in last

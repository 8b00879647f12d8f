"""Load OpenAI GPT-2 weights (Hugging Face format) or an llmpipe checkpoint into llmpipe's GPT.

    from llm.weights import load_pretrained, load_hf_gpt2
    model = load_pretrained("gpt2")                 # openai-community/gpt2 via the HF cache / hub
    model = load_pretrained("path/to/hf_folder")    # config.json + model.safetensors (HF GPT-2)
    model = load_pretrained("out/pretrain/model")   # an llmpipe checkpoint folder
    model = load_hf_gpt2("path/to/hf_folder")

The book (chapter 5) loads OpenAI's TensorFlow checkpoint; this module reads the same weights
from the Hugging Face `model.safetensors` instead, with these mappings:

    wte / wpe                  -> tok_emb / pos_emb (out_head is tied to wte)
    h.i.ln_1, h.i.ln_2         -> trf_blocks[i].norm1, norm2
    h.i.attn.c_attn (fused qkv)-> trf_blocks[i].att.qkv       (Conv1D weight is [in, out]: transposed)
    h.i.attn.c_proj            -> trf_blocks[i].att.out_proj  (transposed)
    h.i.mlp.c_fc, c_proj       -> trf_blocks[i].ff.fc1, fc2   (transposed)
    ln_f                       -> final_norm

Keys may carry the "transformer." prefix (GPT2LMHeadModel.save_pretrained) or not (the files on
the hub). Only the GPT-2 architecture is accepted: tanh GELU ("gelu_new"), LayerNorm eps 1e-5,
inner size 4*n_embd, plain 1/sqrt(head_dim) attention scaling.

Run `python -m llm.weights FOLDER_OR_NAME "prompt"` to load weights and print a greedy continuation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llm.checkpoint import load_model
from llm.generate import generate_text
from llm.model import GPT, GPTConfig
from llm.tokenizer import get_encoding

HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
_SUPPORTED_ACTIVATIONS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}  # all the tanh approximation


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (expected a Hugging Face GPT-2 config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def hf_gpt2_config(config_path: Path, drop_rate: float = 0.0, context_length: Optional[int] = None) -> GPTConfig:
    """Translate a Hugging Face GPT-2 config.json into a GPTConfig (raises on other architectures)."""
    raw = _read_json(config_path)
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type != "gpt2":
        raise ValueError(f"{config_path}: unsupported architecture model_type={model_type!r} "
                         f"(architectures={archs}); only GPT-2 (model_type 'gpt2') can be loaded")
    for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"):
        if not isinstance(raw.get(key), int):
            raise ValueError(f"{config_path}: field {key!r} must be an integer, got {raw.get(key)!r}")
    act = raw.get("activation_function", "gelu_new")
    if act not in _SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{config_path}: activation_function {act!r} is not supported "
                         f"(llmpipe's GPT uses the tanh GELU, HF 'gelu_new')")
    eps = float(raw.get("layer_norm_epsilon", 1e-5))
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"{config_path}: layer_norm_epsilon {eps} is not supported (expected 1e-05)")
    n_inner = raw.get("n_inner")
    if n_inner not in (None, 4 * raw["n_embd"]):
        raise ValueError(f"{config_path}: n_inner {n_inner} is not supported (expected null or 4*n_embd)")
    if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("scale_attn_weights", True) is False:
        raise ValueError(f"{config_path}: non-standard attention scaling is not supported")
    if raw.get("add_cross_attention"):
        raise ValueError(f"{config_path}: cross-attention GPT-2 variants are not supported")
    ctx = raw["n_positions"] if context_length is None else context_length
    if ctx > raw["n_positions"]:
        raise ValueError(f"{config_path}: context_length {ctx} exceeds n_positions {raw['n_positions']}")
    return GPTConfig(vocab_size=raw["vocab_size"], context_length=ctx, emb_dim=raw["n_embd"],
                     n_heads=raw["n_head"], n_layers=raw["n_layer"], drop_rate=drop_rate, qkv_bias=True,
                     tie_weights=bool(raw.get("tie_word_embeddings", True)))


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    files: list[Path]
    if single.exists():
        files = [single]
    elif index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        hint = " (PyTorch .bin files are not read: they are pickles)" if (folder / "pytorch_model.bin").exists() else ""
        raise FileNotFoundError(f"{single}: missing model weights{hint}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing weight shard")
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def convert_hf_gpt2_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Map Hugging Face GPT-2 tensor names/layouts onto llmpipe's GPT state dict names."""
    sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...], transpose: bool = False) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"{source}: tensor {key!r} is missing")
        t = sd[key]
        if transpose:
            t = t.t()
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(sd[key].shape)}, "
                             f"expected {shape if not transpose else shape[::-1]} for this config.json")
        used.add(key)
        return t.to(torch.float32).contiguous()

    d, v = cfg.emb_dim, cfg.vocab_size
    out["tok_emb.weight"] = take("wte.weight", (v, d))
    wpe = take("wpe.weight", (sd["wpe.weight"].shape[0] if "wpe.weight" in sd else cfg.context_length, d))
    out["pos_emb.weight"] = wpe[: cfg.context_length].contiguous()
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        out[b + "norm1.weight"] = take(h + "ln_1.weight", (d,))
        out[b + "norm1.bias"] = take(h + "ln_1.bias", (d,))
        out[b + "att.qkv.weight"] = take(h + "attn.c_attn.weight", (3 * d, d), transpose=True)
        out[b + "att.qkv.bias"] = take(h + "attn.c_attn.bias", (3 * d,))
        out[b + "att.out_proj.weight"] = take(h + "attn.c_proj.weight", (d, d), transpose=True)
        out[b + "att.out_proj.bias"] = take(h + "attn.c_proj.bias", (d,))
        out[b + "norm2.weight"] = take(h + "ln_2.weight", (d,))
        out[b + "norm2.bias"] = take(h + "ln_2.bias", (d,))
        out[b + "ff.fc1.weight"] = take(h + "mlp.c_fc.weight", (4 * d, d), transpose=True)
        out[b + "ff.fc1.bias"] = take(h + "mlp.c_fc.bias", (4 * d,))
        out[b + "ff.fc2.weight"] = take(h + "mlp.c_proj.weight", (d, 4 * d), transpose=True)
        out[b + "ff.fc2.bias"] = take(h + "mlp.c_proj.bias", (d,))
    out["final_norm.weight"] = take("ln_f.weight", (d,))
    out["final_norm.bias"] = take("ln_f.bias", (d,))
    if cfg.tie_weights:
        out["out_head.weight"] = out["tok_emb.weight"]
        used.add("lm_head.weight")
    else:
        key = "lm_head.weight"
        if key not in sd:
            raise ValueError(f"{source}: tie_word_embeddings is false but 'lm_head.weight' is missing")
        out["out_head.weight"] = take(key, (v, d))
    # Buffers of old exports (causal mask, masked_bias) carry no weights.
    extra = [k for k in sd if k not in used and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if extra:
        raise ValueError(f"{source}: unexpected tensors for a {cfg.n_layers}-layer GPT-2: {sorted(extra)[:5]}")
    return out


def load_hf_gpt2(folder: str | Path, drop_rate: float = 0.0, context_length: Optional[int] = None) -> GPT:
    """Load a Hugging Face GPT-2 folder (config.json + model.safetensors) into a GPT in eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (expected a Hugging Face GPT-2 folder with config.json "
                                "and model.safetensors)")
    cfg = hf_gpt2_config(folder / "config.json", drop_rate=drop_rate, context_length=context_length)
    sd = convert_hf_gpt2_state_dict(_read_safetensors(folder), cfg, source=str(folder / "model.safetensors"))
    with torch.device("meta"):  # skip the random init of 124M-1.5B parameters we overwrite anyway
        model = GPT(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight
    return model.eval()


def _probe_hub(timeout: float = 3.0) -> None:
    """Fail fast (instead of hf_hub_download's retries) when the hub's host cannot be reached."""
    from huggingface_hub import constants  # lazy: optional (installed with transformers), only for hub names

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set")
    url = urlparse(constants.ENDPOINT)
    with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
        pass


def _hub_folder(name: str) -> Path:
    """config.json + model.safetensors of a hub model: the local HF cache first, then the network."""
    from huggingface_hub import hf_hub_download  # lazy: optional (installed with transformers), only for hub names

    repo = HUB_MODELS.get(name, name)
    files = ("config.json", "model.safetensors")
    try:
        paths = [hf_hub_download(repo, f, local_files_only=True) for f in files]
    except Exception:
        try:
            _probe_hub()
            paths = [hf_hub_download(repo, f, etag_timeout=10) for f in files]
        except Exception as e:
            raise FileNotFoundError(
                f"cannot fetch {repo} (config.json, model.safetensors) from the Hugging Face hub and it is not "
                f"in the local cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "offline, pass a local folder holding a GPT-2 config.json and model.safetensors instead") from None
    folder = Path(paths[0]).parent
    if Path(paths[1]).parent != folder:
        raise FileNotFoundError(f"{repo}: config.json and model.safetensors resolved to different snapshots")
    return folder


def load_pretrained(spec: str, drop_rate: float = 0.0, context_length: Optional[int] = None) -> GPT:
    """A GPT from "gpt2" / "gpt2-medium" / "gpt2-large" / "gpt2-xl" (hub or HF cache), or a local folder:
    a Hugging Face GPT-2 folder or an llmpipe checkpoint folder (config.json with "llmpipe_model")."""
    path = Path(os.path.expanduser(str(spec)))
    if path.is_dir():
        cfg_path = path / "config.json"
        raw = _read_json(cfg_path)
        if "llmpipe_model" in raw:
            model = load_model(path)
            if context_length is not None and context_length != model.cfg.context_length:
                raise ValueError(f"{cfg_path}: checkpoint context_length is {model.cfg.context_length}, "
                                 f"{context_length} was requested")
            if drop_rate != model.cfg.drop_rate:  # same weights, the dropout asked for (finetuning)
                rebuilt = GPT(dataclasses.replace(model.cfg, drop_rate=drop_rate))
                rebuilt.load_state_dict(model.state_dict())
                model = rebuilt.eval()
            return model
        if "model_type" in raw or "n_embd" in raw:
            return load_hf_gpt2(path, drop_rate=drop_rate, context_length=context_length)
        raise ValueError(f"{cfg_path}: neither an llmpipe checkpoint ('llmpipe_model' key) nor a Hugging Face "
                         "GPT-2 config ('model_type': 'gpt2')")
    if spec in HUB_MODELS or str(spec).startswith("openai-community/"):
        return load_hf_gpt2(_hub_folder(spec), drop_rate=drop_rate, context_length=context_length)
    raise FileNotFoundError(f"{spec}: no such folder, and not one of {', '.join(HUB_MODELS)} "
                            "(pass a Hugging Face GPT-2 folder or an llmpipe checkpoint folder)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m llm.weights FOLDER_OR_NAME [PROMPT]")
    m = load_pretrained(sys.argv[1])
    print(f"{m.num_params():,} parameters")
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Every effort moves you"
    print(prompt + generate_text(m, get_encoding(), prompt, 30))

"""Model checkpoints: `model.safetensors` + `config.json` in one folder, written atomically.

    from llm.checkpoint import save_model, load_model
    save_model(model, "out/ckpt")          # writes out/ckpt/{model.safetensors,config.json}
    model = load_model("out/ckpt")          # a GPT in eval mode

Weights are never pickled. Extra JSON-able metadata (tokenizer name, classifier labels, ...)
goes into config.json under "llmpipe". Tied weights are stored once (as tok_emb.weight).

Resumable training checkpoints (`save_checkpoint`, `list_checkpoints`; llm.training.TrainState
builds on them): ckpt_root/step-XXXXXX/ holding model.safetensors + config.json +
optimizer.safetensors (optimizer state and any extra tensors, e.g. RNG states) + state.json, each
folder written under a hidden temp name and renamed, so a killed run never leaves a partial
checkpoint that looks complete.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from llm.fsutil import atomic_dir
from llm.model import GPT, GPTConfig

CKPT_RE = re.compile(r"^step-(\d{6,})$")
CKPT_FILES = ("model.safetensors", "config.json", "optimizer.safetensors", "state.json")


def state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous, de-duplicated state dict (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in module.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_model(model: GPT, directory: str | Path, extra: Optional[dict] = None,
               state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write model.safetensors + config.json into `directory` atomically (llm.fsutil.atomic_dir: a temp
    folder, fsynced, renamed into place)."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        _write_model_files(model, tmp, extra, state_dict)
    return directory


def _write_model_files(model: GPT, folder: Path, extra: Optional[dict] = None,
                       state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    sd = state_dict if state_dict is not None else state_dict_for_save(model)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"llmpipe_model": model.cfg.to_dict()}
    if extra:
        cfg["llmpipe"] = extra
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a checkpoint folder with model.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def load_model(directory: str | Path, map_location: str = "cpu", strict: bool = True) -> GPT:
    """Load an llmpipe checkpoint folder into a GPT (eval mode)."""
    directory = Path(directory)
    raw = read_config(directory)
    if "llmpipe_model" not in raw:
        raise ValueError(f"{directory / 'config.json'}: not an llmpipe checkpoint (no 'llmpipe_model' key); "
                         "for a Hugging Face GPT-2 folder use llm.weights.load_hf_gpt2")
    model = GPT(GPTConfig.from_dict(raw["llmpipe_model"]))
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: missing model weights")
    sd = load_file(str(weights), device=map_location)
    if model.cfg.tie_weights and "out_head.weight" not in sd and "tok_emb.weight" in sd:
        sd["out_head.weight"] = sd["tok_emb.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{weights}: weights do not match config.json "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.eval()
    return model


def load_weights_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    """Load a de-duplicated state dict (tied tensors stored once, as save_model writes them) into
    `model`; a tensor that is really missing or unexpected is a ValueError naming `source`."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    ptr_names: dict[int, list[str]] = {}
    for n, t in model.state_dict(keep_vars=True).items():
        ptr_names.setdefault(t.data_ptr(), []).append(n)
    really_missing = [m for m in missing
                      if not any(o in sd for o in ptr_names.get(model.state_dict(keep_vars=True)[m].data_ptr(), []))]
    if really_missing or unexpected:
        raise ValueError(f"{source}: weights do not match this run's model (missing {really_missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")


# --------------------------------------------------------------------------------------------
# Resumable training checkpoints (no pickles: tensors in safetensors, scalars in JSON)
# --------------------------------------------------------------------------------------------

def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"optim.{idx}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for idx, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(ckpt_root: Path, step: int, model: GPT, opt: torch.optim.Optimizer, state: dict,
                    extra_tensors: dict[str, torch.Tensor], keep: int, stage: str = "pretrain") -> Path:
    """Write checkpoints/step-XXXXXX atomically (llm.fsutil.atomic_dir: a hidden temp folder, every file
    fsynced, renamed into place); keep the newest `keep`. `stage` goes into config.json's llmpipe metadata."""
    final = Path(ckpt_root) / f"step-{step:06d}"
    with atomic_dir(final) as folder:
        _write_model_files(model, folder, extra={"tokenizer": "gpt2", "stage": stage, "step": step})
        tensors, groups = optimizer_to_flat(opt)
        save_file({**tensors, **extra_tensors}, str(folder / "optimizer.safetensors"))
        (folder / "state.json").write_text(json.dumps({**state, "optimizer_param_groups": groups}))
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temp folders are hidden and never match)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in CKPT_FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]

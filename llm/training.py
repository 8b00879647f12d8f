"""What the training recipes share (llm.train pretrain, llm.spam, llm.instruct, llm.dpo): the resumable
loop state, the optimizer, the device, the thread count, the base model of a finetune.

    from llm.training import TrainState, make_adamw, pick_device, torch_threads
    with torch_threads(cfg.threads):                    # 0 = llm.procenv.allowed_cores(); restored on exit
        device = pick_device("auto")                     # CUDA when available, else CPU
        opt = make_adamw(model, cfg.lr, cfg.weight_decay, decay_all=cfg.book_compat)
        st = TrainState.load(ckpt_root, model, opt, device, identity, "instruct") or TrainState(history=...)
        ...                                              # the loop moves st.step, st.epoch_step, st.sums, ...
        st.save(ckpt_root, model, opt, cfg.keep_checkpoints, identity, "instruct")

No command line: the recipes import it. API (added to only, never changed under the recipes):
  STATE_VERSION            the one checkpoint state format version (state.json "version")
  TrainingInterrupted      raised by the `stop_after` test hook (`stop_hook`), as if the run were killed
  torch_threads(n, nproc)  context manager: torch threads n (0 = allowed_cores(nproc)), restores on exit
  pick_device(want, local_rank, field)   "auto" | "cpu" | "cuda" -> torch.device ("cuda" without a GPU: error)
  param_groups / make_adamw               AdamW with decay/no-decay groups (decay_all: every parameter),
                                          fused where torch has it, else `foreach` (each recipe keeps its flags)
  load_base(init, base_checkpoint, stage) the GPT a finetune starts from: the pretrain checkpoint or load_pretrained
  TrainState               step, epoch, epoch_step, tokens_seen, train_time, sums (running sums since the
                           last eval), history, extra (recipe-specific JSON); .save() writes
                           ckpt_root/step-XXXXXX (llm.checkpoint.save_checkpoint: weights, optimizer, RNG
                           states captured at save, state.json) and keeps the newest `keep`; TrainState.load()
                           drops temp folders of a killed save, checks the run's identity (config, data,
                           model) against the newest complete checkpoint's, restores weights, optimizer and
                           RNGs and returns the state (None when there is no checkpoint)
  rng_state_json / rng_state_tensors / restore_rng   the python/numpy/torch(/cuda) RNG states of a checkpoint
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file

from llm.checkpoint import (list_checkpoints, load_model, load_weights_into, optimizer_from_flat,
                            save_checkpoint)
from llm.model import GPT
from llm.procenv import allowed_cores
from llm.weights import load_pretrained

STATE_VERSION = 2  # 1: the recipes' hand-built state dicts (before llm.training); 2: TrainState


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after` test hook, as if the run had been killed after that step."""


def stop_hook(stop_after: Optional[int], step: int, total_steps: int, stage: str) -> None:
    """The tests' kill switch: raise TrainingInterrupted once `step` reaches stop_after (before the end)."""
    if stop_after is not None and stop_after <= step < total_steps:
        raise TrainingInterrupted(f"{stage} stopped after step {step} (test hook)")


@contextlib.contextmanager
def torch_threads(n: int, nproc: int = 1) -> Iterator[int]:
    """Run the block with n torch threads (0 = llm.procenv.allowed_cores(nproc): this process's share of
    its CPU affinity, never a function of the load); torch's previous thread count is restored on exit."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or allowed_cores(nproc))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def pick_device(want: str = "auto", local_rank: Optional[int] = None, field: str = "device") -> torch.device:
    """auto: CUDA when torch sees a GPU (device `local_rank` if given), else CPU; cpu; cuda (an error,
    naming the config `field`, when there is no GPU)."""
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field} is 'cuda' but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if want != "cpu" and torch.cuda.is_available():
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
    return torch.device("cpu")


Params = Union[nn.Module, Iterable[nn.Parameter]]


def param_groups(params: Params, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Weight decay on matrices (linear weights, embeddings) only, biases and LayerNorms not decayed;
    decay_all: every parameter (the book's AdamW). Only parameters that require grad, each once."""
    named = params.named_parameters() if isinstance(params, nn.Module) else ((None, p) for p in params)
    decay, no_decay = [], []
    for _, p in named:  # tied weights appear once
        if p.requires_grad:
            (decay if decay_all or p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_adamw(params: Params, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8, decay_all: bool = False, foreach: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW over `param_groups(params, weight_decay, decay_all)`, fused where torch has the kernel (the
    same update as the default implementation, ~10x faster over a 50257-row embedding on CPU), else
    the `foreach` implementation asked for (None: torch's default)."""
    groups = param_groups(params, weight_decay, decay_all)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=foreach)


def load_base(init: str, base_checkpoint: Optional[Path], stage: str) -> GPT:
    """The GPT a finetune starts from: the pretrain stage's checkpoint (init "pretrain"), or
    llm.weights.load_pretrained(init) (gpt2, gpt2-medium, ..., a HF folder, an llmpipe checkpoint)."""
    if init == "pretrain":
        if base_checkpoint is None:
            raise ValueError(f"{stage}.init is 'pretrain' but no pretrain checkpoint was given (base_checkpoint=None)")
        return load_model(base_checkpoint)
    return load_pretrained(init)


# --------------------------------------------------------------------------------------------
# RNG states (python and numpy as JSON in state.json, torch and CUDA as tensors)
# --------------------------------------------------------------------------------------------

def rng_state_json() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}


def rng_state_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(rng: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = rng["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


# --------------------------------------------------------------------------------------------
# The resumable loop state
# --------------------------------------------------------------------------------------------

def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "…"


def check_identity(path: Path, saved: Any, identity: dict, stage: str, hint: Optional[str] = None) -> None:
    """A ValueError naming `path` and the first field where a checkpoint's identity differs from this run's."""
    if saved == identity:
        return
    saved = saved if isinstance(saved, dict) else {}
    key = next((k for k in [*identity, *saved] if saved.get(k) != identity.get(k)), "identity")
    raise ValueError(f"{path}: this checkpoint was made with a different {stage} config, data or base model "
                     f"(checkpoint {key.replace('_', ' ')} {_short(saved.get(key))} differs from this run's "
                     f"{_short(identity.get(key))}); "
                     + (hint or "use a new output folder (or delete its checkpoints/) to start over"))


def _plain(v: Any) -> Any:
    """A running sum as JSON: a (GPU) tensor becomes a float, ints and floats stay as they are."""
    return float(v) if torch.is_tensor(v) else v


@dataclass
class TrainState:
    """Where a training run is: what a checkpoint saves besides weights and optimizer state."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # current epoch (0-based)
    epoch_step: int = 0      # optimizer steps done within the current epoch
    tokens_seen: int = 0
    train_time: float = 0.0  # seconds spent in training steps
    sums: dict[str, Any] = field(default_factory=dict)     # running sums since the last eval
    history: Any = None      # the recipe's eval history (JSON)
    extra: dict[str, Any] = field(default_factory=dict)    # recipe-specific JSON (pretrain: perm_seed, samples)
    resumed_from: Optional[int] = None  # set by load(): the step the run resumed from (not saved)

    def to_json(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
                "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                "sums": {k: _plain(v) for k, v in self.sums.items()}, "history": self.history,
                "extra": self.extra}

    def save(self, ckpt_root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int,
             identity: dict, stage: str, device: Optional[torch.device] = None) -> Path:
        """Write ckpt_root/step-XXXXXX (weights, optimizer, RNG states as of now, this state, `identity`)
        atomically and keep the newest `keep` checkpoints; returns the folder."""
        device = device or next(model.parameters()).device
        state = {"version": STATE_VERSION, "identity": identity, **self.to_json(), "rng": rng_state_json()}
        return save_checkpoint(Path(ckpt_root), self.step, model, optimizer, state, rng_state_tensors(device), keep,
                               stage=stage)

    @classmethod
    def load(cls, ckpt_root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
             identity: dict, stage: str, hint: Optional[str] = None, clean: bool = True) -> Optional[TrainState]:
        """Resume from the newest complete checkpoint in ckpt_root: check its identity, load weights,
        optimizer state and RNGs, return its TrainState; None when there is none. `clean` (one process
        of a DDP run only) first deletes temp folders left by a killed save."""
        ckpt_root = Path(ckpt_root)
        if clean:
            for stale in ckpt_root.glob(".step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        ckpts = list_checkpoints(ckpt_root)
        if not ckpts:
            return None
        latest = ckpts[-1]
        path = latest / "state.json"
        state = json.loads(path.read_text())
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{path}: checkpoint state version {state.get('version')!r}, this llmpipe reads version "
                             f"{STATE_VERSION}; use a new output folder (or delete its checkpoints/) to start over")
        check_identity(path, state.get("identity"), identity, stage, hint)
        load_weights_into(model, load_file(str(latest / "model.safetensors"), device=str(device)), latest)
        tensors = load_file(str(latest / "optimizer.safetensors"))
        optimizer_from_flat(optimizer, tensors, state["optimizer_param_groups"])
        restore_rng(state["rng"], tensors, device)
        return cls(step=state["step"], epoch=state["epoch"], epoch_step=state["epoch_step"],
                   tokens_seen=state["tokens_seen"], train_time=state["train_time"], sums=state["sums"],
                   history=state["history"], extra=state["extra"], resumed_from=state["step"])

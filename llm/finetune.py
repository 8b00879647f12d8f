"""Pieces shared by the two chat finetune recipes, llm/instruct.py and llm/dpo.py; no command line of its own
(run the recipes: python -m llm.instruct / python -m llm.dpo).

    from llm.finetune import write_splits, setup_trainable, merge_if_lora, run_identity, epoch_indices
    artifacts = write_splits(out_dir, {"train": train, "test": test, "val": val}, columns)   # NAME.parquet
    wrapped = setup_trainable(model, cfg)             # LoRA adapters (cfg.train_mode "lora") or every parameter
    identity = run_identity(cfg, train, model)         # what a checkpoint must match to be resumed
    idx = epoch_indices(len(train), cfg.batch_size, cfg.seed, epoch, epoch_step)   # one batch's records
    merge_if_lora(model, wrapped)                      # before saving: a plain GPT again

Both recipes encode text the same way (<|endoftext|> inside a record is plain text), train the same
parameters (LoRA or all), shuffle each epoch with the same seeded permutation (torch.randperm seeded with
seed * 100003 + epoch, sliced drop_last), refuse to resume from checkpoints of another config/data/base
model, and write the same kind of parquet and plot artifacts. The loop state, optimizer, threads and device
come from llm/training.py; the record split, the generation and the responses writer from llm/instruct.py;
the rest of each recipe (batches, loss, evaluation) stays in its own module.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
import torch.nn as nn

from llm.fsutil import atomic_write_bytes, save_figure
from llm.lora import apply_lora, merge_lora

# config fields that may change between a run and its resume (they do not change the trained weights)
RESUMABLE_FIELDS = {"test_limit", "max_new_tokens", "threads", "checkpoint_every", "keep_checkpoints"}


def encode_text(enc, text: str) -> list[int]:
    return enc.encode(text, disallowed_special=())  # "<|endoftext|>" inside a record is plain text


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """df as parquet, written atomically (llm.fsutil): a reader never sees half a file."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_splits(out_dir: Path, parts: dict[str, Sequence[dict]], columns: Sequence[str]) -> list[Path]:
    """One NAME.parquet per split, in the order given."""
    return [write_parquet(pd.DataFrame(list(part), columns=list(columns)), out_dir / f"{name}.parquet")
            for name, part in parts.items()]


def setup_trainable(model: nn.Module, cfg, book: bool = False) -> list[str]:
    """cfg.train_mode "lora": freeze the model and wrap cfg.lora_targets in LoRA adapters (book: appendix E's);
    "all": every parameter trains. Returns the wrapped module names (empty for "all")."""
    if cfg.train_mode == "lora":
        return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, book=book)
    for p in model.parameters():
        p.requires_grad_(True)
    return []


def merge_if_lora(model: nn.Module, wrapped: Sequence[str]) -> None:
    """Fold the LoRA adapters into the weights before saving: the saved model is a plain GPT again."""
    if wrapped:
        merge_lora(model)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, tied ones once; trainable parameters)."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def data_digest(records: Sequence[dict]) -> str:
    return hashlib.sha256(json.dumps(list(records), sort_keys=True).encode()).hexdigest()


def run_identity(cfg, train: Sequence[dict], model: nn.Module) -> dict:
    """What a checkpoint must match to be resumed (llm.training.TrainState.load): the config (less
    RESUMABLE_FIELDS), the training records, the model's shape."""
    return {"config": cfg.model_dump(mode="json", exclude=RESUMABLE_FIELDS),
            "data": data_digest(train), "model_config": model.cfg.to_dict()}


def step_plan(n_train: int, cfg) -> tuple[int, int]:
    """(steps per epoch, total steps): drop_last batches, at least one (short) batch per epoch; cfg.epochs
    of them, at most cfg.max_steps."""
    steps_per_epoch = max(1, n_train // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch, total_steps


def epoch_indices(n: int, batch_size: int, seed: int, epoch: int, epoch_step: int) -> list[int]:
    """The records of batch `epoch_step` of `epoch`: a seeded per-epoch permutation, sliced (drop_last)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[epoch_step * batch_size:(epoch_step + 1) * batch_size].tolist()


def plot_train_val(history: dict, train_key: str, val_key: str, labels: tuple[str, str], ylabel: str,
                   title: str, legend: str, path: Path) -> Path:
    """history[train_key] and the non-None history[val_key] against history["step"]."""
    import matplotlib  # lazy: matplotlib is slow to import and only needed once, at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history[train_key], label=labels[0])
    val = [(s, v) for s, v in zip(history["step"], history[val_key]) if v is not None]
    if val:
        ax.plot(*zip(*val), linestyle="-.", label=labels[1])
    ax.set_xlabel("Optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend)
    fig.tight_layout()
    return save_figure(fig, path)


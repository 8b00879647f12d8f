"""Instruction finetuning stage (the book's chapter 7): data, prompt formats, collate, training, responses.

    from llm.instruct import run_instruct, answer
    result = run_instruct(cfg.instruct, Path("instruction-data.json"), Path("out/instruct"),
                          base_checkpoint=Path("out/pretrain/model"))
    result.outputs["model"], result.outputs["responses"]     # out/instruct/model, responses.parquet
    print(answer(result.outputs["model"], "Rewrite the sentence using a simile.", "The car is very fast."))

    python -m llm.instruct --data instruction-data.json --out out/instruct --base out/pretrain/model \
        [--set epochs=1 --set max_steps=20 ...]

What happens, top to bottom (`run_instruct`):
  1. data: a JSON list (or JSONL file) of {instruction, input, output} records, every field a string
     (`load_records` raises one ValueError naming the file, record, JSONL line and field at fault);
     split exactly as the book: the first int(n*0.85) records train, the next int(n*0.1) test, the
     rest val (no shuffle unless cfg.shuffle: a permutation seeded with cfg.seed); written as
     train/test/val.parquet.
  2. prompts (`format_input`, `format_prompt`, `format_example`, from llm/prompts.py), cfg.prompt_format:
       alpaca: "Below is an instruction that describes a task. Write a response that appropriately
               completes the request.\\n\\n### Instruction:\\n{instruction}" ["\\n\\n### Input:\\n{input}"]
               "\\n\\n### Response:\\n{output}"
       phi3:   "<|user|>\\n{instruction}" ["\\n{input}"] "\\n<|assistant|>\\n{output}"  (the book's
               exercise 7.1 figure; its solution notebook writes "<|assistant|>:" with a colon)
     The bracketed part only when input is non-empty. GPT-2 has no special tokens for these tags:
     they are plain text to the tokenizer.
  3. batches (`collate`, the book's custom_collate_fn): append <|endoftext|> (50256), pad with 50256
     to the longest sequence in the batch, targets = inputs shifted by one, every padding target
     after the first end token set to -100 (ignored by the loss), then truncated to
     min(cfg.max_length, context length). cfg.mask_prompt also sets the targets of the prompt
     (everything up to and including the response header) to -100: train on the response only.
  4. model: the pretrain stage's checkpoint (cfg.init "pretrain", base_checkpoint) or
     llm.weights.load_pretrained(cfg.init) (gpt2-medium, a HF folder, an llmpipe folder); full
     finetune (train_mode "all") or LoRA (llm.lora, merged into the weights before saving).
  5. training: AdamW (fused, weight decay on matrices), cfg.epochs over seeded per-epoch shuffles
     (drop_last, like the book's DataLoader), cfg.max_steps; every cfg.eval_every steps the mean
     train loss since the last eval and the val loss (cfg.eval_batches batches, None = all) go to
     `log({"train_loss", "val_loss"}, step)`; checkpoints in out_dir/checkpoints/step-XXXXXX
     (weights, optimizer, RNG, data position; llm.train's format) every cfg.checkpoint_every steps
     and at the end. Re-running with the same out_dir resumes and ends exactly where an
     uninterrupted run would.
  6. responses: greedy generation with the KV cache (llm.generate.generate, stop at 50256,
     cfg.max_new_tokens) for every test record (or the first cfg.test_limit); the prompt is
     cropped from the left when prompt + max_new_tokens would not fit the context; the response
     is the decoded new text, stripped (and any echoed "### Response:" / "<|assistant|>" tag
     removed, as the book does). cfg.book_compat replays the book's chapter 7 instead: the prompt without
     the response header (stripped from the answer), a sliding window past the context, weight decay on
     every parameter, appendix E's LoRA. Written to responses.parquet (instruction, input, output,
     response) and responses.json; the finetuned model to out_dir/model with
     extra={"task": "instruct", "prompt_format": ...}; loss.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.checkpoint import atomic_write_text, load_model, read_config, save_model
from llm.config import InstructConfig
from llm.fsutil import save_figure
from llm.model import EOT_ID, GPT
from llm.prompts import (ALPACA_PREAMBLE, RESPONSE_HEADER, _check_format, extract_response,  # noqa: F401 (re-exported)
                         format_example, format_input, format_prompt)
from llm.records import read_records
from llm.result import MetricLogger, StageResult, log_or_null

FIELDS = ("instruction", "input", "output")
IGNORE_INDEX = -100
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with string fields instruction, input, output; "
                         f"got {type(rec).__name__}")
    for f in FIELDS:
        if f not in rec:
            raise ValueError(f"{where}: missing field '{f}' (expected a string)")
        if not isinstance(rec[f], str):
            raise ValueError(f"{where}: field '{f}' must be a string, got {type(rec[f]).__name__}")
    return {f: rec[f] for f in FIELDS}


def load_records(path: str | Path) -> list[dict]:
    """Read and validate instruction records from a JSON list or a JSONL file (one object per line;
    llm/records.py decides which by parsing the whole file as JSON first).

    Errors name the file, the record index (0-based) and for JSONL the line (1-based), and the field:
    ``data.jsonl: line 3: record 2: field 'input' must be a string, got int``."""
    rows = read_records(path, "instruction data")
    records = [_check_record(rec, rows.where(i)) for i, rec in enumerate(rows)]
    if not records:
        raise ValueError(f"{path}: no instruction records")
    return records


def split_records(records: Sequence[dict], shuffle: bool = False, seed: int = 123,
                  max_records: Optional[int] = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, val) exactly as the book: 85 % / 10 % / the rest, in file order unless shuffle."""
    data = list(records)
    if shuffle:
        random.Random(seed).shuffle(data)
    if max_records is not None:
        data = data[:max_records]
    train_portion = int(len(data) * 0.85)
    test_portion = int(len(data) * 0.1)
    train = data[:train_portion]
    test = data[train_portion:train_portion + test_portion]
    val = data[train_portion + test_portion:]
    return train, test, val


# --------------------------------------------------------------------------------------------
# Prompt formats (format_input, format_prompt, format_example, extract_response: llm/prompts.py)
# --------------------------------------------------------------------------------------------

def _encode(enc, text: str) -> list[int]:
    return enc.encode(text, disallowed_special=())  # "<|endoftext|>" inside a record is plain text


def encode_examples(enc, records: Sequence[dict], prompt_format: str) -> tuple[list[list[int]], list[int]]:
    """(token ids of each full example, number of leading prompt tokens of each)."""
    seqs, prompt_lens = [], []
    for r in records:
        ids = _encode(enc, format_example(r, prompt_format))
        p = _encode(enc, format_prompt(r, prompt_format))
        n = 0
        while n < min(len(p), len(ids)) and p[n] == ids[n]:  # a BPE merge across the boundary is rare
            n += 1
        seqs.append(ids)
        prompt_lens.append(n)
    return seqs, prompt_lens


def collate(batch: Sequence[Sequence[int]], pad_token_id: int = EOT_ID, ignore_index: int = IGNORE_INDEX,
            allowed_max_length: Optional[int] = None, prompt_lengths: Optional[Sequence[int]] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's custom_collate_fn (+ optional prompt masking): (inputs, targets), both (batch, T)."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for k, item in enumerate(batch):
        new_item = list(item) + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze(-1)
        # every padding target after the first end token is ignored (as in the book, a 50256 *inside* the
        # text would count too; records are encoded with <|endoftext|> as plain text, so none occurs)
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if prompt_lengths is not None:
            targets[:max(prompt_lengths[k] - 1, 0)] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


# --------------------------------------------------------------------------------------------
# Model, training helpers
# --------------------------------------------------------------------------------------------

def load_base(cfg: InstructConfig, base_checkpoint: Optional[Path]) -> GPT:
    """The GPT to finetune: the pretrain stage's checkpoint, or llm.weights.load_pretrained(cfg.init)."""
    if cfg.init == "pretrain":
        if base_checkpoint is None:
            raise ValueError("instruct.init is 'pretrain' but no pretrain checkpoint was given (base_checkpoint=None)")
        return load_model(base_checkpoint)
    from llm.weights import load_pretrained

    return load_pretrained(cfg.init)


def prepare_model(cfg: InstructConfig, base_checkpoint: Optional[Path]) -> tuple[GPT, list[str]]:
    torch.manual_seed(cfg.seed)
    model = load_base(cfg, base_checkpoint)
    wrapped: list[str] = []
    if cfg.train_mode == "lora":
        from llm.lora import apply_lora

        wrapped = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, book=cfg.book_compat)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, wrapped


def make_optimizer(model: nn.Module, cfg: InstructConfig) -> torch.optim.Optimizer:
    from llm.train import param_groups

    groups = param_groups(model, cfg.weight_decay, decay_all=cfg.book_compat)  # the book decays every parameter
    try:  # fused: the same update as the book's AdamW, much faster over the embedding on CPU
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr)


def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored targets (the book's calc_loss_batch)."""
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def loader_loss(model: nn.Module, seqs: Sequence[Sequence[int]], prompt_lens: Optional[Sequence[int]],
                batch_size: int, max_length: int, num_batches: Optional[int] = None,
                device: torch.device = torch.device("cpu")) -> Optional[float]:
    """Mean of batch losses over the first num_batches batches in order (the book's calc_loss_loader)."""
    if not seqs:
        return None
    was = model.training
    model.eval()
    losses = []
    try:
        for b, i in enumerate(range(0, len(seqs), batch_size)):
            if num_batches is not None and b >= num_batches:
                break
            pl = prompt_lens[i:i + batch_size] if prompt_lens is not None else None
            x, y = collate(seqs[i:i + batch_size], allowed_max_length=max_length, prompt_lengths=pl)
            losses.append(float(batch_loss(model, x.to(device), y.to(device))))
    finally:
        model.train(was)
    return sum(losses) / len(losses)


def _data_digest(train: Sequence[dict]) -> str:
    return hashlib.sha256(json.dumps(list(train), sort_keys=True).encode()).hexdigest()


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after` test hook, as if the run had been killed after that step."""


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

def respond(model: GPT, enc, entry: dict, prompt_format: str, max_new_tokens: int, book: bool = False) -> str:
    """Greedy response of `model` to one record (KV cache, stop at <|endoftext|>).

    book (the book's chapter 7): the prompt is format_input alone, without the response header, never
    cropped; past the context the window slides token by token as the book's generate does; the response
    header the model writes is stripped afterwards."""
    from llm.generate import generate

    ctx = model.cfg.context_length
    if book:
        ids = _encode(enc, format_input(entry, prompt_format))
        new = generate(model, ids, max_new_tokens, temperature=0.0, eos_id=EOT_ID,
                       use_cache=len(ids) + max_new_tokens <= ctx)
        return extract_response(enc.decode(new), prompt_format)
    ids = _encode(enc, format_prompt(entry, prompt_format))
    if len(ids) + max_new_tokens > ctx:  # keep the end (the response header) of a long prompt
        ids = ids[-max(ctx - max_new_tokens, ctx // 2):]
    new = generate(model, ids, max_new_tokens, temperature=0.0, eos_id=EOT_ID, use_cache=True)
    return extract_response(enc.decode(new), prompt_format)


def answer(model_dir: str | Path, instruction: str, input: str = "", max_new_tokens: int = 256,
           prompt_format: Optional[str] = None) -> str:
    """Ask an instruction-finetuned checkpoint (out_dir/model of run_instruct) one question."""
    from llm.tokenizer import get_encoding

    model_dir = Path(model_dir)
    meta = read_config(model_dir).get("llmpipe", {})
    fmt = prompt_format or meta.get("prompt_format", "alpaca")
    model = load_model(model_dir)
    return respond(model, get_encoding(), {"instruction": instruction, "input": input, "output": ""}, fmt,
                   max_new_tokens, book=bool(meta.get("book_compat", False)))


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------

def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def plot_losses(history: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["train_loss"], label="Training loss")
    val = [(s, v) for s, v in zip(history["step"], history["val_loss"]) if v is not None]
    if val:
        ax.plot(*zip(*val), linestyle="-.", label="Validation loss")
    ax.set_xlabel("Optimizer step")
    ax.set_ylabel("Loss")
    ax.set_title("Instruction finetuning")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

def run_instruct(cfg: InstructConfig, data_file: Path, out_dir: Path, base_checkpoint: Optional[Path] = None,
                 progress: bool = True, log: Optional[MetricLogger] = None,
                 stop_after: Optional[int] = None) -> StageResult:
    """Instruction-finetune a GPT and write its test-set responses (see the module docstring).

    Returns metrics (final train/val/test loss, split sizes, steps, timings), artifacts (split
    parquets, loss.png, responses.parquet/json) and outputs {"model", "responses"}.
    `stop_after` (tests) raises TrainingInterrupted after that optimizer step, as a kill would."""
    from llm.train import free_cores

    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or free_cores())
    try:
        return _run_instruct(cfg, Path(data_file), Path(out_dir), base_checkpoint, progress, log, stop_after)
    finally:
        torch.set_num_threads(old_threads)


def _run_instruct(cfg: InstructConfig, data_file: Path, out_dir: Path, base_checkpoint: Optional[Path],
                  progress: bool, log: Optional[MetricLogger], stop_after: Optional[int]) -> StageResult:
    from tqdm import tqdm

    from llm.tokenizer import get_encoding
    from llm.train import _rng_json, _rng_tensors, resume_finetune, save_checkpoint

    log = log_or_null(log)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 1. data
    records = load_records(data_file)
    train, test, val = split_records(records, cfg.shuffle, cfg.seed, cfg.max_records)
    if not train:
        raise ValueError(f"{data_file}: {len(records)} records give an empty training split; need at least 2")
    artifacts: list[Path] = []
    for name, part in (("train", train), ("test", test), ("val", val)):
        artifacts.append(_write_parquet(pd.DataFrame(part, columns=list(FIELDS)), out_dir / f"{name}.parquet"))

    # 2. model + tokens
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, wrapped = prepare_model(cfg, base_checkpoint)
    model.to(device)
    ctx = model.cfg.context_length
    max_length = min(cfg.max_length or ctx, ctx)
    enc = get_encoding()
    train_ids, train_pl = encode_examples(enc, train, cfg.prompt_format)
    val_ids, val_pl = encode_examples(enc, val, cfg.prompt_format)
    test_ids, test_pl = encode_examples(enc, test, cfg.prompt_format)
    if not cfg.mask_prompt:
        train_pl = val_pl = test_pl = None
    params_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # 3. optimizer, schedule
    opt = make_optimizer(model, cfg)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)  # drop_last, at least one (short) batch
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    identity = {"version": STATE_VERSION, "config": cfg.model_dump(mode="json", exclude={"test_limit", "max_new_tokens",
                                                                                         "threads", "checkpoint_every",
                                                                                         "keep_checkpoints"}),
                "data": _data_digest(train), "model_config": model.cfg.to_dict()}

    # resume
    ckpt_root = out_dir / "checkpoints"
    step, epoch, epoch_step, tokens_seen, train_time = 0, 0, 0, 0, 0.0
    history = {"step": [], "tokens_seen": [], "train_loss": [], "val_loss": []}
    run_sum, run_n = 0.0, 0
    resumed_from = None
    state = resume_finetune(ckpt_root, identity, model, opt, device, "instruct")
    if state is not None:
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        tokens_seen, train_time, history = state["tokens_seen"], state["train_time"], state["history"]
        run_sum, run_n = state["run_loss_sum"], state["run_loss_count"]
        resumed_from = step

    def save(step_now: int) -> None:
        state = {"identity": identity, "step": step_now, "epoch": epoch, "epoch_step": epoch_step,
                 "tokens_seen": tokens_seen, "train_time": train_time, "history": history,
                 "run_loss_sum": run_sum, "run_loss_count": run_n, "rng": _rng_json()}
        save_checkpoint(ckpt_root, step_now, model, opt, state, _rng_tensors(device), cfg.keep_checkpoints,
                        stage="instruct")

    # 4. training
    bar = tqdm(total=total_steps, initial=step, desc="instruct finetune", unit="step", disable=not progress,
               dynamic_ncols=True)
    perm = None
    model.train()
    while step < total_steps:
        if perm is None or epoch_step >= steps_per_epoch:
            if epoch_step >= steps_per_epoch:
                epoch, epoch_step = epoch + 1, 0
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        t0 = time.perf_counter()
        idx = perm[epoch_step * cfg.batch_size:(epoch_step + 1) * cfg.batch_size].tolist()
        x, y = collate([train_ids[i] for i in idx], allowed_max_length=max_length,
                       prompt_lengths=[train_pl[i] for i in idx] if train_pl is not None else None)
        x, y = x.to(device), y.to(device)
        loss = batch_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        epoch_step += 1
        tokens_seen += int(x.numel())
        run_sum += float(loss.detach())
        run_n += 1
        train_time += time.perf_counter() - t0
        bar.update(1)
        if step % cfg.eval_every == 0 or step == total_steps:
            tr = run_sum / max(run_n, 1)
            va = loader_loss(model, val_ids, val_pl, cfg.batch_size, max_length, cfg.eval_batches, device)
            run_sum, run_n = 0.0, 0
            history["step"].append(step)
            history["tokens_seen"].append(tokens_seen)
            history["train_loss"].append(tr)
            history["val_loss"].append(va)
            log({"train_loss": tr, **({"val_loss": va} if va is not None else {})}, step)
            bar.set_postfix(loss=f"{tr:.3f}", val=f"{va:.3f}" if va is not None else "-")
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            save(step)
        if stop_after is not None and step >= stop_after and step < total_steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {step} (test hook)")
    bar.close()

    # 5. final model (LoRA merged), losses
    if wrapped:
        from llm.lora import merge_lora

        merge_lora(model)
    model.eval()
    test_loss = loader_loss(model, test_ids, test_pl, cfg.batch_size, max_length, None, device)
    model_dir = save_model(model, out_dir / "model", extra={
        "tokenizer": "gpt2", "task": "instruct", "prompt_format": cfg.prompt_format, "steps": step,
        "train_mode": cfg.train_mode, "max_length": max_length, "book_compat": cfg.book_compat})
    if history["step"]:
        artifacts.append(plot_losses(history, out_dir / "loss.png"))
    atomic_write_text(out_dir / "history.json", json.dumps(history, indent=1))

    # 6. responses on the test split
    limit = len(test) if cfg.test_limit is None else min(cfg.test_limit, len(test))
    rows = []
    t_gen = time.time()
    for entry in tqdm(test[:limit], desc="instruct responses", unit="record", disable=not progress,
                      dynamic_ncols=True):
        rows.append({**entry, "response": respond(model, enc, entry, cfg.prompt_format, cfg.max_new_tokens,
                                                  book=cfg.book_compat)})
    gen_seconds = time.time() - t_gen
    responses = _write_parquet(pd.DataFrame(rows, columns=[*FIELDS, "response"]), out_dir / "responses.parquet")
    atomic_write_text(out_dir / "responses.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    artifacts += [responses, out_dir / "responses.json", out_dir / "history.json"]

    final_val = next((v for v in reversed(history["val_loss"]) if v is not None), None)
    metrics = {"train_loss": history["train_loss"][-1] if history["train_loss"] else None, "val_loss": final_val,
               "test_loss": test_loss, "n_train": len(train), "n_val": len(val), "n_test": len(test),
               "n_responses": len(rows), "steps": step, "tokens_seen": tokens_seen,
               "train_seconds": train_time, "generate_seconds": gen_seconds,
               "seconds": time.time() - t_start, "params_trainable": params_trainable, "params_total": params_total}
    return StageResult(
        metrics={k: float(v) for k, v in metrics.items() if v is not None},
        params={"prompt_format": cfg.prompt_format, "train_mode": cfg.train_mode, "mask_prompt": cfg.mask_prompt,
                "max_length": max_length, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                "lora_modules": len(wrapped), "resumed_from_step": resumed_from, "device": str(device),
                "threads": torch.get_num_threads()},
        artifacts=artifacts,
        outputs={"model": model_dir, "responses": responses},
    )


def main(argv: Optional[list[str]] = None) -> None:
    from llm.config import parse_overrides

    ap = argparse.ArgumentParser(prog="python -m llm.instruct", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="instruction JSON/JSONL file")
    ap.add_argument("--out", required=True, help="output folder (re-run to resume)")
    ap.add_argument("--base", help="base checkpoint folder for init=pretrain")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="InstructConfig field")
    a = ap.parse_args(argv)
    fields = parse_overrides(a.set)
    try:
        cfg = InstructConfig(**fields)
        res = run_instruct(cfg, Path(a.data), Path(a.out), Path(a.base) if a.base else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"metrics": res.metrics, "outputs": {k: str(v) for k, v in res.outputs.items()}}, indent=2))


if __name__ == "__main__":
    main()

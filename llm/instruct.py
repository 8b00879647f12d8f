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
     (weights, optimizer, RNG, data position: llm.training.TrainState) every cfg.checkpoint_every steps
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
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from llm.checkpoint import load_model, read_config, save_model
from llm.config import InstructConfig, section_from_overrides
from llm.finetune import (encode_text, epoch_indices, merge_if_lora, param_counts, plot_train_val, run_identity,
                          setup_trainable, step_plan, write_parquet, write_splits)
from llm.fsutil import atomic_write_text
from llm.generate import generate
from llm.model import EOT_ID, GPT
from llm.prompts import (extract_response, format_example, format_input,  # noqa: F401 (re-exported)
                         format_prompt)
from llm.records import read_string_records
from llm.result import MetricLogger, StageResult, log_or_null
from llm.tokenizer import get_encoding
from llm.training import TrainingInterrupted  # noqa: F401 (re-exported: the tests' stop_after hook raises it)
from llm.training import TrainState, load_base, make_adamw, pick_device, stop_hook, torch_threads

FIELDS = ("instruction", "input", "output")
IGNORE_INDEX = -100
HISTORY_KEYS = ("step", "tokens_seen", "train_loss", "val_loss")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_records(path: str | Path) -> list[dict]:
    """Read and validate instruction records from a JSON list or a JSONL file (one object per line;
    llm/records.py decides which by parsing the whole file as JSON first).

    Errors name the file, the record index (0-based) and for JSONL the line (1-based), and the field:
    ``data.jsonl: line 3: record 2: field 'input' must be a string, got int``."""
    return read_string_records(path, FIELDS, "instruction")


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

def encode_examples(enc, records: Sequence[dict], prompt_format: str) -> tuple[list[list[int]], list[int]]:
    """(token ids of each full example, number of leading prompt tokens of each)."""
    seqs, prompt_lens = [], []
    for r in records:
        ids = encode_text(enc, format_example(r, prompt_format))
        p = encode_text(enc, format_prompt(r, prompt_format))
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
# Model, loss
# --------------------------------------------------------------------------------------------

def prepare_model(cfg: InstructConfig, base_checkpoint: Optional[Path]) -> tuple[GPT, list[str]]:
    """The base model with its trainable parameters (LoRA adapters, the book's with book_compat, or all)."""
    torch.manual_seed(cfg.seed)
    model = load_base(cfg.init, base_checkpoint, "instruct")
    return model, setup_trainable(model, cfg, book=cfg.book_compat)


def make_optimizer(model: nn.Module, cfg: InstructConfig) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only; book_compat: on every parameter, as the book does."""
    return make_adamw(model, cfg.lr, cfg.weight_decay, decay_all=cfg.book_compat)


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


# --------------------------------------------------------------------------------------------
# Generation (also the dpo stage's and the served model's)
# --------------------------------------------------------------------------------------------

def respond(model: GPT, enc, entry: dict, prompt_format: str, max_new_tokens: int, book: bool = False) -> str:
    """Greedy response of `model` to one record (KV cache, stop at <|endoftext|>); book: `respond_book`.

    The prompt ends with the response header; a prompt too long for the context keeps its end."""
    if book:
        return respond_book(model, enc, entry, prompt_format, max_new_tokens)
    ctx = model.cfg.context_length
    ids = encode_text(enc, format_prompt(entry, prompt_format))
    if len(ids) + max_new_tokens > ctx:  # keep the end (the response header) of a long prompt
        ids = ids[-max(ctx - max_new_tokens, ctx // 2):]
    new = generate(model, ids, max_new_tokens, temperature=0.0, eos_id=EOT_ID, use_cache=True)
    return extract_response(enc.decode(new), prompt_format)


def respond_book(model: GPT, enc, entry: dict, prompt_format: str, max_new_tokens: int) -> str:
    """The book's chapter 7 generation: the prompt is format_input alone, without the response header, never
    cropped; past the context the window slides token by token as the book's generate does; the response
    header the model writes is stripped afterwards."""
    ids = encode_text(enc, format_input(entry, prompt_format))
    new = generate(model, ids, max_new_tokens, temperature=0.0, eos_id=EOT_ID,
                   use_cache=len(ids) + max_new_tokens <= model.cfg.context_length)
    return extract_response(enc.decode(new), prompt_format)


def answer(model_dir: str | Path, instruction: str, input: str = "", max_new_tokens: int = 256,
           prompt_format: Optional[str] = None) -> str:
    """Ask an instruction-finetuned checkpoint (out_dir/model of run_instruct) one question."""
    model_dir = Path(model_dir)
    meta = read_config(model_dir).get("llmpipe", {})
    fmt = prompt_format or meta.get("prompt_format", "alpaca")
    model = load_model(model_dir)
    return respond(model, get_encoding(), {"instruction": instruction, "input": input, "output": ""}, fmt,
                   max_new_tokens, book=bool(meta.get("book_compat", False)))


def write_responses(model: GPT, enc, records: Sequence[dict], prompt_format: str, max_new_tokens: int, book: bool,
                    limit: Optional[int], out_dir: Path, progress: bool, desc: str) -> tuple[list[dict], Path, float]:
    """`respond` to the first `limit` records (None: all) into out_dir/responses.parquet and responses.json
    (instruction, input, output, response). Returns (rows, the parquet path, generation seconds)."""
    limit = len(records) if limit is None else min(limit, len(records))
    columns = ["instruction", "input", "output", "response"]
    rows = []
    t_gen = time.time()
    for entry in tqdm(records[:limit], desc=desc, unit="record", disable=not progress, dynamic_ncols=True):
        rows.append({**{f: entry[f] for f in columns[:3]},
                     "response": respond(model, enc, entry, prompt_format, max_new_tokens, book=book)})
    seconds = time.time() - t_gen
    path = write_parquet(pd.DataFrame(rows, columns=columns), out_dir / "responses.parquet")
    atomic_write_text(out_dir / "responses.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    return rows, path, seconds


def plot_losses(history: dict, path: Path) -> Path:
    return plot_train_val(history, "train_loss", "val_loss", ("Training loss", "Validation loss"), "Loss",
                          "Instruction finetuning", "upper right", path)


# --------------------------------------------------------------------------------------------
# The stage: run_instruct → prepare_run → train → finish (model, losses) → write_responses
# --------------------------------------------------------------------------------------------

@dataclass
class InstructRun:
    """Everything the training loop and the final evaluation need, built once by `prepare_run`."""
    cfg: InstructConfig
    model: GPT
    wrapped: list[str]                          # LoRA-wrapped module names (empty: full finetune)
    opt: torch.optim.Optimizer
    device: torch.device
    max_length: int
    splits: dict[str, list[dict]]               # train, test, val records
    ids: dict[str, list[list[int]]]             # their token ids
    prompt_lens: dict[str, Optional[list[int]]]  # their prompt lengths (None everywhere unless mask_prompt)
    steps_per_epoch: int
    total_steps: int
    identity: dict                              # what a checkpoint must match to be resumed
    params: tuple[int, int]                     # (total, trainable) parameters before LoRA is merged


def run_instruct(cfg: InstructConfig, data_file: Path, out_dir: Path, base_checkpoint: Optional[Path] = None,
                 progress: bool = True, log: Optional[MetricLogger] = None,
                 stop_after: Optional[int] = None) -> StageResult:
    """Instruction-finetune a GPT and write its test-set responses (see the module docstring).

    Returns metrics (final train/val/test loss, split sizes, steps, timings), artifacts (split
    parquets, loss.png, responses.parquet/json) and outputs {"model", "responses"}.
    `stop_after` (tests) raises TrainingInterrupted after that optimizer step, as a kill would."""
    with torch_threads(cfg.threads):
        t_start = time.time()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        run, artifacts = prepare_run(cfg, Path(data_file), out_dir, base_checkpoint)
        ckpt_root = out_dir / "checkpoints"
        state = (TrainState.load(ckpt_root, run.model, run.opt, run.device, run.identity, "instruct")
                 or TrainState(sums={"loss": 0.0, "count": 0}, history={k: [] for k in HISTORY_KEYS}))
        train(run, state, ckpt_root, log_or_null(log), progress, stop_after)
        model_dir, test_loss, more = finish(run, state, out_dir)
        rows, responses, gen_seconds = write_responses(
            run.model, get_encoding(), run.splits["test"], cfg.prompt_format, cfg.max_new_tokens, cfg.book_compat,
            cfg.test_limit, out_dir, progress, "instruct responses")
        artifacts += more + [responses, out_dir / "responses.json", out_dir / "history.json"]
        timings = {"n_responses": len(rows), "generate_seconds": gen_seconds, "seconds": time.time() - t_start}
        return _result(run, state, test_loss, timings, artifacts, model_dir, responses)


def prepare_run(cfg: InstructConfig, data_file: Path, out_dir: Path, base_checkpoint: Optional[Path]
                ) -> tuple[InstructRun, list[Path]]:
    """Records split and written as parquets, model, token ids, optimizer, step plan."""
    device = pick_device("auto")
    records = load_records(data_file)
    train_, test, val = split_records(records, cfg.shuffle, cfg.seed, cfg.max_records)
    if not train_:
        raise ValueError(f"{data_file}: {len(records)} records give an empty training split; need at least 2")
    splits = {"train": train_, "test": test, "val": val}
    artifacts = write_splits(out_dir, splits, FIELDS)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, wrapped = prepare_model(cfg, base_checkpoint)
    model.to(device)
    ctx = model.cfg.context_length
    enc = get_encoding()
    ids, prompt_lens = {}, {}
    for name in ("train", "val", "test"):
        ids[name], prompt_lens[name] = encode_examples(enc, splits[name], cfg.prompt_format)
        if not cfg.mask_prompt:
            prompt_lens[name] = None
    opt = make_optimizer(model, cfg)
    run = InstructRun(cfg, model, wrapped, opt, device, min(cfg.max_length or ctx, ctx), splits, ids, prompt_lens,
                      *step_plan(len(train_), cfg), run_identity(cfg, train_, model), param_counts(model))
    return run, artifacts


def train(run: InstructRun, state: TrainState, ckpt_root: Path, log: MetricLogger, progress: bool,
          stop_after: Optional[int]) -> None:
    """Optimizer steps from state.step to run.total_steps: eval every cfg.eval_every steps, checkpoint every
    cfg.checkpoint_every steps, both at the end too."""
    cfg, model = run.cfg, run.model
    bar = tqdm(total=run.total_steps, initial=state.step, desc="instruct finetune", unit="step",
               disable=not progress, dynamic_ncols=True)
    model.train()
    with bar:
        while state.step < run.total_steps:
            if state.epoch_step >= run.steps_per_epoch:
                state.epoch, state.epoch_step = state.epoch + 1, 0
            t0 = time.perf_counter()
            x, y = train_batch(run, epoch_indices(len(run.ids["train"]), cfg.batch_size, cfg.seed, state.epoch,
                                                  state.epoch_step))
            loss = batch_loss(model, x, y)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            state.step += 1
            state.epoch_step += 1
            state.tokens_seen += int(x.numel())
            state.sums["loss"] += float(loss.detach())
            state.sums["count"] += 1
            state.train_time += time.perf_counter() - t0
            bar.update(1)
            if state.step % cfg.eval_every == 0 or state.step == run.total_steps:
                evaluate(run, state, log, bar)
            if state.step % cfg.checkpoint_every == 0 or state.step == run.total_steps:
                state.save(ckpt_root, model, run.opt, cfg.keep_checkpoints, run.identity, "instruct")
            stop_hook(stop_after, state.step, run.total_steps, "instruct")


def train_batch(run: InstructRun, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the training records idx, on the run's device."""
    pl = run.prompt_lens["train"]
    x, y = collate([run.ids["train"][i] for i in idx], allowed_max_length=run.max_length,
                   prompt_lengths=[pl[i] for i in idx] if pl is not None else None)
    return x.to(run.device), y.to(run.device)


def evaluate(run: InstructRun, state: TrainState, log: MetricLogger, bar: tqdm) -> None:
    """Mean train loss since the last eval and the val loss into state.history and `log`."""
    tr = state.sums["loss"] / max(state.sums["count"], 1)
    va = loader_loss(run.model, run.ids["val"], run.prompt_lens["val"], run.cfg.batch_size, run.max_length,
                     run.cfg.eval_batches, run.device)
    state.sums = {"loss": 0.0, "count": 0}
    for key, value in zip(HISTORY_KEYS, (state.step, state.tokens_seen, tr, va)):
        state.history[key].append(value)
    log({"train_loss": tr, **({"val_loss": va} if va is not None else {})}, state.step)
    bar.set_postfix(loss=f"{tr:.3f}", val=f"{va:.3f}" if va is not None else "-")


def finish(run: InstructRun, state: TrainState, out_dir: Path) -> tuple[Path, Optional[float], list[Path]]:
    """The final model (LoRA merged) in out_dir/model, its test loss, loss.png and history.json."""
    cfg, model = run.cfg, run.model
    merge_if_lora(model, run.wrapped)
    model.eval()
    test_loss = loader_loss(model, run.ids["test"], run.prompt_lens["test"], cfg.batch_size, run.max_length, None,
                            run.device)
    model_dir = save_model(model, out_dir / "model", extra={
        "tokenizer": "gpt2", "task": "instruct", "prompt_format": cfg.prompt_format, "steps": state.step,
        "train_mode": cfg.train_mode, "max_length": run.max_length, "book_compat": cfg.book_compat})
    artifacts = [plot_losses(state.history, out_dir / "loss.png")] if state.history["step"] else []
    atomic_write_text(out_dir / "history.json", json.dumps(state.history, indent=1))
    return model_dir, test_loss, artifacts


def _result(run: InstructRun, state: TrainState, test_loss: Optional[float], timings: dict, artifacts: list[Path],
            model_dir: Path, responses: Path) -> StageResult:
    cfg, history = run.cfg, state.history
    params_total, params_trainable = run.params
    final_val = next((v for v in reversed(history["val_loss"]) if v is not None), None)
    metrics = {"train_loss": history["train_loss"][-1] if history["train_loss"] else None, "val_loss": final_val,
               "test_loss": test_loss, "n_train": len(run.splits["train"]), "n_val": len(run.splits["val"]),
               "n_test": len(run.splits["test"]), "n_responses": timings["n_responses"], "steps": state.step,
               "tokens_seen": state.tokens_seen, "train_seconds": state.train_time,
               "generate_seconds": timings["generate_seconds"], "seconds": timings["seconds"],
               "params_trainable": params_trainable, "params_total": params_total}
    return StageResult(
        metrics={k: float(v) for k, v in metrics.items() if v is not None},
        params={"prompt_format": cfg.prompt_format, "train_mode": cfg.train_mode, "mask_prompt": cfg.mask_prompt,
                "max_length": run.max_length, "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps,
                "lora_modules": len(run.wrapped), "resumed_from_step": state.resumed_from,
                "device": str(run.device),
                "threads": torch.get_num_threads()},
        artifacts=artifacts,
        outputs={"model": model_dir, "responses": responses},
    )


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llm.instruct", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="instruction JSON/JSONL file")
    ap.add_argument("--out", required=True, help="output folder (re-run to resume)")
    ap.add_argument("--base", help="base checkpoint folder for init=pretrain")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="InstructConfig field")
    a = ap.parse_args(argv)
    try:
        cfg = section_from_overrides(InstructConfig, a.set)
        res = run_instruct(cfg, Path(a.data), Path(a.out), Path(a.base) if a.base else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"metrics": res.metrics, "outputs": {k: str(v) for k, v in res.outputs.items()}}, indent=2))


if __name__ == "__main__":
    main()

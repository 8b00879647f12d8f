"""Preference tuning with DPO (the book's ch07 bonus notebook "dpo-from-scratch"): data, loss, training, responses.

    from llm.dpo import run_dpo, dpo_loss, compute_logprobs
    result = run_dpo(cfg.dpo, Path("instruction-data-with-preference.json"), Path("out/dpo"),
                     base_model=Path("out/instruct/model"))
    result.outputs["model"], result.outputs["responses"]          # out/dpo/model, responses.parquet

    python -m llm.dpo --data instruction-data-with-preference.json --out out/dpo --base out/instruct/model \
        [--set max_steps=20 --set beta=0.1 ...]

What happens, top to bottom (`run_dpo`):
  1. data: a JSON list (or JSONL file) of {instruction, input, output, chosen, rejected} records, every field
     a string (`load_preference_records`: one ValueError naming the file, record, JSONL line and field);
     split like the instruct stage and the book (85 % train, 10 % test, the rest val; file order unless
     cfg.shuffle), written as train/test/val.parquet.
  2. pairs (`encode_pair`, the book's PreferenceDataset): prompt = format_input(entry) (llm/prompts.py),
     chosen/rejected = format_prompt(entry) + the response, in the instruct model's prompt format.
  3. batches (`collate_pairs`, the book's custom_collate_fn): chosen and rejected padded with 50256 to the
     longest of both (+1), boolean masks True on response tokens only (prompt + the two newline tokens
     before "### Response" masked when mask_prompt_tokens, padding masked), truncated to allowed_max_length
     (min(cfg.max_length, context length)); pairs with no response token inside that window are dropped.
  4. loss (`compute_logprobs`, `dpo_loss`, exactly the book's compute_logprobs / compute_dpo_loss): mean
     log-probability of the response tokens under the policy and under the reference;
     loss = -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), rewards pi - ref (means over the batch).
  5. model: the policy is the instruct stage's model (cfg.train_mode "all", or LoRA adapters merged before
     saving); the reference is a frozen copy of the same weights, in eval mode.
  6. training: AdamW (cfg.lr, cfg.weight_decay; every parameter decayed as in the book's notebook), cfg.epochs
     over seeded per-epoch shuffles (drop_last), cfg.max_steps. At step 0 (policy == reference: loss log 2,
     margins 0) and every cfg.eval_every steps and at the end: `dpo_train_loss`, `dpo_val_loss`,
     `train_reward_margin`, `val_reward_margin` (mean chosen reward - mean rejected reward, the book's
     margin) over the first cfg.eval_batches batches of each split in order, and `val_reward_accuracy`
     (share of val pairs whose chosen reward beats the rejected one) go to `log(metrics, step)`.
     Checkpoints every cfg.checkpoint_every steps and at the end (llm.train's format, stage "dpo");
     re-running with the same out_dir resumes and ends exactly where an uninterrupted run would.
  7. responses for the test split with the instruct stage's generation (llm.instruct.respond: greedy, KV
     cache, stop at <|endoftext|>, cfg.max_new_tokens, the first cfg.test_limit records): responses.parquet
     and .json; the model in out_dir/model; reward_margin.png (train/val margin per step), history.json.
"""
from __future__ import annotations

import argparse
import copy
import json
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
from llm.config import DpoConfig
from llm.fsutil import save_figure
from llm.model import EOT_ID, GPT
from llm.prompts import format_input, format_prompt
from llm.records import read_records
from llm.result import MetricLogger, StageResult, log_or_null

FIELDS = ("instruction", "input", "output", "chosen", "rejected")
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with string fields {', '.join(FIELDS)}; "
                         f"got {type(rec).__name__}")
    for f in FIELDS:
        if f not in rec:
            raise ValueError(f"{where}: missing field '{f}' (expected a string)")
        if not isinstance(rec[f], str):
            raise ValueError(f"{where}: field '{f}' must be a string, got {type(rec[f]).__name__}")
    return {f: rec[f] for f in FIELDS}


def load_preference_records(path: str | Path) -> list[dict]:
    """Read and validate preference records from a JSON list or a JSONL file (one object per line;
    llm/records.py decides which by parsing the whole file as JSON first).

    Errors name the file, the record index (0-based), for JSONL the line (1-based), and the field:
    ``pref.json: record 7: missing field 'rejected' (expected a string)``."""
    rows = read_records(path, "preference data")
    records = [_check_record(rec, rows.where(i)) for i, rec in enumerate(rows)]
    if not records:
        raise ValueError(f"{path}: no preference records")
    return records


def _encode(enc, text: str) -> list[int]:
    return enc.encode(text, disallowed_special=())  # "<|endoftext|>" inside a record is plain text


def encode_pair(enc, entry: dict, prompt_format: str = "alpaca") -> dict:
    """The book's PreferenceDataset item: {"prompt", "chosen", "rejected"} token ids."""
    prompt = format_input(entry, prompt_format)
    head = format_prompt(entry, prompt_format)  # alpaca: prompt + "\n\n### Response:\n", as the book writes it
    return {"prompt": _encode(enc, prompt), "chosen": _encode(enc, head + entry["chosen"]),
            "rejected": _encode(enc, head + entry["rejected"])}


def collate_pairs(batch: Sequence[dict], pad_token_id: int = EOT_ID, allowed_max_length: Optional[int] = None,
                  mask_prompt_tokens: bool = True, device: str | torch.device = "cpu") -> dict:
    """The book's DPO custom_collate_fn: {"prompt": [tensor], "chosen", "rejected", "chosen_mask",
    "rejected_mask"}; masks are True on the response tokens (see the module docstring)."""
    data: dict = {"prompt": [], "chosen": [], "rejected": [], "rejected_mask": [], "chosen_mask": []}
    longest = 0
    if batch:
        for key in ("chosen", "rejected"):
            longest = max(longest, max(len(item[key]) + 1 for item in batch))
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        data["prompt"].append(prompt)
        for key in ("chosen", "rejected"):
            seq = list(item[key])
            padded = seq + [pad_token_id] * (longest - len(seq))
            mask = torch.ones(len(padded)).bool()
            mask[len(seq):] = False
            if mask_prompt_tokens:  # +2: the two "\n" tokens before "### Response"
                mask[:prompt.shape[0] + 2] = False
            data[key].append(torch.tensor(padded))
            data[f"{key}_mask"].append(mask)
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        t = torch.stack(data[key])
        if allowed_max_length is not None:
            t = t[:, :allowed_max_length]
        data[key] = t.to(device)
    return data


def usable(pair: dict, max_length: int) -> bool:
    """Whether a pair keeps at least one response token of both answers inside the first max_length tokens."""
    first = len(pair["prompt"]) + 2
    return all(first < min(len(pair[k]), max_length) for k in ("chosen", "rejected"))


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

def compute_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                     selection_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean log-probability of each row's label tokens (labels = inputs; position t predicts t+1), over the
    tokens selected by selection_mask (the book's compute_logprobs). Returns shape (batch,)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    if selection_mask is not None:
        mask = selection_mask[:, 1:].clone()
        selected = selected * mask
        return selected.sum(-1) / mask.sum(-1)
    return selected.mean(-1)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen_rewards, rejected_rewards), each the mean over the batch (the book's compute_dpo_loss):
    loss = -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))); rewards = policy - reference (detached)."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = (policy_rejected_logps - ref_rejected_logps).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def batch_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) mean response log-probabilities of `model` for a collated batch."""
    chosen = compute_logprobs(model(batch["chosen"]), batch["chosen"], batch["chosen_mask"])
    rejected = compute_logprobs(model(batch["rejected"]), batch["rejected"], batch["rejected_mask"])
    return chosen, rejected


def batch_dpo(policy: nn.Module, reference: nn.Module, batch: dict, beta: float) -> dict:
    """DPO loss of one batch (the book's compute_dpo_loss_batch) plus the pairs whose chosen reward wins."""
    pc, pr = batch_logps(policy, batch)
    with torch.no_grad():
        rc, rr = batch_logps(reference, batch)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    wins = ((pc - rc) > (pr - rr)).sum().item()
    return {"loss": loss, "chosen": float(chosen), "rejected": float(rejected), "wins": wins, "n": len(pc)}


@torch.no_grad()
def evaluate_pairs(policy: nn.Module, reference: nn.Module, pairs: Sequence[dict], batch_size: int,
                   max_length: int, beta: float, num_batches: Optional[int] = None,
                   device: torch.device = torch.device("cpu")) -> Optional[dict]:
    """Means of the batch losses and rewards over the first num_batches batches in order (the book's
    compute_dpo_loss_loader), the reward margin, and the share of pairs whose chosen reward wins."""
    if not pairs:
        return None
    was = policy.training
    policy.eval()
    loss = chosen = rejected = 0.0
    wins = n = nb = 0
    try:
        for b, i in enumerate(range(0, len(pairs), batch_size)):
            if num_batches is not None and b >= num_batches:
                break
            batch = collate_pairs(pairs[i:i + batch_size], allowed_max_length=max_length, device=device)
            r = batch_dpo(policy, reference, batch, beta)
            loss += float(r["loss"])
            chosen += r["chosen"]
            rejected += r["rejected"]
            wins += r["wins"]
            n += r["n"]
            nb += 1
    finally:
        policy.train(was)
    return {"loss": loss / nb, "chosen_reward": chosen / nb, "rejected_reward": rejected / nb,
            "margin": (chosen - rejected) / nb, "accuracy": wins / n}


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------

def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def plot_margins(history: dict, path: Path) -> Path:
    """Train and val reward margin per optimizer step (the book's reward-margin figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["train_reward_margin"], label="Training reward margin")
    val = [(s, v) for s, v in zip(history["step"], history["val_reward_margin"]) if v is not None]
    if val:
        ax.plot(*zip(*val), linestyle="-.", label="Validation reward margin")
    ax.set_xlabel("Optimizer step")
    ax.set_ylabel("Reward margin")
    ax.set_title("DPO preference tuning")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after` test hook, as if the run had been killed after that step."""


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

def run_dpo(cfg: DpoConfig, data_file: Path, out_dir: Path, base_model: Path, progress: bool = True,
            log: Optional[MetricLogger] = None, stop_after: Optional[int] = None) -> StageResult:
    """Preference-tune the instruct model at `base_model` with DPO (see the module docstring).

    Returns metrics (dpo losses, reward margins and accuracy at the start and the end, split sizes, steps,
    timings), artifacts and outputs {"model", "responses"}. `stop_after` (tests) raises TrainingInterrupted
    after that optimizer step, as a kill would."""
    from llm.train import free_cores

    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or free_cores())
    try:
        return _run_dpo(cfg, Path(data_file), Path(out_dir), Path(base_model), progress, log, stop_after)
    finally:
        torch.set_num_threads(old_threads)


def _run_dpo(cfg: DpoConfig, data_file: Path, out_dir: Path, base_model: Path, progress: bool,
             log: Optional[MetricLogger], stop_after: Optional[int]) -> StageResult:
    from tqdm import tqdm

    from llm.instruct import _data_digest, respond, split_records
    from llm.tokenizer import get_encoding
    from llm.train import _rng_json, _rng_tensors, param_groups, resume_finetune, save_checkpoint

    log = log_or_null(log)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 1. data
    records = load_preference_records(data_file)
    train, test, val = split_records(records, cfg.shuffle, cfg.seed, cfg.max_records)
    if not train:
        raise ValueError(f"{data_file}: {len(records)} records give an empty training split; need at least 2")
    artifacts: list[Path] = []
    for name, part in (("train", train), ("test", test), ("val", val)):
        artifacts.append(_write_parquet(pd.DataFrame(part, columns=list(FIELDS)), out_dir / f"{name}.parquet"))

    # 2. policy and frozen reference
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    meta = read_config(base_model).get("llmpipe", {})
    prompt_format = meta.get("prompt_format", "alpaca")
    book = bool(meta.get("book_compat", False))  # the instruct stage's generation, book mode included
    policy = load_model(base_model)
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    wrapped: list[str] = []
    if cfg.train_mode == "lora":
        from llm.lora import apply_lora

        wrapped = apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    else:
        for p in policy.parameters():
            p.requires_grad_(True)
    policy.to(device)
    reference.to(device)
    ctx = policy.cfg.context_length
    max_length = min(cfg.max_length or ctx, ctx)
    enc = get_encoding()
    encoded = {name: [encode_pair(enc, r, prompt_format) for r in part] for name, part in (("train", train),
                                                                                              ("val", val))}
    train_pairs = [p for p in encoded["train"] if usable(p, max_length)]
    val_pairs = [p for p in encoded["val"] if usable(p, max_length)]
    if not train_pairs:
        raise ValueError(f"{data_file}: no training pair has a response token within max_length {max_length}")
    dropped = len(encoded["train"]) + len(encoded["val"]) - len(train_pairs) - len(val_pairs)
    params_total = sum(p.numel() for p in {id(p): p for p in policy.parameters()}.values())
    params_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)

    # 3. optimizer (the book: AdamW over every policy parameter, weight decay on all of them)
    groups = param_groups(policy, cfg.weight_decay, decay_all=True)
    try:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = max(1, len(train_pairs) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    identity = {"version": STATE_VERSION,
                "config": cfg.model_dump(mode="json", exclude={"test_limit", "max_new_tokens", "threads",
                                                               "checkpoint_every", "keep_checkpoints"}),
                "data": _data_digest(train), "model_config": policy.cfg.to_dict()}

    ckpt_root = out_dir / "checkpoints"
    step, epoch, epoch_step, tokens_seen, train_time = 0, 0, 0, 0, 0.0
    keys = ("step", "dpo_train_loss", "dpo_val_loss", "train_reward_margin", "val_reward_margin",
            "val_reward_accuracy", "train_chosen_reward", "train_rejected_reward", "val_chosen_reward",
            "val_rejected_reward")
    history: dict = {k: [] for k in keys}
    resumed_from = None
    state = resume_finetune(ckpt_root, identity, policy, opt, device, "dpo")
    if state is not None:
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        tokens_seen, train_time, history = state["tokens_seen"], state["train_time"], state["history"]
        resumed_from = step

    def save(step_now: int) -> None:
        st = {"identity": identity, "step": step_now, "epoch": epoch, "epoch_step": epoch_step,
              "tokens_seen": tokens_seen, "train_time": train_time, "history": history, "rng": _rng_json()}
        save_checkpoint(ckpt_root, step_now, policy, opt, st, _rng_tensors(device), cfg.keep_checkpoints,
                        stage="dpo")

    def evaluate(step_now: int) -> None:
        tr = evaluate_pairs(policy, reference, train_pairs, cfg.batch_size, max_length, cfg.beta,
                            cfg.eval_batches, device)
        va = evaluate_pairs(policy, reference, val_pairs, cfg.batch_size, max_length, cfg.beta,
                            cfg.eval_batches, device)
        row = {"step": step_now, "dpo_train_loss": tr["loss"], "train_reward_margin": tr["margin"],
               "train_chosen_reward": tr["chosen_reward"], "train_rejected_reward": tr["rejected_reward"],
               "dpo_val_loss": va and va["loss"], "val_reward_margin": va and va["margin"],
               "val_reward_accuracy": va and va["accuracy"], "val_chosen_reward": va and va["chosen_reward"],
               "val_rejected_reward": va and va["rejected_reward"]}
        for k in keys:
            history[k].append(row[k])
        log({k: v for k, v in row.items() if k != "step" and v is not None}, step_now)

    # 4. training
    if not history["step"]:
        evaluate(0)  # policy == reference: loss log(2), margins 0
    bar = tqdm(total=total_steps, initial=step, desc="dpo", unit="step", disable=not progress, dynamic_ncols=True)
    perm = None
    policy.train()
    while step < total_steps:
        if perm is None or epoch_step >= steps_per_epoch:
            if epoch_step >= steps_per_epoch:
                epoch, epoch_step = epoch + 1, 0
            perm = torch.randperm(len(train_pairs),
                                  generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        t0 = time.perf_counter()
        idx = perm[epoch_step * cfg.batch_size:(epoch_step + 1) * cfg.batch_size].tolist()
        batch = collate_pairs([train_pairs[i] for i in idx], allowed_max_length=max_length, device=device)
        r = batch_dpo(policy, reference, batch, cfg.beta)
        opt.zero_grad(set_to_none=True)
        r["loss"].backward()
        opt.step()
        step += 1
        epoch_step += 1
        tokens_seen += int(batch["chosen"].numel())
        train_time += time.perf_counter() - t0
        bar.update(1)
        if step % cfg.eval_every == 0 or step == total_steps:
            evaluate(step)
            bar.set_postfix(loss=f"{history['dpo_train_loss'][-1]:.3f}",
                            margin=f"{history['train_reward_margin'][-1]:.3f}")
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            save(step)
        if stop_after is not None and step >= stop_after and step < total_steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {step} (test hook)")
    bar.close()

    # 5. final model (LoRA merged)
    if wrapped:
        from llm.lora import merge_lora

        merge_lora(policy)
    policy.eval()
    model_dir = save_model(policy, out_dir / "model", extra={
        "tokenizer": "gpt2", "task": "instruct", "stage": "dpo", "prompt_format": prompt_format, "steps": step,
        "train_mode": cfg.train_mode, "max_length": max_length, "beta": cfg.beta, "book_compat": book})
    artifacts.append(plot_margins(history, out_dir / "reward_margin.png"))
    atomic_write_text(out_dir / "history.json", json.dumps(history, indent=1))

    # 6. responses on the test split (the instruct stage's generation)
    limit = len(test) if cfg.test_limit is None else min(cfg.test_limit, len(test))
    rows = []
    t_gen = time.time()
    for entry in tqdm(test[:limit], desc="dpo responses", unit="record", disable=not progress, dynamic_ncols=True):
        rows.append({**{f: entry[f] for f in ("instruction", "input", "output")},
                     "response": respond(policy, enc, entry, prompt_format, cfg.max_new_tokens, book=book)})
    gen_seconds = time.time() - t_gen
    responses = _write_parquet(pd.DataFrame(rows, columns=["instruction", "input", "output", "response"]),
                               out_dir / "responses.parquet")
    atomic_write_text(out_dir / "responses.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    artifacts += [responses, out_dir / "responses.json", out_dir / "history.json"]

    def last(k):
        return next((v for v in reversed(history[k]) if v is not None), None)

    metrics = {"dpo_train_loss": last("dpo_train_loss"), "dpo_val_loss": last("dpo_val_loss"),
               "train_reward_margin": last("train_reward_margin"), "val_reward_margin": last("val_reward_margin"),
               "val_reward_accuracy": last("val_reward_accuracy"),
               "val_reward_margin_start": history["val_reward_margin"][0],
               "val_reward_accuracy_start": history["val_reward_accuracy"][0],
               "n_train": len(train_pairs), "n_val": len(val_pairs), "n_test": len(test), "n_dropped": dropped,
               "n_responses": len(rows), "steps": step, "tokens_seen": tokens_seen, "train_seconds": train_time,
               "generate_seconds": gen_seconds, "seconds": time.time() - t_start,
               "params_trainable": params_trainable, "params_total": params_total}
    return StageResult(
        metrics={k: float(v) for k, v in metrics.items() if v is not None},
        params={"prompt_format": prompt_format, "train_mode": cfg.train_mode, "beta": cfg.beta,
                "max_length": max_length, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                "lora_modules": len(wrapped), "resumed_from_step": resumed_from, "device": str(device),
                "threads": torch.get_num_threads()},
        artifacts=artifacts,
        outputs={"model": model_dir, "responses": responses},
    )


def main(argv: Optional[list[str]] = None) -> None:
    from llm.config import parse_overrides

    ap = argparse.ArgumentParser(prog="python -m llm.dpo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="preference JSON/JSONL file (instruction, input, output, "
                                                  "chosen, rejected)")
    ap.add_argument("--out", required=True, help="output folder (re-run to resume)")
    ap.add_argument("--base", required=True, help="the instruct model folder (policy and reference start here)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="DpoConfig field")
    a = ap.parse_args(argv)
    try:
        cfg = DpoConfig(**parse_overrides(a.set))
        res = run_dpo(cfg, Path(a.data), Path(a.out), Path(a.base))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"metrics": res.metrics, "outputs": {k: str(v) for k, v in res.outputs.items()}}, indent=2))


if __name__ == "__main__":
    main()

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
     Checkpoints every cfg.checkpoint_every steps and at the end (llm.training.TrainState, stage "dpo");
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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from llm.checkpoint import load_model, read_config, save_model
from llm.config import DpoConfig, section_from_overrides
from llm.finetune import (encode_text, epoch_indices, merge_if_lora, param_counts, plot_train_val, run_identity,
                          setup_trainable, step_plan, write_splits)
from llm.fsutil import atomic_write_text
from llm.instruct import split_records, write_responses
from llm.model import EOT_ID, GPT
from llm.prompts import format_input, format_prompt
from llm.records import read_string_records
from llm.result import MetricLogger, StageResult, log_or_null
from llm.tokenizer import get_encoding
from llm.training import TrainingInterrupted  # noqa: F401 (re-exported: the tests' stop_after hook raises it)
from llm.training import TrainState, make_adamw, pick_device, stop_hook, torch_threads

FIELDS = ("instruction", "input", "output", "chosen", "rejected")
HISTORY_KEYS = ("step", "dpo_train_loss", "dpo_val_loss", "train_reward_margin", "val_reward_margin",
                "val_reward_accuracy", "train_chosen_reward", "train_rejected_reward", "val_chosen_reward",
                "val_rejected_reward")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_preference_records(path: str | Path) -> list[dict]:
    """Read and validate preference records from a JSON list or a JSONL file (one object per line;
    llm/records.py decides which by parsing the whole file as JSON first).

    Errors name the file, the record index (0-based), for JSONL the line (1-based), and the field:
    ``pref.json: record 7: missing field 'rejected' (expected a string)``."""
    return read_string_records(path, FIELDS, "preference")


def encode_pair(enc, entry: dict, prompt_format: str = "alpaca") -> dict:
    """The book's PreferenceDataset item: {"prompt", "chosen", "rejected"} token ids."""
    prompt = format_input(entry, prompt_format)
    head = format_prompt(entry, prompt_format)  # alpaca: prompt + "\n\n### Response:\n", as the book writes it
    return {"prompt": encode_text(enc, prompt), "chosen": encode_text(enc, head + entry["chosen"]),
            "rejected": encode_text(enc, head + entry["rejected"])}


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

def plot_margins(history: dict, path: Path) -> Path:
    """Train and val reward margin per optimizer step (the book's reward-margin figure)."""
    return plot_train_val(history, "train_reward_margin", "val_reward_margin",
                          ("Training reward margin", "Validation reward margin"), "Reward margin",
                          "DPO preference tuning", "upper left", path)


# --------------------------------------------------------------------------------------------
# The stage: run_dpo → prepare_run → evaluate (step 0) → train → finish → write_responses
# --------------------------------------------------------------------------------------------

@dataclass
class DpoRun:
    """Everything the training loop and the evaluations need, built once by `prepare_run`."""
    cfg: DpoConfig
    policy: GPT
    reference: GPT                    # the instruct model, frozen, in eval mode
    wrapped: list[str]                # LoRA-wrapped module names of the policy (empty: full finetune)
    opt: torch.optim.Optimizer
    device: torch.device
    max_length: int
    prompt_format: str                # the instruct model's
    book: bool                        # the instruct model's book_compat: generate as it does
    test: list[dict]                  # test records (for the responses)
    pairs: dict[str, list[dict]]      # encoded train and val pairs with a response token within max_length
    n_dropped: int                    # pairs without one
    steps_per_epoch: int
    total_steps: int
    identity: dict                    # what a checkpoint must match to be resumed
    params: tuple[int, int]           # (total, trainable) parameters before LoRA is merged


def run_dpo(cfg: DpoConfig, data_file: Path, out_dir: Path, base_model: Path, progress: bool = True,
            log: Optional[MetricLogger] = None, stop_after: Optional[int] = None) -> StageResult:
    """Preference-tune the instruct model at `base_model` with DPO (see the module docstring).

    Returns metrics (dpo losses, reward margins and accuracy at the start and the end, split sizes, steps,
    timings), artifacts and outputs {"model", "responses"}. `stop_after` (tests) raises TrainingInterrupted
    after that optimizer step, as a kill would."""
    with torch_threads(cfg.threads):
        t_start = time.time()
        out_dir, log = Path(out_dir), log_or_null(log)
        out_dir.mkdir(parents=True, exist_ok=True)
        run, artifacts = prepare_run(cfg, Path(data_file), out_dir, Path(base_model))
        ckpt_root = out_dir / "checkpoints"
        state = (TrainState.load(ckpt_root, run.policy, run.opt, run.device, run.identity, "dpo")
                 or TrainState(history={k: [] for k in HISTORY_KEYS}))
        if not state.history["step"]:
            evaluate(run, state, log)  # step 0, policy == reference: loss log(2), margins 0
        train(run, state, ckpt_root, log, progress, stop_after)
        model_dir, more = finish(run, state, out_dir)
        rows, responses, gen_seconds = write_responses(
            run.policy, get_encoding(), run.test, run.prompt_format, cfg.max_new_tokens, run.book, cfg.test_limit,
            out_dir, progress, "dpo responses")
        artifacts += more + [responses, out_dir / "responses.json", out_dir / "history.json"]
        timings = {"n_responses": len(rows), "generate_seconds": gen_seconds, "seconds": time.time() - t_start}
        return _result(run, state, timings, artifacts, model_dir, responses)


def prepare_run(cfg: DpoConfig, data_file: Path, out_dir: Path, base_model: Path) -> tuple[DpoRun, list[Path]]:
    """Records split and written as parquets, policy and frozen reference, encoded pairs, optimizer, step plan."""
    device = pick_device("auto")
    records = load_preference_records(data_file)
    train_, test, val = split_records(records, cfg.shuffle, cfg.seed, cfg.max_records)
    if not train_:
        raise ValueError(f"{data_file}: {len(records)} records give an empty training split; need at least 2")
    artifacts = write_splits(out_dir, {"train": train_, "test": test, "val": val}, FIELDS)
    meta = read_config(base_model).get("llmpipe", {})
    prompt_format = meta.get("prompt_format", "alpaca")
    book = bool(meta.get("book_compat", False))  # the instruct stage's generation, book mode included
    policy, reference, wrapped = prepare_models(cfg, base_model, device)
    ctx = policy.cfg.context_length
    max_length = min(cfg.max_length or ctx, ctx)
    pairs, n_dropped = encode_splits(get_encoding(), {"train": train_, "val": val}, prompt_format, max_length)
    if not pairs["train"]:
        raise ValueError(f"{data_file}: no training pair has a response token within max_length {max_length}")
    opt = make_adamw(policy, cfg.lr, cfg.weight_decay, decay_all=True)  # the book's notebook decays everything
    run = DpoRun(cfg, policy, reference, wrapped, opt, device, max_length, prompt_format, book, test, pairs,
                 n_dropped, *step_plan(len(pairs["train"]), cfg), run_identity(cfg, train_, policy),
                 param_counts(policy))
    return run, artifacts


def prepare_models(cfg: DpoConfig, base_model: Path, device: torch.device) -> tuple[GPT, GPT, list[str]]:
    """(policy with its trainable parameters, frozen reference copy, LoRA-wrapped module names), on device."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    policy = load_model(base_model)
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    wrapped = setup_trainable(policy, cfg)
    return policy.to(device), reference.to(device), wrapped


def encode_splits(enc, splits: dict[str, list[dict]], prompt_format: str, max_length: int
                  ) -> tuple[dict[str, list[dict]], int]:
    """The `usable` encoded pairs of each split, and how many pairs were dropped."""
    encoded = {name: [encode_pair(enc, r, prompt_format) for r in part] for name, part in splits.items()}
    pairs = {name: [p for p in part if usable(p, max_length)] for name, part in encoded.items()}
    return pairs, sum(len(encoded[n]) - len(pairs[n]) for n in encoded)


def train(run: DpoRun, state: TrainState, ckpt_root: Path, log: MetricLogger, progress: bool,
          stop_after: Optional[int]) -> None:
    """Optimizer steps from state.step to run.total_steps: evaluate every cfg.eval_every steps, checkpoint every
    cfg.checkpoint_every steps, both at the end too."""
    cfg, policy, pairs = run.cfg, run.policy, run.pairs["train"]
    bar = tqdm(total=run.total_steps, initial=state.step, desc="dpo", unit="step", disable=not progress,
               dynamic_ncols=True)
    policy.train()
    with bar:
        while state.step < run.total_steps:
            if state.epoch_step >= run.steps_per_epoch:
                state.epoch, state.epoch_step = state.epoch + 1, 0
            t0 = time.perf_counter()
            idx = epoch_indices(len(pairs), cfg.batch_size, cfg.seed, state.epoch, state.epoch_step)
            batch = collate_pairs([pairs[i] for i in idx], allowed_max_length=run.max_length, device=run.device)
            loss = batch_dpo(policy, run.reference, batch, cfg.beta)["loss"]
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            state.step += 1
            state.epoch_step += 1
            state.tokens_seen += int(batch["chosen"].numel())
            state.train_time += time.perf_counter() - t0
            bar.update(1)
            if state.step % cfg.eval_every == 0 or state.step == run.total_steps:
                evaluate(run, state, log)
                bar.set_postfix(loss=f"{state.history['dpo_train_loss'][-1]:.3f}",
                                margin=f"{state.history['train_reward_margin'][-1]:.3f}")
            if state.step % cfg.checkpoint_every == 0 or state.step == run.total_steps:
                state.save(ckpt_root, policy, run.opt, cfg.keep_checkpoints, run.identity, "dpo")
            stop_hook(stop_after, state.step, run.total_steps, "dpo")


def evaluate(run: DpoRun, state: TrainState, log: MetricLogger) -> None:
    """DPO loss, rewards and margin on the first cfg.eval_batches batches of train and val (and the val
    accuracy) into state.history and `log`, at state.step."""
    cfg = run.cfg
    tr, va = (evaluate_pairs(run.policy, run.reference, run.pairs[name], cfg.batch_size, run.max_length, cfg.beta,
                             cfg.eval_batches, run.device) for name in ("train", "val"))
    row = {"step": state.step, "dpo_train_loss": tr["loss"], "train_reward_margin": tr["margin"],
           "train_chosen_reward": tr["chosen_reward"], "train_rejected_reward": tr["rejected_reward"],
           "dpo_val_loss": va and va["loss"], "val_reward_margin": va and va["margin"],
           "val_reward_accuracy": va and va["accuracy"], "val_chosen_reward": va and va["chosen_reward"],
           "val_rejected_reward": va and va["rejected_reward"]}
    for k in HISTORY_KEYS:
        state.history[k].append(row[k])
    log({k: v for k, v in row.items() if k != "step" and v is not None}, state.step)


def finish(run: DpoRun, state: TrainState, out_dir: Path) -> tuple[Path, list[Path]]:
    """The final policy (LoRA merged) in out_dir/model, reward_margin.png and history.json."""
    cfg = run.cfg
    merge_if_lora(run.policy, run.wrapped)
    run.policy.eval()
    model_dir = save_model(run.policy, out_dir / "model", extra={
        "tokenizer": "gpt2", "task": "instruct", "stage": "dpo", "prompt_format": run.prompt_format,
        "steps": state.step, "train_mode": cfg.train_mode, "max_length": run.max_length, "beta": cfg.beta,
        "book_compat": run.book})
    artifacts = [plot_margins(state.history, out_dir / "reward_margin.png")]
    atomic_write_text(out_dir / "history.json", json.dumps(state.history, indent=1))
    return model_dir, artifacts


def _last(history: dict, key: str):
    return next((v for v in reversed(history[key]) if v is not None), None)


def _result(run: DpoRun, state: TrainState, timings: dict, artifacts: list[Path], model_dir: Path,
            responses: Path) -> StageResult:
    cfg, h = run.cfg, state.history
    params_total, params_trainable = run.params
    metrics = {**{k: _last(h, k) for k in ("dpo_train_loss", "dpo_val_loss", "train_reward_margin",
                                             "val_reward_margin", "val_reward_accuracy")},
               "val_reward_margin_start": h["val_reward_margin"][0],
               "val_reward_accuracy_start": h["val_reward_accuracy"][0],
               "n_train": len(run.pairs["train"]), "n_val": len(run.pairs["val"]), "n_test": len(run.test),
               "n_dropped": run.n_dropped, "n_responses": timings["n_responses"], "steps": state.step,
               "tokens_seen": state.tokens_seen, "train_seconds": state.train_time,
               "generate_seconds": timings["generate_seconds"], "seconds": timings["seconds"],
               "params_trainable": params_trainable, "params_total": params_total}
    return StageResult(
        metrics={k: float(v) for k, v in metrics.items() if v is not None},
        params={"prompt_format": run.prompt_format, "train_mode": cfg.train_mode, "beta": cfg.beta,
                "max_length": run.max_length, "steps_per_epoch": run.steps_per_epoch,
                "total_steps": run.total_steps, "lora_modules": len(run.wrapped),
                "resumed_from_step": state.resumed_from,
                "device": str(run.device), "threads": torch.get_num_threads()},
        artifacts=artifacts,
        outputs={"model": model_dir, "responses": responses},
    )


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llm.dpo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="preference JSON/JSONL file (instruction, input, output, "
                                                  "chosen, rejected)")
    ap.add_argument("--out", required=True, help="output folder (re-run to resume)")
    ap.add_argument("--base", required=True, help="the instruct model folder (policy and reference start here)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="DpoConfig field")
    a = ap.parse_args(argv)
    try:
        cfg = section_from_overrides(DpoConfig, a.set)
        res = run_dpo(cfg, Path(a.data), Path(a.out), Path(a.base))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"metrics": res.metrics, "outputs": {k: str(v) for k, v in res.outputs.items()}}, indent=2))


if __name__ == "__main__":
    main()

"""Pretraining stage (book chapter 5): one readable recipe from shards to a trained GPT checkpoint.

    from llm.train import run_pretrain
    result = run_pretrain(cfg.pretrain, Path("data/shards"), Path("out/pretrain"))
    result.outputs["checkpoint"]        # out/pretrain/model (model.safetensors + config.json)

    python -m llm.train --config pretrain.json --shards DIR --out DIR   # pretrain.json: a PretrainConfig

The recipe, top to bottom (`train_loop`: `setup`, `resume`, `train`, `finish`):
  1. model: GPTConfig.named(cfg.model.name, **overrides) (or every field given), or cfg.init
     (OpenAI GPT-2 / a HF folder / an llmpipe checkpoint via llm.weights.load_pretrained);
  2. data: llm.shards.TokenWindows over the train/val shards (the book's GPTDatasetV1 windows,
     stride cfg.stride or context_length); each epoch visits the windows in a seeded permutation
     (torch.Generator), so the data position is (epoch, step within the epoch);
  3. AdamW (llm.training.make_adamw), weight decay on 2-D weights only, linear warmup then cosine
     decay to min_lr (or constant), gradient clipping, gradient accumulation;
  4. every eval_every steps: train loss (mean over the steps since the last eval) and val loss
     (over all val windows or eval_batches batches), streamed to `log(metrics, step)`;
  5. every checkpoint_every steps and at the end: out_dir/checkpoints/step-XXXXXX/ (a
     llm.training.TrainState: weights, optimizer, RNG states, data position, tokens seen, loss
     history), written atomically; the last keep_checkpoints are kept. A new run in the same out_dir
     resumes from the newest checkpoint and ends exactly where an uninterrupted run would;
  6. out_dir/model (final weights), loss-vs-tokens plot (the book's figure 5.12), samples.txt.

Devices and speed: dtype "auto" picks bf16 autocast or fp32 (llm.precision.resolve_dtype: bf16 on a
CUDA GPU that has it, on a CPU only for wide models where a cached micro-benchmark shows it faster);
the loss, the residual stream and the LayerNorms stay fp32 under autocast; the choice and why are the
run params `dtype` and `dtype_reason`. compile "auto" compiles on CUDA, or on CPU for runs of at least
1e14 training FLOPs; threads 0 uses the cores this process may use (its CPU affinity).

cfg.book_compat replays the book's loop exactly (`BookReplay`: PyTorch default init, decay on all
parameters, DataLoader shuffles drawn from the global RNG, the book's eval schedule and clipping),
see the `verdict` preset.

Distributed data parallel: with cfg.nproc > 1, run_pretrain launches (llm.ddp.launch)
    python -m torch.distributed.run --standalone --nproc_per_node N -m llm.train --config ... --shards ... --out ...
(gloo on CPU, nccl on GPUs). Every optimizer step consumes batch_size * grad_accum * nproc
windows: the permutation is cut into per-rank micro-batches (repeating windows when there are
fewer than one global batch), gradients are averaged, rank 0 writes checkpoints and artifacts
and streams metrics back to the parent through out_dir/.ddp/events.jsonl. Multi-node: on each
node run (out_dir and the shards on a shared filesystem)
    torchrun --nnodes 2 --node_rank R --nproc_per_node G --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 --rdzv_id JOB -m llm.train --config pretrain.json --shards DIR --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from pydantic import ValidationError
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from llm import ddp
from llm.checkpoint import save_model
from llm.config import ConfigError, PretrainConfig, format_validation_error, read_yaml_text
from llm.ddp import Dist, Events
from llm.fsutil import atomic_write_text, save_figure
from llm.generate import generate
from llm.model import GPT, GPTConfig
from llm.precision import BF16_CPU_MIN_WIDTH, cpu_bf16_fast, resolve_dtype, use_compile
from llm.pretrain_data import Data, batch_loss, check_train_windows, collate, load_data, load_windows, loss_sums
from llm.pretrain_rules import BookReplay, Rules, book_init_
from llm.procenv import allowed_cores
from llm.result import MetricLogger, StageResult
from llm.tokenizer import get_encoding
from llm.training import TrainState, make_adamw, pick_device, stop_hook, torch_threads
from llm.weights import load_pretrained


# --------------------------------------------------------------------------------------------
# Model and optimizer
# --------------------------------------------------------------------------------------------

def model_config(cfg: PretrainConfig) -> GPTConfig:
    """GPTConfig from the pretrain section: a named base plus overrides, or every field given."""
    fields = cfg.model.model_dump(exclude={"name"}, exclude_none=True)
    if cfg.model.name:
        return GPTConfig.named(cfg.model.name, **fields)
    needed = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    missing = [f for f in needed if f not in fields]
    if missing:
        raise ValueError(f"pretrain.model: without a name, set {', '.join('pretrain.model.' + m for m in missing)}")
    return GPTConfig(**fields)


def build_model(cfg: PretrainConfig) -> GPT:
    """The model to train, right after torch.manual_seed(cfg.seed): cfg.init's weights, or a new GPT."""
    torch.manual_seed(cfg.seed)
    if cfg.init:
        model = load_pretrained(cfg.init, drop_rate=cfg.model.drop_rate or 0.0,
                                context_length=cfg.model.context_length)
        return model.train()
    model = GPT(model_config(cfg))
    if cfg.book_compat:
        book_init_(model, cfg.seed)
    return model


def make_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW with cfg's lr and betas, weight decay on matrices (book_compat: on every parameter); fused
    where torch has it, else foreach."""
    return make_adamw(model, cfg.lr, cfg.weight_decay, betas=tuple(cfg.betas), eps=1e-8,
                      decay_all=cfg.book_compat, foreach=True)


def lr_at(step: int, cfg: PretrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine to min_lr.
    Warmup: lr * (step + 1) / warmup_steps; with cfg.book_compat the book's appendix D instead,
    initial_lr + step * (lr - initial_lr) / warmup_steps (reaching lr at the first step after warmup)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        if cfg.book_compat:
            return cfg.initial_lr + step * (cfg.lr - cfg.initial_lr) / cfg.warmup_steps
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What a pretraining run holds fixed once set up; where it is in training is a TrainState."""

    cfg: PretrainConfig
    d: Dist
    device: torch.device
    model: GPT
    fwd: nn.Module  # what the training step calls: the model, in DDP and/or compiled
    opt: torch.optim.Optimizer
    data: Data
    rules: Rules
    total_steps: int
    tokens_per_step: int
    amp: Optional[torch.dtype]
    amp_reason: str
    compiled: bool
    out_dir: Path
    events: Events
    progress: bool

    @property
    def identity(self) -> dict:
        """What a checkpoint must share with this run to be resumed."""
        return {"model_config": self.model.cfg.to_dict(), "global_batch": self.data.order.global_batch,
                "train_windows": len(self.data.train)}


def train_loop(cfg: PretrainConfig, shard_dir: Path, out_dir: Path, progress: bool = True,
               events: Optional[Events] = None, d: Optional[Dist] = None,
               stop_after: Optional[int] = None) -> dict:
    """Train (or resume) in this process; returns the run summary (rank 0's is authoritative)."""
    d = d or Dist()
    device = pick_device(cfg.device, d.local_rank, "pretrain.device")
    with torch_threads(cfg.threads, d.world if device.type == "cpu" else 1):
        run = setup(cfg, Path(shard_dir), Path(out_dir), device, d, events or Events(None, None), progress)
        st = resume(run)
        train(run, st, stop_after)
        summary = finish(run, st) if d.main else {}
        ddp.barrier(d)
        return summary


def setup(cfg: PretrainConfig, shard_dir: Path, out_dir: Path, device: torch.device, d: Dist, events: Events,
          progress: bool) -> Run:
    """Seeds, model, data, optimizer, precision, compilation, DDP."""
    if cfg.book_compat and d.active:
        raise ValueError("pretrain.book_compat replays the book's single-process loop; set pretrain.nproc: 1")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg).to(device)  # the book seeds right before building the model
    data = load_data(cfg, shard_dir, model.cfg, d)
    total_steps = cfg.epochs * data.order.steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    tokens_per_step = data.order.global_batch * model.cfg.context_length
    opt = make_optimizer(model, cfg)
    amp, amp_reason = choose_dtype(cfg, device, model.cfg.emb_dim, d)
    compiled = use_compile(cfg.compile, device, total_steps * tokens_per_step * model.flops_per_token())
    if device.type == "cuda" and cfg.dtype == "auto":  # TF32 matmuls; an explicit float32 stays exact fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fwd: nn.Module = model
    if d.active:
        fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        fwd = torch.compile(fwd)
    rules = BookReplay(cfg) if cfg.book_compat else Rules(cfg)
    return Run(cfg, d, device, model, fwd, opt, data, rules, total_steps, tokens_per_step, amp, amp_reason,
               compiled, out_dir, events, progress)


def choose_dtype(cfg: PretrainConfig, device: torch.device, width: int, d: Dist) -> tuple[Optional[torch.dtype], str]:
    """resolve_dtype, agreed between DDP ranks: every rank must compute alike, so bf16 only if all chose it."""
    amp, why = resolve_dtype(cfg.dtype, device, width, cfg.book_compat)
    if d.active and cfg.dtype == "auto":
        agreed = ddp.all_agree(amp is not None, d, device)
        if amp is not None and not agreed:
            amp, why = None, why + "; but another DDP rank chose fp32, so fp32"
    return amp, why


def resume(run: Run) -> TrainState:
    """The newest complete checkpoint's state (weights, optimizer and RNGs restored), or a fresh one."""
    st = TrainState.load(run.out_dir / "checkpoints", run.model, run.opt, run.device, run.identity, "pretrain",
                         hint="use a new output folder, or the same model config, data and "
                              "batch_size * grad_accum * nproc", clean=run.d.main)
    return st or TrainState(sums={"loss": 0.0, "count": 0}, extra={"perm_seed": None, "samples": []},
                            history={"step": [], "tokens_seen": [], "train_loss": [], "val_loss": [], "lr": []})


def train(run: Run, st: TrainState, stop_after: Optional[int]) -> None:
    """Optimizer steps until total_steps, with evals, end-of-epoch samples and checkpoints on the way."""
    order, d = run.data.order, run.d
    bar = tqdm(total=run.total_steps, initial=st.step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not (run.progress and d.main))
    speed = Speed()
    perm = None
    run.model.train()
    with contextlib.closing(bar):
        while st.step < run.total_steps:
            if perm is None or st.epoch_step >= order.steps_per_epoch:
                perm = next_epoch(run, st)
            loss, lr = train_step(run, st, perm, speed)
            bar.update(1)
            if run.progress and d.main and (run.device.type == "cpu" or st.step % 10 == 0):  # .item() syncs a GPU
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}", tok_s=f"{speed.rate():,.0f}",
                                refresh=False)
            if run.rules.is_eval(st.step, run.total_steps):
                evaluate_now(run, st, lr, speed, bar)
            if st.epoch_step >= order.steps_per_epoch and d.main:  # the book prints a sample after each epoch
                st.extra["samples"].append(f"epoch {st.epoch + 1} (step {st.step}): " + sample_line(run))
            if st.step % run.cfg.checkpoint_every == 0 or st.step == run.total_steps:
                save(run, st)
            stop_hook(stop_after, st.step, run.total_steps, "pretrain")


def next_epoch(run: Run, st: TrainState) -> torch.Tensor:
    """The permutation of the current epoch (moving on to the next one when the current is done)."""
    if st.epoch_step >= run.data.order.steps_per_epoch:  # the previous epoch is complete
        st.epoch, st.epoch_step, st.extra["perm_seed"] = st.epoch + 1, 0, None
    if st.extra["perm_seed"] is None:
        st.extra["perm_seed"] = run.rules.epoch_seed(st.epoch)
    return run.data.order.permutation(st.extra["perm_seed"])


@dataclass
class Speed:
    """Training tokens per second since the last eval."""

    seconds: float = 0.0
    tokens: int = 0

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train_step(run: Run, st: TrainState, perm: torch.Tensor, speed: Speed) -> tuple[torch.Tensor, float]:
    """One optimizer step over grad_accum micro-batches; returns (last micro-batch loss, lr)."""
    cfg, d, device = run.cfg, run.d, run.device
    t0 = time.perf_counter()
    lr = lr_at(st.step, cfg, run.total_steps)
    for g in run.opt.param_groups:
        g["lr"] = lr
    run.opt.zero_grad(set_to_none=True)
    for micro in range(cfg.grad_accum):
        x, y = collate(run.data.train, run.data.order.micro_batch(perm, st.epoch_step, micro, d.rank), device)
        last = micro == cfg.grad_accum - 1
        with ddp.no_sync(run.fwd) if d.active and not last else contextlib.nullcontext():
            loss = batch_loss(run.fwd, x, y, run.amp)
            (loss / cfg.grad_accum).backward()
        st.sums["loss"] += float(loss.detach()) if device.type == "cpu" else loss.detach()
        st.sums["count"] += 1
    if run.rules.clip(st.step):
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.opt.step()
    st.step += 1
    st.epoch_step += 1
    st.tokens_seen += run.tokens_per_step
    dt = time.perf_counter() - t0
    st.train_time += dt
    speed.seconds += dt
    speed.tokens += run.tokens_per_step
    return loss, lr


def evaluate_now(run: Run, st: TrainState, lr: float, speed: Speed, bar: tqdm) -> None:
    """Train and val loss (averaged over ranks) into the history and the metric stream; resets the sums."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    st.sums["loss"] = float(st.sums["loss"])
    tr = run.rules.train_loss(run, st)
    st.sums = {"loss": 0.0, "count": 0}
    va = None
    if run.data.eval_windows:
        run.rules.before_val()
        idx = list(range(run.data.eval_windows))[run.d.rank::run.d.world]
        sums = loss_sums(run.model, run.data.val, idx, run.cfg.batch_size, run.device, run.amp)
        s, c = ddp.all_reduce_sums(list(sums), run.d, run.device)
        va = s / c
    for key, value in (("step", st.step), ("tokens_seen", st.tokens_seen), ("train_loss", tr), ("val_loss", va),
                       ("lr", lr)):
        st.history[key].append(value)
    metrics = {"train_loss": tr, "tokens_seen": st.tokens_seen, "lr": lr, "tokens_per_sec": speed.rate(),
               **({"val_loss": va} if va is not None else {})}
    if run.d.main:
        run.events.log({k: v for k, v in metrics.items() if v is not None}, st.step)
        if run.progress:
            bar.write(f"step {st.step}/{run.total_steps}: train loss {tr if tr is None else round(tr, 3)}, "
                      f"val loss {va if va is None else round(va, 3)}, lr {lr:.2e}, {speed.rate():,.0f} tokens/s")
    speed.seconds, speed.tokens = 0.0, 0


def save(run: Run, st: TrainState) -> None:
    """A checkpoint of this step (rank 0 writes it, the others wait)."""
    st.sums["loss"] = float(st.sums["loss"])
    if run.d.main:
        path = st.save(run.out_dir / "checkpoints", run.model, run.opt, run.cfg.keep_checkpoints, run.identity,
                       "pretrain", run.device)
        run.events.checkpoint(path, st.step)
    ddp.barrier(run.d)


def sample_line(run: Run) -> str:
    return sample_text(run.model, run.cfg.sample_prompt).replace("\n", " ")


def finish(run: Run, st: TrainState) -> dict:
    """Rank 0: the final weights, plot, samples and history; the run summary (metrics, params, ...)."""
    out_dir, hist, samples = run.out_dir, st.history, st.extra["samples"]
    final = {"train_loss": hist["train_loss"][-1] if hist["train_loss"] else None,
             "val_loss": next((v for v in reversed(hist["val_loss"]) if v is not None), None),
             "tokens_seen": st.tokens_seen,
             "tokens_per_sec": st.tokens_seen / st.train_time if st.train_time > 0 else 0.0,
             "params_total": run.model.num_params(), "params_trainable": run.model.num_params(trainable_only=True),
             "steps": st.step}
    if not samples or not samples[-1].startswith(f"epoch {st.epoch + 1} (step {st.step})"):
        samples.append(f"final (step {st.step}): " + sample_line(run))
    model_dir = save_model(run.model, out_dir / "model", extra={
        "tokenizer": "gpt2", "stage": "pretrain", "steps": st.step, "tokens_seen": st.tokens_seen,
        "train_loss": final["train_loss"], "val_loss": final["val_loss"]})
    artifacts = [plot_losses(hist, run.data.order.steps_per_epoch, out_dir / "loss.png")] if hist["step"] else []
    atomic_write_text(out_dir / "samples.txt", "\n\n".join(samples) + "\n")
    atomic_write_text(out_dir / "history.json", json.dumps(hist, indent=1))
    artifacts += [out_dir / "samples.txt", out_dir / "history.json"]
    return {"metrics": {k: float(v) for k, v in final.items() if v is not None}, "params": run_params(run, st),
            "artifacts": [str(a) for a in artifacts], "outputs": {"checkpoint": str(model_dir)}}


def run_params(run: Run, st: TrainState) -> dict:
    data = run.data
    return {"device": str(run.device), "dtype": str(run.amp or torch.float32).replace("torch.", ""),
            "dtype_reason": run.amp_reason, "compile": run.compiled, "threads": torch.get_num_threads(),
            "world_size": run.d.world, "train_windows": len(data.train), "val_windows": len(data.val),
            "steps_per_epoch": data.order.steps_per_epoch, "total_steps": run.total_steps,
            "global_batch": data.order.global_batch, "resumed_from_step": st.resumed_from,
            **({"val": data.val_note} if data.val_note else {})}


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------

def plot_losses(history: dict, steps_per_epoch: int, path: Path) -> Path:
    """Train and val loss against epochs, with a tokens-seen top axis (the book's figure 5.12)."""
    import matplotlib  # lazy: ~0.5 s to import, needed once at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [s / steps_per_epoch for s in history["step"]]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(epochs, history["train_loss"], label="Training loss")
    val = [(e, v) for e, v in zip(epochs, history["val_loss"]) if v is not None]
    if val:
        ax1.plot(*zip(*val), linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()
    ax2.plot(history["tokens_seen"], history["train_loss"], alpha=0)  # invisible: aligns the top axis
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def sample_text(model: GPT, prompt: str, max_new_tokens: int = 50) -> str:
    """Greedy continuation of `prompt` (the book's generate_and_print_sample)."""
    enc = get_encoding()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
    return prompt + enc.decode(generate(model, ids, max_new_tokens, eos_id=None))


# --------------------------------------------------------------------------------------------
# The stage: in this process, or in cfg.nproc torchrun processes
# --------------------------------------------------------------------------------------------

def _summary_to_result(summary: dict) -> StageResult:
    return StageResult(metrics=summary["metrics"], params=summary["params"],
                       artifacts=[Path(a) for a in summary["artifacts"]],
                       outputs={k: Path(v) for k, v in summary["outputs"].items()})


def run_pretrain(cfg: PretrainConfig, shard_dir: Path, out_dir: Path, progress: bool = True,
                 log: Optional[MetricLogger] = None, on_checkpoint: Optional[Callable[[Path, int], None]] = None,
                 stop_after: Optional[int] = None) -> StageResult:
    """The pretrain stage: train a GPT on the shards, resuming from out_dir/checkpoints if present.

    `stop_after` (tests) raises TrainingInterrupted after that optimizer step, as a kill would."""
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    events = Events(log, on_checkpoint)
    if cfg.nproc > 1:
        return _summary_to_result(launch_ddp(cfg, shard_dir, out_dir, progress, events, stop_after))
    return _summary_to_result(train_loop(cfg, shard_dir, out_dir, progress, events, stop_after=stop_after))


def launch_ddp(cfg: PretrainConfig, shard_dir: Path, out_dir: Path, progress: bool, events: Events,
               stop_after: Optional[int]) -> dict:
    """Run train_loop in cfg.nproc torchrun processes (llm.ddp.launch); returns rank 0's summary."""
    if not cfg.init:  # fail here, not inside torchrun, on data too short to train on
        ctx = model_config(cfg).context_length  # (with cfg.init it is known once the weights are read)
        check_train_windows(load_windows(shard_dir, "train", ctx, cfg.stride or ctx), shard_dir, ctx)
    cfg_file = out_dir / ".ddp" / "config.json"
    cfg_file.parent.mkdir(exist_ok=True)
    atomic_write_text(cfg_file, cfg.model_dump_json())
    args = ["--config", str(cfg_file), "--shards", str(shard_dir), "--out", str(out_dir)]
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cpu and cfg.dtype == "auto" and not cfg.init and model_config(cfg).emb_dim >= BF16_CPU_MIN_WIDTH:
        cpu_bf16_fast()  # measure once here, so every rank reads the same cached answer
    return ddp.launch("llm.train", args + ([] if progress else ["--no-progress"]), cfg.nproc, out_dir / ".ddp",
                      events, {"OMP_NUM_THREADS": str(allowed_cores(cfg.nproc))} if cpu and not cfg.threads else {},
                      stop_after, what="DDP pretraining")


def read_config_file(path: Path) -> PretrainConfig:
    """The PretrainConfig of a JSON/YAML file (the whole file, or its `pretrain:` section); otherwise one
    ConfigError line naming the file and the field (and its line, for a top-level field)."""
    raw, text = read_yaml_text(path)
    try:
        return PretrainConfig.model_validate(raw.get("pretrain", raw))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), text)) from None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="JSON or YAML file holding a PretrainConfig")
    p.add_argument("--shards", required=True, help="shard folder (the shard stage's output)")
    p.add_argument("--out", required=True, help="output folder (checkpoints/, model/, plots)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--events", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        cfg = read_config_file(Path(a.config))
    except ConfigError as e:
        p.exit(2, f"error: {e}\n")
    d = ddp.init_distributed(cfg.device)
    if not d.active and cfg.nproc > 1 and not a.events:
        print(json.dumps(run_pretrain(cfg, Path(a.shards), Path(a.out), progress=not a.no_progress).metrics))
        return 0
    try:
        events = Events(None, None, Path(a.events) if (a.events and d.main) else None)
        summary = train_loop(cfg, Path(a.shards), Path(a.out), not a.no_progress, events, d, a.stop_after)
        if d.main:
            if a.result:
                atomic_write_text(Path(a.result), json.dumps(summary))
            else:
                print(json.dumps(summary["metrics"]))
    finally:
        if d.active:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

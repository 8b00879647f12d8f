"""Distributed data parallel plumbing of the pretrain recipe (llm.train): a torchrun rank's view of the
process group, the channel from rank 0 back to the launching process, and the launcher.

    from llm.ddp import Events, launch
    summary = launch("llm.train", ["--config", cfg_file, "--shards", shards, "--out", out], nproc=2,
                     run_dir=out / ".ddp", events=Events(log, on_checkpoint))

`launch` starts `python -m torch.distributed.run --standalone --nproc_per_node N -m MODULE ARGS
--events F --result R` with llm.procenv.child_env (this checkout first on PYTHONPATH), relays the
metrics and checkpoint notices rank 0 appends to F (JSON lines) to `events` while the ranks run, and
returns the JSON summary rank 0 wrote to R. Inside a rank: `init_distributed()` joins the group (gloo
on CPU, nccl on GPUs), `all_reduce_sums` adds values over ranks, `all_agree` is true when every rank
says yes, `no_sync(fwd)` skips the gradient all-reduce of a micro-batch. No command line of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from llm.procenv import child_env
from llm.result import MetricLogger, log_or_null
from llm.training import TrainingInterrupted


@dataclass
class Dist:
    """This process's place in the torchrun world (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def all_reduce_sums(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """`values` summed over the ranks (as they are when not distributed)."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_agree(yes: bool, d: Dist, device: torch.device) -> bool:
    """True when every rank passes yes (a collective: every rank must call it)."""
    flag = torch.tensor([1.0 if yes else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() != 0.0


def no_sync(fwd: nn.Module) -> ContextManager:
    """DDP's no_sync of `fwd`, also when it is a torch.compile wrapper around the DDP module."""
    return fwd.no_sync() if hasattr(fwd, "no_sync") else getattr(fwd, "_orig_mod", fwd).no_sync()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


class Events:
    """Where metrics and checkpoint notices go: the caller's callbacks, or (DDP rank 0) a JSONL file
    the launching process tails."""

    def __init__(self, log: Optional[MetricLogger], on_checkpoint: Optional[Callable[[Path, int], None]],
                 file: Optional[Path] = None):
        self.log_fn, self.ckpt_fn, self.file = log_or_null(log), on_checkpoint, file

    def _write(self, obj: dict) -> None:
        with open(self.file, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def log(self, metrics: dict, step: int) -> None:
        if self.file:
            self._write({"log": metrics, "step": step})
        else:
            self.log_fn(metrics, step)

    def checkpoint(self, path: Path, step: int) -> None:
        if self.file:
            self._write({"checkpoint": str(path), "step": step})
        elif self.ckpt_fn is not None:
            self.ckpt_fn(path, step)


class EventTail:
    """Reads the complete lines rank 0 appended to its events file since the last call and replays
    them on the launching process's Events."""

    def __init__(self, path: Path, events: Events):
        self.path, self.events, self.offset = path, events, 0

    def relay(self) -> None:
        with open(self.path) as f:
            f.seek(self.offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break
                self.offset += len(line.encode())
                ev = json.loads(line)
                if "log" in ev:
                    self.events.log(ev["log"], ev["step"])
                else:
                    self.events.checkpoint(Path(ev["checkpoint"]), ev["step"])


def launch(module: str, args: list[str], nproc: int, run_dir: Path, events: Events,
           env: Optional[dict[str, str]] = None, stop_after: Optional[int] = None, what: str = "DDP training") -> dict:
    """Run `module` in nproc torchrun processes (the module's main() takes --events, --result and
    --stop-after besides `args`); relay rank 0's events; return its result JSON."""
    run_dir.mkdir(parents=True, exist_ok=True)
    events_file, result_file = run_dir / "events.jsonl", run_dir / "result.json"
    for f in (events_file, result_file):
        f.unlink(missing_ok=True)
    events_file.touch()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args, "--events", str(events_file), "--result", str(result_file)]
    if stop_after is not None:
        cmd += ["--stop-after", str(stop_after)]
    proc = subprocess.Popen(cmd, env=child_env(env))
    tail = EventTail(events_file, events)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            tail.relay()
        tail.relay()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if proc.returncode != 0:
        if stop_after is not None and not result_file.exists():
            raise TrainingInterrupted(f"DDP run stopped after step {stop_after} (test hook)")
        raise RuntimeError(f"{what} ({nproc} processes) failed with exit code {proc.returncode}; see the output above")
    return json.loads(result_file.read_text())

"""Run the spam and instruct stages at the same time, each in a process of its own.

Both stages only need pretrain. They cannot share a process: torch keeps one global RNG (dropout,
shuffles, init) and one thread-count setting, so two finetunes in two threads would not give the
results either gives alone. Here each stage body runs in a child process (`python -m flows.isolate`,
so no script's __main__ is re-run) with its own
share of the machine: a GPU of its own (CUDA_VISIBLE_DEVICES) when there are two, and half of the
CPU cores this process may use (llm.procenv.allowed_cores: its CPU affinity, never the load) each --
the child is pinned to its half of the CPU list (spam the first, instruct the rest), so inside it
allowed_cores() is its share and a stage whose `threads` is 0 (automatic) uses exactly that. The child does only the llm/ work; its metrics and
checkpoint notices come back over a pipe to the stage task, which logs them to MLflow as usual; the
child ends itself if the flow's process dies (no orphan goes on writing the stage's folder).

`orchestration.concurrent_finetunes`: false = one after the other (in the flow's process); true =
concurrently whenever both must run; auto (default) = concurrently when each can have a GPU of its
own or at least 2 CPU cores of its own (4 allowed cores), else one after the other.

    from flows.isolate import finetune_shares
    finetune_shares(cfg)          # None, or {"spam": Share(...), "instruct": Share(...)}
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from flows.server import stop_process
from flows.stages import STAGE_DEFS, StageContext  # not flows.pipeline: no prefect in the stage's process
from llm.config import PipelineConfig
from llm.procenv import allowed_cores, child_env

CONCURRENT = ("spam", "instruct")
MIN_CORES_EACH = 2


@dataclass(frozen=True)
class Share:
    """What one concurrently running stage gets: torch CPU threads and (maybe) one GPU."""

    threads: int
    gpu: Optional[int] = None  # index to expose as the child's only CUDA device; None = as is

    def describe(self) -> str:
        return f"{self.threads} threads" + (f", GPU {self.gpu}" if self.gpu is not None else "")


def finetune_shares(cfg, cores: Optional[int] = None, gpus: Optional[int] = None) -> Optional[dict[str, Share]]:
    """How spam and instruct split the machine when they run together, or None: one after the other."""
    mode = cfg.orchestration.concurrent_finetunes
    if mode is False:
        return None
    if cores is None:
        cores = allowed_cores()
    if gpus is None:
        import torch  # lazy: flows.pipeline imports this module, and a cached run must not import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    half = max(1, cores // 2)
    threads = {"spam": half, "instruct": max(1, cores - half)}
    if gpus >= 2:
        return {s: Share(threads[s], gpu=i) for i, s in enumerate(CONCURRENT)}
    if mode == "auto" and (gpus == 1 or cores < 2 * MIN_CORES_EACH):
        return None  # one GPU or too few cores: concurrency would only make both slower
    return {s: Share(threads[s]) for s in CONCURRENT}


def share_cpus(stage: str, share: Share) -> Optional[list[int]]:
    """The CPUs `stage`'s process is pinned to: of this process's allowed CPUs (sorted), spam takes the
    first share.threads and instruct the last share.threads (so with finetune_shares' split, the two
    halves); None for another stage or where affinity is not supported."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    n = min(share.threads, len(cpus))
    if stage == CONCURRENT[0]:
        return cpus[:n]
    if stage == CONCURRENT[1]:
        return cpus[len(cpus) - n:]
    return None


# --- the child process ------------------------------------------------------------------------------------
# Messages on the pipe: 8-byte little-endian length, then a pickle of a tuple:
#   ("log", metrics, step) | ("checkpoint", path, step) | ("done", StageResult) | ("error", exception, traceback)

def send_msg(out, msg: tuple) -> None:
    data = pickle.dumps(msg)
    out.write(struct.pack("<Q", len(data)) + data)
    out.flush()


def recv_msg(inp) -> Optional[tuple]:
    head = inp.read(8)
    if len(head) < 8:
        return None  # the child closed the pipe (ended)
    (n,) = struct.unpack("<Q", head)
    data = inp.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def _exit_with_parent(parent_pid: int, every: float = 1.0) -> None:
    """A daemon thread that ends this process when the flow's process is gone (killed with -9, say):
    an orphaned finetune would go on writing the stage's .partial folder that the next run resumes."""
    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent_pid:
                os._exit(70)

    threading.Thread(target=watch, name="llmpipe-parent-watch", daemon=True).start()


def _child_main(fd: int) -> None:
    """`python -m flows.isolate FD`: read the job (a pickle) from stdin, run it, report on FD."""
    job = pickle.loads(sys.stdin.buffer.read())
    out = os.fdopen(fd, "wb")
    _exit_with_parent(job["parent_pid"])
    stage, share = job["stage"], job["share"]
    try:
        if job.get("cpus"):  # before torch starts its thread pool: allowed_cores() is now this share
            os.sched_setaffinity(0, job["cpus"])
        import torch  # lazy: after the affinity is set, and flows.pipeline imports this module (no torch there)

        torch.set_num_threads(share.threads)
        cfg = PipelineConfig.model_validate(job["config"])
        section = cfg.section(stage)
        if getattr(section, "threads", None) == 0:  # 0 = auto: this process's share; a number set by hand stays
            section.threads = share.threads
        ctx = StageContext(workdir=Path(job["workdir"]), progress=job["progress"],
                           log=lambda metrics, step: send_msg(out, ("log", dict(metrics), step)),
                           on_checkpoint=lambda path, step: send_msg(out, ("checkpoint", str(path), step)),
                           sources=job["sources"])
        result = STAGE_DEFS[stage].body(cfg, job["upstream"], Path(job["work"]), ctx)
        send_msg(out, ("done", result))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:
            e = RuntimeError(f"{type(e).__name__}: {e}")
        send_msg(out, ("error", e, traceback.format_exc()))
    out.close()


def run_body(stage: str, cfg, upstream: dict, work: Path, ctx, share: Share) -> Any:
    """Run STAGE_DEFS[stage].body in a child process with `share`; returns its StageResult.

    ctx.log and ctx.on_checkpoint are called here (in the caller's thread) as the child reports.
    An exception in the child is raised here (same type and message when it pickles); a child that
    dies without a word (killed, out of memory) is a RuntimeError naming the stage and exit code.
    """
    extra = {}
    if share.gpu is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        extra["CUDA_VISIBLE_DEVICES"] = visible.split(",")[share.gpu] if visible else str(share.gpu)
    env = child_env(extra)  # PYTHONPATH: this checkout's flows/ and llm/ first, installed or not
    job = {"stage": stage, "config": cfg.model_dump(mode="json"), "upstream": upstream, "work": str(work),
           "workdir": str(ctx.workdir), "progress": ctx.progress, "sources": list(ctx.sources), "share": share,
           "parent_pid": os.getpid(), "cpus": share_cpus(stage, share)}
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "flows.isolate", str(w)], stdin=subprocess.PIPE,
                                pass_fds=(w,), env=env)
    finally:
        os.close(w)
    inp = os.fdopen(r, "rb")
    try:
        proc.stdin.write(pickle.dumps(job))
        proc.stdin.close()
        while (msg := recv_msg(inp)) is not None:
            kind = msg[0]
            if kind == "log" and ctx.log is not None:
                ctx.log(msg[1], msg[2])
            elif kind == "checkpoint" and ctx.on_checkpoint is not None:
                ctx.on_checkpoint(Path(msg[1]), msg[2])
            elif kind == "done":
                proc.wait(timeout=120)
                return msg[1]
            elif kind == "error":
                proc.wait(timeout=120)
                exc = msg[1]
                if hasattr(exc, "add_note"):  # shown with --debug; the one-line message stays str(exc)
                    exc.add_note(f"raised in the {stage} stage's process:\n{msg[2]}")
                raise exc
        code = proc.wait()
        raise RuntimeError(f"{stage}: the stage's process ended without a result (exit code {code})")
    finally:
        inp.close()
        stop_process(proc, grace=30)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))

"""Run the spam and instruct stages at the same time, each in a process of its own.

Both stages only need pretrain. They cannot share a process: torch keeps one global RNG (dropout,
shuffles, init) and one thread-count setting, so two finetunes in two threads would not give the
results either gives alone. Here each stage body runs in a spawned child process with its own
share of the machine: a GPU of its own (CUDA_VISIBLE_DEVICES) when there are two, and half of the
free CPU cores each (for a stage whose `threads` is 0, i.e. automatic). The child does only the llm/ work; its metrics and
checkpoint notices come back over a queue to the stage task, which logs them to MLflow as usual.

`orchestration.concurrent_finetunes`: false = one after the other (in the flow's process); true =
concurrently whenever both must run; auto (default) = concurrently when each can have a GPU of its
own or at least 2 CPU cores of its own (4 free cores), else one after the other.

    from flows.isolate import finetune_shares
    finetune_shares(cfg)          # None, or {"spam": Share(...), "instruct": Share(...)}
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import queue as queue_mod
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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
        from llm.tokenizer import free_cores

        cores = free_cores()
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    half = max(1, cores // 2)
    threads = {"spam": half, "instruct": max(1, cores - half)}
    if gpus >= 2:
        return {s: Share(threads[s], gpu=i) for i, s in enumerate(CONCURRENT)}
    if mode == "auto" and (gpus == 1 or cores < 2 * MIN_CORES_EACH):
        return None  # one GPU or too few cores: concurrency would only make both slower
    return {s: Share(threads[s]) for s in CONCURRENT}


# --- the child process ------------------------------------------------------------------------------------

def _child(stage: str, cfg_data: dict, upstream: dict, work: str, ctx_data: dict, share: Share, q) -> None:
    """Runs in the spawned process: the stage body with metrics and checkpoints sent back over q."""
    try:
        import torch

        torch.set_num_threads(share.threads)
        from flows.stages import STAGE_DEFS, StageContext  # not flows.pipeline: no prefect in here
        from llm.config import PipelineConfig

        cfg = PipelineConfig.model_validate(cfg_data)
        section = cfg.section(stage)
        if getattr(section, "threads", None) == 0:  # 0 = auto: this process's share; a number set by hand stays
            section.threads = share.threads
        ctx = StageContext(workdir=Path(ctx_data["workdir"]), progress=ctx_data["progress"],
                           log=lambda metrics, step: q.put(("log", dict(metrics), step)),
                           on_checkpoint=lambda path, step: q.put(("checkpoint", str(path), step)),
                           sources=ctx_data["sources"])
        result = STAGE_DEFS[stage].body(cfg, upstream, Path(work), ctx)
        q.put(("done", pickle.dumps(result)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        try:
            payload = pickle.dumps(e)
            pickle.loads(payload)
        except Exception:
            payload = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
        q.put(("error", payload, traceback.format_exc()))


def run_body(stage: str, cfg, upstream: dict, work: Path, ctx, share: Share) -> Any:
    """Run STAGE_DEFS[stage].body in a spawned process with `share`; returns its StageResult.

    ctx.log and ctx.on_checkpoint are called here (in the caller's thread) as the child reports.
    An exception in the child is raised here (same type and message when it pickles); a child that
    dies without a word (killed, out of memory) is a RuntimeError naming the stage and exit code.
    """
    mp = multiprocessing.get_context("spawn")
    q = mp.Queue()
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if share.gpu is not None:  # the child reads it at start-up (spawn copies the environment then)
        visible = env_before.split(",") if env_before else None
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[share.gpu] if visible else str(share.gpu)
    try:
        proc = mp.Process(target=_child, name=f"llmpipe-{stage}",
                          args=(stage, cfg.model_dump(mode="json"), upstream, str(work),
                                {"workdir": str(ctx.workdir), "progress": ctx.progress, "sources": list(ctx.sources)},
                                share, q))
        proc.start()
    finally:
        if share.gpu is not None:
            if env_before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = env_before
    try:
        while True:
            try:
                msg = q.get(timeout=1.0)
            except queue_mod.Empty:
                if not proc.is_alive():
                    try:  # it may have reported just before exiting
                        msg = q.get(timeout=1.0)
                    except queue_mod.Empty:
                        raise RuntimeError(f"{stage}: the stage's process ended without a result "
                                           f"(exit code {proc.exitcode})") from None
                else:
                    continue
            kind = msg[0]
            if kind == "log" and ctx.log is not None:
                ctx.log(msg[1], msg[2])
            elif kind == "checkpoint" and ctx.on_checkpoint is not None:
                ctx.on_checkpoint(Path(msg[1]), msg[2])
            elif kind == "done":
                proc.join(timeout=60)
                return pickle.loads(msg[1])
            elif kind == "error":
                proc.join(timeout=60)
                exc = pickle.loads(msg[1])
                if hasattr(exc, "add_note"):  # shown with --debug; the one-line message stays str(exc)
                    exc.add_note(f"raised in the {stage} stage's process:\n{msg[2]}")
                raise exc
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        q.close()

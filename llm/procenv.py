"""Process facts shared by every stage: how many CPU cores this process may use, and the environment
a child process (torchrun ranks, an isolated finetune) starts with. No torch import, so the data
stages and the CLI can use it cheaply.

    from llm.procenv import allowed_cores, child_env
    torch.set_num_threads(cfg.threads or allowed_cores())
    subprocess.Popen(cmd, env=child_env({"OMP_NUM_THREADS": "2"}), preexec_fn=die_with_parent())

`threads: 0` in a config means `allowed_cores()`: the cores this process is allowed to run on
(`os.sched_getaffinity`), split evenly between `nproc` processes. It is never a function of the
current load, so a run's speed and its last bits do not depend on what else the machine did in the
last minute; pin a process to fewer cores (`taskset`, cgroups, a parent's affinity) to give it fewer.
"""
from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path
from typing import Callable, Optional

ROOT = str(Path(__file__).resolve().parent.parent)  # this checkout's llm/ and flows/, installed or not


def allowed_cores(nproc: int = 1) -> int:
    """Cores this process may run on (its CPU affinity), shared evenly by `nproc` processes; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, nproc))


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """os.environ for a child Python process that must import this checkout's llm/ and flows/ first
    (PYTHONPATH gets the checkout root in front), plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A subprocess `preexec_fn`: the child gets `sig` when the process that started it dies (Linux
    prctl PR_SET_PDEATHSIG; nothing elsewhere), so no server or helper outlives the run that started it."""
    def preexec() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no glibc here
            pass

    return preexec

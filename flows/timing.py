"""Where a command's time goes: named phases, summed, printed when LLMPIPE_TIMINGS=1.

    from flows import timing
    with timing.phase("import_prefect"):
        import prefect
    timing.report()          # stderr: llmpipe-timings {"import_prefect": 1.61, ...}  (only with LLMPIPE_TIMINGS=1)

benchmarks/rerun.py reads that line to show what a cached re-run spends its seconds on.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Iterator

T0 = time.perf_counter()
PHASES: dict[str, float] = {}
_LOCK = threading.Lock()


def add(name: str, seconds: float) -> None:
    with _LOCK:
        PHASES[name] = PHASES.get(name, 0.0) + seconds


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - t)


def timed(name: str):
    """Decorator: add every call's duration to phase `name`."""
    def wrap(fn):
        def inner(*a, **k):
            with phase(name):
                return fn(*a, **k)
        inner.__name__, inner.__doc__, inner.__wrapped__ = fn.__name__, fn.__doc__, fn
        return inner
    return wrap


def report() -> None:
    if os.environ.get("LLMPIPE_TIMINGS") != "1":
        return
    total = time.perf_counter() - T0
    out = {k: round(v, 3) for k, v in PHASES.items()}
    out["in_python_after_cli_import"] = round(total, 3)
    print("llmpipe-timings " + json.dumps(out), file=sys.stderr, flush=True)

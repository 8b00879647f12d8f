"""MLflow tracking in a side process, so `llmpipe run` does not wait for MLflow to import.

Importing MLflow and opening its SQLite store costs ~2.4 s of CPU, Prefect ~1.3 s, and a fully
cached run of the whole pipeline does little else. In one process the two imports run one after the
other (the GIL); here the Tracker lives in a child process started first thing
(`python -m flows.trackproc WORKDIR EXPERIMENT`), which imports MLflow and connects on the second
core while the main process imports Prefect. The main process talks to it through a `TrackerProxy`:
every Tracker method (and `client.<method>`) is forwarded by name with pickled arguments over a
pipe and its result or exception comes back; `metric_logger` stays local and sends plain rows.

The child ends when the pipe closes (the run finished) and, through PR_SET_PDEATHSIG, when the main
process dies, even by kill -9. `LLMPIPE_TRACKER_PROCESS=0` keeps the Tracker in-process.

    from flows.trackproc import start_side_tracker
    start_side_tracker(Path("."))       # then flows.tracking.get_tracker(Path(".")) returns the proxy
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from flows import timing, tracking
from flows.isolate import recv_msg, send_msg
from flows.tracking import BatchedMetricLogger, Tracker
from llm.procenv import child_env, die_with_parent


def _recv(inp) -> Any:
    """flows.isolate's framing (8-byte length + pickle); a closed pipe is EOFError here."""
    msg = recv_msg(inp)
    if msg is None:
        raise EOFError("the tracking process closed its pipe")
    return msg


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class _Attr:
    """`proxy.client.search_runs(...)`: a forwarded attribute path."""

    def __init__(self, proxy: "TrackerProxy", path: str):
        self._proxy, self._path = proxy, path

    def __getattr__(self, name: str) -> Any:
        return _Attr(self._proxy, f"{self._path}.{name}")

    def __call__(self, *args, **kwargs) -> Any:
        return self._proxy._call(self._path, args, kwargs)


class TrackerProxy:
    """Looks like flows.tracking.Tracker; the real one runs in the child process."""

    def __init__(self, workdir: Path, experiment: str):
        self.workdir = Path(workdir)
        self._proc = subprocess.Popen([sys.executable, "-m", "flows.trackproc", str(self.workdir), experiment],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(),
                                      preexec_fn=die_with_parent(signal.SIGKILL))
        self._lock = threading.Lock()
        self._hello: Optional[dict] = None

    def _ready(self) -> dict:
        if self._hello is None:
            with timing.phase("wait_for_mlflow_process"):
                try:
                    hello = _recv(self._proc.stdout)
                except EOFError:
                    raise RuntimeError(f"MLflow: the tracking process exited with code {self._proc.wait()}") from None
            if isinstance(hello, BaseException):
                raise hello
            self._hello = hello
            timing.add("mlflow_import_and_connect (side process)", hello["seconds"])
        return self._hello

    def _call(self, path: str, args: tuple, kwargs: dict) -> Any:
        self._ready()
        with self._lock, timing.phase("mlflow_calls"):
            send_msg(self._proc.stdin, (path, args, kwargs))
            ok, value = _recv(self._proc.stdout)
        if ok:
            return value
        raise value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in ("uri", "experiment_id"):
            return self._ready()[name]
        if name == "metric_logger":
            return lambda run_id, flush_every=5.0, max_buffer=500: BatchedMetricLogger(self, run_id, flush_every,
                                                                                        max_buffer)
        return _Attr(self, name)

    def close(self) -> None:
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def start_side_tracker(workdir: Path, experiment: Optional[str] = None) -> Any:
    """Start the tracking process for `workdir` and register it where get_tracker finds it."""
    experiment = experiment or tracking.EXPERIMENT
    if os.environ.get("LLMPIPE_TRACKER_PROCESS", "1") == "0":
        return tracking.warm_up(workdir)
    key = (str(Path(workdir).resolve()), tracking.tracking_uri(Path(workdir)), experiment)
    with tracking._TRACKERS_LOCK:
        if key not in tracking._TRACKERS:
            tracking._TRACKERS[key] = TrackerProxy(Path(workdir), experiment)
        return tracking._TRACKERS[key]


def _serve(workdir: str, experiment: str) -> None:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed goes to stderr, never into the pipe
    t = time.perf_counter()
    try:
        tracker = Tracker(Path(workdir), experiment)
        send_msg(out, {"uri": tracker.uri, "experiment_id": tracker.experiment_id, "seconds": time.perf_counter() - t})
    except Exception as e:  # reported to the caller at its first call
        send_msg(out, _picklable(e))
        return
    while True:
        try:
            path, args, kwargs = _recv(inp)
        except EOFError:
            return
        try:
            target: Any = tracker
            for part in path.split("."):
                target = getattr(target, part)
            send_msg(out, (True, target(*args, **kwargs)))
        except Exception as e:
            send_msg(out, (False, _picklable(e)))


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])

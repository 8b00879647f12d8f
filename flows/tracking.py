"""MLflow tracking for llmpipe: the store, parent/child runs, batched metrics, artifacts.

The default store is a SQLite database under ./mlruns with artifacts beside it
(``sqlite:///<workdir>/mlruns/mlflow.db`` + ``<workdir>/mlruns/artifacts``); the
MLFLOW_TRACKING_URI environment variable overrides it (e.g. a remote tracking server).
Everything goes through an explicit ``MlflowClient`` (not the fluent, thread-local API), so
stage tasks running in Prefect worker threads log to the right run.

Open the UI on the default store:

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns/artifacts
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from flows import timing

EXPERIMENT = "llmpipe"
MAX_PARAM_LEN = 6000


def default_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{(Path(workdir) / 'mlruns' / 'mlflow.db').resolve()}"


def tracking_uri(workdir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def git_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid
    it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Tags that let a later llmpipe tell whether the process that owns a RUNNING run still lives."""
    return {"llmpipe.pid": str(os.getpid()), "llmpipe.host": socket.gethostname(),
            "llmpipe.pid_start": _proc_start(os.getpid())}


def mark_dead_runs(tracker: "Tracker") -> list[str]:
    """Mark KILLED every RUNNING run of this host whose process is gone (a kill -9, a crash, a reboot).

    Runs from other hosts are left alone: their process cannot be checked from here."""
    host = socket.gethostname().replace("'", "")
    try:
        runs = tracker.client.search_runs([tracker.experiment_id], filter_string=(
            f"attributes.status = 'RUNNING' and tags.`llmpipe.host` = '{host}'"), max_results=1000)
    except Exception as e:  # a tracking server without search support must not stop the pipeline
        logging.getLogger("llmpipe").debug("could not look for dead runs: %s", e)
        return []
    dead = []
    for r in runs:
        try:
            pid = int(r.data.tags.get("llmpipe.pid", ""))
        except ValueError:
            continue
        if _proc_start(pid) != r.data.tags.get("llmpipe.pid_start", "?") or not Path(f"/proc/{pid}").exists():
            tracker.client.set_terminated(r.info.run_id, status="KILLED")
            dead.append(r.info.run_id)
    return dead


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_TRACKERS: dict[tuple[str, str, str], "Tracker"] = {}
_TRACKERS_LOCK = threading.Lock()


def get_tracker(workdir: Path, experiment: str = EXPERIMENT) -> "Tracker":
    """A Tracker per (workdir, tracking URI, experiment) in this process: connecting to the store
    and checking its schema costs seconds, so every stage of a run shares one."""
    key = (str(Path(workdir).resolve()), tracking_uri(Path(workdir)), experiment)
    with _TRACKERS_LOCK:
        if key not in _TRACKERS:
            with timing.phase("mlflow_import_and_connect"):
                _TRACKERS[key] = Tracker(Path(workdir), experiment)
        return _TRACKERS[key]


def warm_up(workdir: Path) -> threading.Thread:
    """Connect to the MLflow store in a background thread (overlaps with Prefect's start-up)."""

    def work() -> None:
        try:
            get_tracker(workdir)
        except Exception:  # the real call reports the error
            pass

    t = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
    t.start()
    return t


class Tracker:
    """One MLflow client for a pipeline invocation."""

    def __init__(self, workdir: Path, experiment: str = EXPERIMENT):
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()

        self.workdir = Path(workdir)
        self.uri = tracking_uri(self.workdir)
        if self.uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
            (self.workdir / "mlruns").mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if self.uri == default_tracking_uri(self.workdir):
                artifact_location = (self.workdir / "mlruns" / "artifacts").resolve().as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # created concurrently by another process
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id

    @timing.timed("mlflow_calls")
    def start_run(self, name: str, tags: dict[str, str], parent_run_id: Optional[str] = None) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    @timing.timed("mlflow_calls")
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    @timing.timed("mlflow_calls")
    def log_batch(self, run_id: str, params: Optional[dict[str, Any]] = None,
                  metrics: Optional[dict[str, float]] = None, step: int = 0) -> None:
        """Params and metrics in one store call (one transaction on SQLite)."""
        from mlflow.entities import Metric, Param

        ts = int(time.time() * 1000)
        ps = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(params or {}).items()]
        ms = [Metric(k, float(v), ts, int(step)) for k, v in (metrics or {}).items() if _is_number(v)]
        if len(ps) <= 100 and len(ms) <= 1000:
            self.client.log_batch(run_id, params=ps, metrics=ms)
        else:
            self.log_params(run_id, params or {})
            self.log_metrics(run_id, metrics or {}, step)

    @timing.timed("mlflow_calls")
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if _is_number(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    @timing.timed("mlflow_calls")
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @timing.timed("mlflow_calls")
    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: Optional[str] = None) -> None:
        for p in paths:
            p = Path(p)
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), artifact_path=(artifact_path or p.name))
            elif p.exists():
                self.client.log_artifact(run_id, str(p), artifact_path=artifact_path)

    @timing.timed("mlflow_calls")
    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    @timing.timed("mlflow_calls")
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @timing.timed("mlflow_calls")
    def log_metric_rows(self, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
        """Write (key, value, timestamp ms, step) rows, 1000 per store call."""
        from mlflow.entities import Metric

        items = [Metric(k, v, ts, step) for k, v, ts, step in rows]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def mark_dead_runs(self) -> list[str]:
        return mark_dead_runs(self)

    def metric_logger(self, run_id: str, flush_every: float = 5.0, max_buffer: int = 500) -> "BatchedMetricLogger":
        return BatchedMetricLogger(self, run_id, flush_every, max_buffer)


def _is_number(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f  # drop NaN


class BatchedMetricLogger:
    """Buffers `log(metrics, step)` calls and writes them with log_batch (one row per value is ~5 ms on SQLite).

    Rows are plain (key, value, timestamp ms, step) tuples until the tracker writes them, so the logger
    works the same in front of a Tracker in this process or one in a side process (flows/trackproc.py)."""

    def __init__(self, tracker: Any, run_id: str, flush_every: float, max_buffer: int):
        self.tracker, self.run_id = tracker, run_id
        self.flush_every, self.max_buffer = flush_every, max_buffer
        self.buffer: list[tuple[str, float, int, int]] = []
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, metrics: dict, step: int) -> None:
        ts = int(time.time() * 1000)
        with self.lock:
            self.buffer.extend((k, float(v), ts, int(step)) for k, v in metrics.items() if _is_number(v))
            due = len(self.buffer) >= self.max_buffer or time.monotonic() - self.last_flush >= self.flush_every
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            items, self.buffer = self.buffer, []
            self.last_flush = time.monotonic()
        if items:
            self.tracker.log_metric_rows(self.run_id, items)

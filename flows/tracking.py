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

import contextlib
import fcntl
import importlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from flows import timing
# mlflow is imported inside the methods that use it (deliberately lazy): a fully cached `llmpipe run`
# talks to MLflow through the side process of flows/trackproc.py and never imports it in its main process.

# mlflow is imported inside the methods that use it, deliberately: flows.pipeline imports this module, and a
# fully cached `llmpipe run` talks to MLflow from a side process (flows/trackproc.py) and never imports it here.

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


def reserved_tags(commit: str, source_name: str) -> dict[str, str]:
    """MLflow's own tags: the Source column (command, git commit) of the runs table."""
    tags = {"mlflow.source.name": source_name, "mlflow.source.type": "LOCAL"}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


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


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive lock (flock) beside a SQLite store while it is opened (created, migrated); no-op otherwise."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f".{db.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Tracker:
    """One MLflow client for a pipeline invocation."""

    def __init__(self, workdir: Path, experiment: str = EXPERIMENT):
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()

        self.workdir = Path(workdir)
        self.uri = tracking_uri(self.workdir)
        with _store_lock(self.uri):  # two processes creating one SQLite store race on its schema migrations
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if self.uri == default_tracking_uri(self.workdir):
                artifact_location = (self.workdir / "mlruns" / "artifacts").resolve().as_uri()
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=artifact_location,
                    tags={"mlflow.experimentKind": "custom_model_development"})  # MLflow 3 UI: the runs table
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
    def log_points(self, run_id: str, params: Optional[dict[str, Any]], points: list[tuple[str, float, int]]) -> None:
        """Params and metric points (name, value, step) at several steps in one store call."""
        from mlflow.entities import Metric, Param

        ts = int(time.time() * 1000)
        ps = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(params or {}).items()]
        ms = [Metric(k, float(v), ts, int(step)) for k, v, step in points if _is_number(v)]
        for i in range(0, max(len(ps), 1), 100):
            self.client.log_batch(run_id, params=ps[i:i + 100], metrics=ms if i == 0 else [])

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

    def call(self, func: str, *args, **kwargs) -> Any:
        """Run `module:function(self, *args, **kwargs)` next to the store: in this process, or in the side
        process when the tracker lives there (flows/trackproc.py), so results that are MLflow objects never
        cross the pipe and the caller never imports MLflow."""
        module, name = func.split(":")
        return getattr(importlib.import_module(module), name)(self, *args, **kwargs)

    @timing.timed("mlflow_calls")
    def log_datasets(self, run_id: str, datasets: list[dict]) -> None:
        _log_datasets(self, run_id, datasets)

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

    It remembers each curve's last (step, value) in `curve`, so the stage's end-of-run summary can be
    placed on the curves instead of beside them (see `summary_points`). A second value for a metric at
    a step it already has (a resumed run repeating its last logged step) is dropped: a metric's history
    has at most one point per step. Rows are plain (key, value, timestamp ms, step) tuples until the
    tracker writes them, so the logger works the same in front of a Tracker in this process or one in a
    side process (flows/trackproc.py)."""

    def __init__(self, tracker: Any, run_id: str, flush_every: float, max_buffer: int):
        self.tracker, self.run_id = tracker, run_id
        self.flush_every, self.max_buffer = flush_every, max_buffer
        self.buffer: list = []
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()
        self.curve: dict[str, tuple[int, float]] = {}  # metric -> (last step, last value)
        self._pending: dict[str, int] = {}  # metric -> index of its newest point in the unwritten buffer
        self.listeners: list = []  # callables(metrics, step) told of every point (progress lines, artifacts)

    def __call__(self, metrics: dict, step: int) -> None:
        ts = int(time.time() * 1000)
        step = int(step)
        with self.lock:
            for k, v in metrics.items():
                if not _is_number(v):
                    continue
                v = float(v)
                prev = self.curve.get(k)
                if prev is not None and prev[0] > step:
                    continue  # steps only move forward
                if prev is not None and prev[0] == step:  # same step again: the newer value replaces it
                    i = self._pending.get(k)
                    if i is None:
                        continue  # already written: keep the one point
                    self.buffer[i] = (k, v, ts, step)
                else:
                    self._pending[k] = len(self.buffer)
                    self.buffer.append((k, v, ts, step))
                self.curve[k] = (step, v)
            due = len(self.buffer) >= self.max_buffer or time.monotonic() - self.last_flush >= self.flush_every
        if due:
            self.flush()
        for listener in self.listeners:
            try:
                listener(metrics, step)
            except Exception as e:  # progress reporting must never fail a stage
                logging.getLogger("llmpipe").debug("progress listener failed: %s", e)

    @property
    def last_step(self) -> int:
        return max((s for s, _ in self.curve.values()), default=0)

    def flush(self) -> None:
        with self.lock:
            items, self.buffer = self.buffer, []
            self._pending = {}
            self.last_flush = time.monotonic()
        if items:
            self.tracker.log_metric_rows(self.run_id, items)


# --- the end-of-stage summary on the curves -----------------------------------------------------------------

def summary_points(metrics: dict[str, float], curve: dict[str, tuple[int, float]]) -> list[tuple[str, float, int]]:
    """Where each end-of-stage summary metric goes, as (name, value, step), so that no metric has two
    points at one step and every curve's steps increase:

    - a metric the stage logged as a curve whose last point already holds the summary value: nothing
      (the curve's last point *is* the summary);
    - a metric logged as a curve with a different summary value (e.g. pretrain's overall tokens_per_sec
      beside the per-interval curve): `final_<name>`, at the curve's last step;
    - any other metric: its own name, at the stage's last step (0 when the stage logged no curve).
    """
    last = max((s for s, _ in curve.values()), default=0)
    out = []
    for k, v in metrics.items():
        if not _is_number(v):
            continue
        v = float(v)
        if k in curve:
            step, seen = curve[k]
            if abs(seen - v) <= 1e-9 * max(1.0, abs(v)):
                continue
            out.append((f"final_{k}", v, step))
        else:
            out.append((k, v, last))
    return out


# --- names, links, descriptions --------------------------------------------------------------------------

def short_commit(commit: str) -> str:
    return commit[:7] + ("-dirty" if commit.endswith("-dirty") else "") if commit != "unknown" else "nogit"


def override_pairs(overrides: list[str]) -> dict[str, str]:
    """`--set key.path=value` strings as {key.path: value} (the last one wins, as in the config)."""
    out: dict[str, str] = {}
    for o in overrides:
        k, sep, v = o.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def pipeline_run_name(preset: str, overrides: list[str], commit: str, config_file: Optional[str] = None,
                      name: Optional[str] = None) -> str:
    """`<preset> [<config file>] <overrides> @<short commit>`, e.g. `tiny spam.lr=1e-4 @5157131`;
    `name` (llmpipe run --name) replaces it."""
    if name:
        return name
    parts = [preset]
    if config_file:
        parts.append(Path(config_file).name)
    parts += [f"{k}={v}" for k, v in override_pairs(overrides).items()]
    parts.append(f"@{short_commit(commit)}")
    return " ".join(parts)


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def run_link(experiment_id: str, run_id: str) -> str:
    """A link the MLflow UI resolves within its own page (hash router)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def run_url(tracker: "Tracker", run_id: str) -> str:
    """The run's page: a full URL on a tracking server, else the path of the local store plus the run id."""
    if is_remote(tracker.uri):
        return tracker.uri.rstrip("/") + "/" + run_link(tracker.experiment_id, run_id)
    ui = os.environ.get("LLMPIPE_MLFLOW_UI_URL") or _local_ui_url(tracker.workdir)
    if ui:
        return ui.rstrip("/") + "/" + run_link(tracker.experiment_id, run_id)
    return f"{tracker.uri} run {run_id} (open with `llmpipe ui`)"


def _local_ui_url(workdir: Path) -> str:
    """The URL of the MLflow UI that `llmpipe ui` / `llmpipe server start` runs for this workdir, if it runs."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        return ""
    try:
        info = json.loads((Path(workdir).resolve() / ".llmpipe" / "mlflow.json").read_text())
        os.kill(int(info["pid"]), 0)
        return str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# --- system metrics --------------------------------------------------------------------------------------

class SystemMetrics:
    """MLflow's system metrics monitor (CPU, memory, disk, network; GPU when present) on one run,
    that also logs a sample for runs shorter than its sampling interval.

        with SystemMetrics(tracker, run_id):
            train()
    """

    def __init__(self, tracker: "Tracker", run_id: str, interval: float = 5.0):
        self.tracker, self.run_id, self.interval = tracker, run_id, interval
        self.monitor = None

    def __enter__(self) -> "SystemMetrics":
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval,
                                                tracking_uri=self.tracker.uri)
            self.monitor.start()
        except Exception as e:  # psutil missing, a store without metrics: never fail the stage
            logging.getLogger("llmpipe").debug("no system metrics: %s", e)
            self.monitor = None
        return self

    def __exit__(self, *exc) -> None:
        m = self.monitor
        if m is None:
            return
        try:
            m._shutdown_event.set()
            if m._process is not None:
                m._process.join()
            if m._logging_step == 0:  # shorter than one interval: log what was sampled
                metrics = m.aggregate_metrics()
                if metrics:
                    m.publish_metrics(metrics)
            m.mlflow_logger.flush()
        except Exception as e:
            logging.getLogger("llmpipe").debug("system metrics: %s", e)


# --- dataset inputs ---------------------------------------------------------------------------------------

DIGEST_LEN = 32  # MLflow stores dataset digests in 36 characters: the first 32 hex of the content sha256


def log_datasets(tracker: Any, run_id: str, datasets: list[dict]) -> None:
    """`mlflow.log_input` for each {"name", "path", "sha256", "context"}: the digest is the content hash
    (its first 32 hex digits; the full hash is in the dataset's profile), the source the file or folder.
    Goes through the tracker (which may live in a side process: flows/trackproc.py)."""
    if datasets:
        tracker.log_datasets(run_id, datasets)


def _log_datasets(tracker: "Tracker", run_id: str, datasets: list[dict]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    items = []
    for d in datasets:
        source = json.dumps({"uri": Path(d["path"]).resolve().as_uri()})
        profile = json.dumps({"sha256": d["sha256"], "path": str(d["path"])})
        ds = Dataset(name=d["name"], digest=d["sha256"][:DIGEST_LEN], source_type="local", source=source,
                     profile=profile)
        items.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", d.get("context", "training"))]))
    tracker.client.log_inputs(run_id, datasets=items)

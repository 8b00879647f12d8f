"""Where the data stages do their parallel work: threads in this process, or a Dask cluster.

`orchestration.task_runner` (CLI: `--task-runner`) picks it for the clean and shard stages:

    llmpipe run shard --task-runner dask                                # a local Dask cluster for this run
    llmpipe run shard --task-runner dask --dask-address tcp://host:8786  # an existing cluster's scheduler

With "dask" the cluster comes from prefect-dask's `DaskTaskRunner` (a `distributed.LocalCluster` of
`orchestration.dask_workers` single-threaded worker processes, or the scheduler at
`orchestration.dask_address`). It is started only when a data stage actually runs (a cached run
starts nothing) and closed when the flow ends. clean sends each input file through the
per-document steps on the cluster; shard sends its tokenizer work units there. Deduplication,
ordering and writing stay in the flow's process, so the artifacts are byte-identical to the
default's and the stage cache keys do not depend on the runner. The workers of a remote cluster
need llmpipe installed (the same version) and nothing else: they get text and return tokens.

    from flows.scaleout import DataRunner
    with DataRunner(cfg.orchestration) as runner:
        executor, slots = runner.executor()     # (None, 0) for threads
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from typing import Optional

from llm.config import OrchestrationConfig
from llm.procenv import allowed_cores

log = logging.getLogger("llmpipe")
_ACTIVE: dict[str, "DataRunner"] = {}
_LOCK = threading.Lock()


class DaskUnavailable(RuntimeError):
    pass


class _NoDashboardLink(logging.Filter):
    """prefect-dask announces a dashboard link even when the local cluster has no dashboard."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("The Dask dashboard is available")


class DataRunner:
    """The data stages' executor for one flow run, started on first use."""

    def __init__(self, cfg: OrchestrationConfig):
        self.cfg = cfg
        self._runner = None
        self._executor: Optional[Executor] = None
        self._slots = 0
        self._lock = threading.Lock()
        self.connect_timeout = "20s"  # how long to try reaching orchestration.dask_address

    def executor(self) -> tuple[Optional[Executor], int]:
        """(executor, how many work units it runs at once); (None, 0) means: threads, in this process."""
        if self.cfg.task_runner != "dask":
            return None, 0
        with self._lock:
            if self._executor is None:
                self._start_dask()
            return self._executor, self._slots

    def _start_dask(self) -> None:
        try:
            from prefect_dask import DaskTaskRunner  # lazy: dask is optional and heavy, only for task_runner=dask
        except ImportError:
            raise DaskUnavailable("orchestration.task_runner: dask needs prefect-dask "
                                  "(pip install prefect-dask; it is in llmpipe's dependencies)") from None
        address = self.cfg.dask_address
        if address:
            runner = DaskTaskRunner(address=address, client_kwargs={"timeout": self.connect_timeout})
        else:
            n = self.cfg.dask_workers or allowed_cores()
            runner = DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                                    "dashboard_address": None})
            dask_log = logging.getLogger("prefect.task_runner.dask")
            if not any(isinstance(f, _NoDashboardLink) for f in dask_log.filters):
                dask_log.addFilter(_NoDashboardLink())
        logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger("distributed").level))
        runner.__enter__()
        try:
            client = runner.client
            self._slots = max(1, sum(client.nthreads().values()))
        except BaseException as e:
            runner.__exit__(None, None, None)
            if address:
                raise DaskUnavailable(f"orchestration.dask_address: cannot use the Dask scheduler at {address} "
                                      f"({type(e).__name__}: {e})") from None
            raise
        self._runner = runner
        self._executor = client.get_executor()
        log.info("data stages run on Dask: %s (%d worker threads)", address or "a local cluster", self._slots)

    def close(self) -> None:
        with self._lock:
            if self._runner is not None:
                runner, self._runner, self._executor = self._runner, None, None
                runner.__exit__(None, None, None)

    def __enter__(self) -> "DataRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def register(key: str, runner: DataRunner) -> None:
    """Make the flow run's runner findable by its stage tasks (same process) under `key`."""
    with _LOCK:
        _ACTIVE[key] = runner


def unregister(key: str) -> None:
    with _LOCK:
        _ACTIVE.pop(key, None)


def lookup(key: str, cfg: OrchestrationConfig) -> tuple[DataRunner, bool]:
    """(the runner registered under `key`, False), or (a new one for cfg, True) that the caller
    closes (a stage task run outside the flow)."""
    with _LOCK:
        runner = _ACTIVE.get(key)
    return (runner, False) if runner is not None else (DataRunner(cfg), True)

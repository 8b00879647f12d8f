"""What a stage function in llm/ returns to the orchestration layer (flows/).

Every stage entry point (``run_download``, ``run_clean``, ``run_shard``, ``run_pretrain``,
``run_evaluate``, ``run_spam``, ``run_instruct``, ``run_judge``) writes its files into the
``out_dir`` it is given and returns a ``StageResult``. It never talks to MLflow or Prefect:
flows/ turns the result into MLflow metrics/artifacts and Prefect state. Long stages also
accept ``log=callable(metrics: dict[str, float], step: int)`` to stream metrics while they run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

MetricLogger = Callable[[dict, int], None]


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)  # final scalar metrics
    params: dict[str, object] = field(default_factory=dict)  # extra facts worth an MLflow param
    artifacts: list[Path] = field(default_factory=list)  # files to log to MLflow (plots, tables, ...)
    outputs: dict[str, Path] = field(default_factory=dict)  # named outputs for downstream stages


def null_log(metrics: dict, step: int) -> None:
    """Default `log`: do nothing."""


def log_or_null(log: Optional[MetricLogger]) -> MetricLogger:
    return log if log is not None else null_log

"""What users read about a run: numbers in plain notation, headline metrics, the MLflow description,
progress lines in the Prefect UI, Prefect artifacts, and the terminal summary.

Everything here is presentation; flows/pipeline.py calls it. Prefect and MLflow calls are
best-effort: a missing server never fails a stage.

    python -m flows.report '{"pipeline_run_id": "...", "stages": {...}}'   # print a --json summary as the table
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from flows.tracking import run_link
# prefect is imported inside the functions that use it (deliberately lazy): `llmpipe --help`, `stages`
# and the tracker side process (flows/trackproc.py) use this module without paying Prefect's import.

# prefect is imported inside the functions that use it, deliberately: flows.registry imports this module in the
# MLflow side process (flows/trackproc.py), which must not pay for importing prefect.

log = logging.getLogger("llmpipe")

# 2-4 headline metrics per stage, in the order the terminal summary and the Prefect artifacts show them
HEADLINE_METRICS = {
    "download": ["files_downloaded", "files_skipped", "bytes_downloaded"],
    "clean": ["documents_out", "dropped_too_short", "dropped_duplicate"],
    "shard": ["train_tokens", "val_tokens", "shards"],
    "pretrain": ["train_loss", "val_loss", "tokens_per_sec", "steps"],
    "evaluate": ["val_loss", "val_perplexity"],
    "spam": ["test_accuracy", "test_f1", "val_accuracy"],
    "instruct": ["train_loss", "val_loss", "test_loss", "n_responses"],
    "judge": ["judge_mean_score", "judge_reference_score", "judge_wrong_score", "judge_empty_score"],
    "dpo": ["val_reward_accuracy", "val_reward_margin"],
}
SHORT = {"judge_mean_score": "mean", "judge_reference_score": "reference", "judge_wrong_score": "wrong",
         "judge_empty_score": "empty"}


def fmt(v: Any) -> str:
    """A number in plain notation: 6.3712, 0.0004, 12,345, 97.3 (never 6.37e+00)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if f != f:
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f == int(f) and abs(f) < 1e15:
        return f"{int(f):,}" if abs(f) >= 10000 else str(int(f))
    a = abs(f)
    if a >= 1000:
        return f"{f:,.0f}"
    digits = 3 - int(math.floor(math.log10(a)))  # 4 significant digits
    return f"{f:.{min(digits, 12)}f}".rstrip("0").rstrip(".")


def headline(stage: str, metrics: dict) -> list[tuple[str, float]]:
    """The stage's chosen metrics that it has (judge: mean, reference, wrong, empty; missing ones skipped)."""
    found = [(n, metrics[n]) for n in HEADLINE_METRICS.get(stage, []) if n in metrics][:4]
    return found or [(k, v) for k, v in metrics.items() if k != "stage_seconds"][:3]


def headline_text(stage: str, metrics: dict) -> str:
    return "  ".join(f"{SHORT.get(k, k)} {fmt(v)}" for k, v in headline(stage, metrics))


# --- the terminal summary ---------------------------------------------------------------------------------

def summary_lines(summary: dict, mlflow_url: str = "", prefect_url: str = "") -> list[str]:
    stages = summary["stages"]
    lines = [f"pipeline run {summary['pipeline_run_id']}" + (f"  {summary['name']}" if summary.get("name") else "")]
    for stage, s in stages.items():
        secs = s.get("seconds")
        state = "cached" if s["cached"] else "ran"
        t = f"{secs:7.1f}s" if isinstance(secs, (int, float)) and not s["cached"] else " " * 8
        lines.append(f"  {stage:9s} {state:6s} {t}  {headline_text(stage, s['metrics'])}")
    if mlflow_url:
        lines.append(f"  MLflow:  {mlflow_url}")
    if prefect_url:
        lines.append(f"  Prefect: {prefect_url}")
    return lines


# --- MLflow description ---------------------------------------------------------------------------------

def parent_description(command: str, preset: str, overrides: dict, config_file: Optional[str],
                       summary: dict, experiment_id: str, seconds: dict) -> str:
    """Markdown for the parent run's description (mlflow.note.content)."""
    ran = [s for s, v in summary.items() if not v["cached"]]
    cached = [s for s, v in summary.items() if v["cached"]]
    out = [f"**Command:** `{command}`", "", f"**Preset:** {preset}"]
    if config_file:
        out.append(f"**Config file:** `{config_file}`")
    out.append("**Overrides:** " + (", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "none"))
    out += ["", f"**Ran:** {', '.join(ran) or 'nothing'}  ", f"**Cached:** {', '.join(cached) or 'nothing'}", "",
            "| stage | state | seconds | headline |", "|---|---|---|---|"]
    for s, v in summary.items():
        link = f"[{s}]({run_link(experiment_id, v['run_id'])})"
        state = "cached" if v["cached"] else "ran"
        secs = "" if v["cached"] else fmt(round(seconds.get(s, 0.0), 1))
        out.append(f"| {link} | {state} | {secs} | {headline_text(s, v['metrics'])} |")
    return "\n".join(out) + "\n"


def cached_description(stage: str, producer_run_id: str, producer_name: str, experiment_id: str,
                       artifact_uri: str, artifact_dir: str, model_uri: str = "") -> str:
    out = [f"**Cached.** This `{stage}` stage was re-used, not run: its outputs were produced by run "
           f"[{producer_name or producer_run_id}]({run_link(experiment_id, producer_run_id)}).", "",
           f"- Artifacts (MLflow): `{artifact_uri}`", f"- Artifact folder: `{artifact_dir}`"]
    if model_uri:
        out.append(f"- Model: `{model_uri}` (the same registered version; nothing new registered)")
    return "\n".join(out) + "\n"


# --- Prefect: run logger lines, artifacts ------------------------------------------------------------------

def run_logger() -> logging.Logger:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return log


class ProgressLines:
    """A metric listener that writes one progress line to the Prefect run logger (the task's Logs tab)
    on the first point, then at most every `every` seconds (LLMPIPE_LOG_EVERY, default 10), and
    moves a Prefect progress artifact when the stage's total steps are known."""

    def __init__(self, stage: str, total_steps: Optional[int] = None, every: Optional[float] = None):
        self.stage, self.total = stage, total_steps
        self.every = float(os.environ.get("LLMPIPE_LOG_EVERY", "10")) if every is None else every
        self.logger = run_logger()
        self.last = 0.0
        self.lock = threading.Lock()
        self.artifact_id = None
        self.last_progress = -1.0
        if total_steps:
            try:
                from prefect.artifacts import create_progress_artifact

                self.artifact_id = create_progress_artifact(0.0, key=f"{stage}-progress",
                                                            description=f"{stage}: share of the ~{total_steps} steps done")
            except Exception as e:
                log.debug("no progress artifact: %s", e)

    def __call__(self, metrics: dict, step: int) -> None:
        now = time.monotonic()
        with self.lock:
            if self.last and now - self.last < self.every:
                return
            self.last = now
        where = f"step {step}/{self.total}" if self.total else f"step {step}"
        self.logger.info("%s %s: %s", self.stage, where,
                         ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items()))
        self.progress(min(1.0, step / self.total) if self.total else None)

    def progress(self, share: Optional[float]) -> None:
        if self.artifact_id is None or share is None or share - self.last_progress < 0.01:
            return
        self.last_progress = share
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, round(100 * share, 1))
        except Exception as e:
            log.debug("progress artifact: %s", e)

    def done(self) -> None:
        self.last_progress = -1.0
        self.progress(1.0)


def estimated_pretrain_steps(cfg, shard_dir: Path) -> Optional[int]:
    """About how many optimizer steps pretrain takes (for the progress artifact; from the manifest)."""
    try:
        p = cfg.pretrain
        if p.init:
            return p.max_steps
        man = json.loads((Path(shard_dir) / "manifest.json").read_text())
        tokens = int(man["splits"]["train"]["tokens"])
        ctx = p.model.context_length
        windows = max(0, (tokens - 1) // (p.stride or ctx))
        per_epoch = max(1, math.ceil(windows / (p.batch_size * p.grad_accum * max(1, p.nproc))))
        total = p.epochs * per_epoch
        return min(total, p.max_steps) if p.max_steps else total
    except Exception:
        return cfg.pretrain.max_steps if getattr(cfg, "pretrain", None) else None


def stage_markdown(stage: str, state: str, metrics: dict, artifact_dir: str, run_id: str, mlflow_url: str,
                   seconds: float, model_uri: str = "") -> str:
    rows = "\n".join(f"| {k} | {fmt(v)} |" for k, v in metrics.items() if k != "stage_seconds")
    out = [f"# {stage}: {state} in {fmt(round(seconds, 1))} s", "",
           f"**Artifact folder:** `{artifact_dir}`  ", f"**MLflow run:** {mlflow_url or run_id}  "]
    if model_uri:
        out.append(f"**Model:** `{model_uri}`  ")
    out += ["", "| metric | value |", "|---|---|", rows]
    return "\n".join(out) + "\n"


def prefect_markdown(stage: str, markdown: str) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=f"{stage}-summary", description=f"{stage}: what ran and its metrics")
    except Exception as e:
        log.debug("no markdown artifact for %s: %s", stage, e)


def prefect_summary_table(summary: dict) -> None:
    rows = []
    for stage, s in summary["stages"].items():
        rows.append({"stage": stage, "state": "cached" if s["cached"] else "ran",
                     "seconds": "" if s["cached"] else fmt(round(s.get("seconds", 0.0), 1)),
                     "headline": headline_text(stage, s["metrics"]), "mlflow_run": s["run_id"],
                     "artifact_dir": s["artifact_dir"]})
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(rows, key="llmpipe-summary", description="llmpipe: every stage of this run")
    except Exception as e:
        log.debug("no summary table artifact: %s", e)


def prefect_flow_run_url(flow_run_id: str) -> str:
    api = os.environ.get("PREFECT_API_URL", "")
    if not api or not flow_run_id:
        return ""
    return api.rstrip("/").removesuffix("/api") + f"/runs/flow-run/{flow_run_id}"


if __name__ == "__main__":
    print("\n".join(summary_lines(json.loads(sys.argv[1]))))

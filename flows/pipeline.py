"""The llmpipe Prefect flow: one task per stage, content-keyed caching, MLflow parent/child runs.

    from flows.pipeline import pipeline
    summary = pipeline(stages=["shard"], preset="tiny", overrides=["download.mirror=../shared/data"])

or from the shell: `llmpipe run [STAGE ...] --preset tiny`.

How a stage runs (see flows/stages.py for the stages themselves):
1. The flow computes the stage's cache key from its config section, the content hashes of the
   upstream outputs it reads and the version of its code (flows/cache.py). The Prefect task's
   `cache_key_fn` returns that key; Prefect persists each task's result (a small JSON record of
   paths, hashes and metrics) under data/cache/prefect, so an unchanged stage is not run again.
2. If the stage's artifacts for that key are missing or incomplete, or `--force` names it, the
   task is called with `refresh_cache=True` and runs.
3. A running stage writes into `<root>/<key>.partial/` and the folder is renamed to `<root>/<key>/`
   only when complete (resumable stages — pretrain, spam, instruct — resume from a crashed .partial).
4. spam and instruct, when both must run and orchestration.concurrent_finetunes allows it, are
   submitted together, each running its llm/ call in a process of its own (flows/isolate.py);
   clean and shard do their parallel work on orchestration.task_runner (flows/scaleout.py).
5. Every stage of every invocation gets an MLflow child run under the invocation's parent run,
   tagged stage, cache_key, cached, prefect.flow_run_id, git_commit; a cached stage's child run
   carries `cached_from_run_id` and the producing run's metrics.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from prefect import flow, task

from flows import scaleout
from flows.cache import hash_path, stage_key
from flows.isolate import finetune_shares
from flows.stages import (STAGE_DEFS, StageContext, extra_input_hashes, needed_sources, plan, source_entries_hash,
                          sources_file)
from flows.tracking import get_tracker, git_commit
from llm.config import STAGES, PipelineConfig, load_config

MARKER = ".llmpipe-stage.json"
DATA_STAGES = ("clean", "shard")  # the stages orchestration.task_runner applies to
HEADLINE = {
    "pretrain": {"train_loss": "pretrain_train_loss", "val_loss": "pretrain_val_loss",
                 "tokens_per_sec": "pretrain_tokens_per_sec"},
    "evaluate": {"val_loss": "val_loss", "val_perplexity": "val_perplexity"},
    "spam": {"test_accuracy": "test_accuracy", "test_f1": "test_f1"},
    "judge": {"judge_mean_score": "judge_mean_score", "judge_reference_score": "judge_reference_score",
              "judge_empty_score": "judge_empty_score", "judge_wrong_score": "judge_wrong_score"},
}
log = logging.getLogger("llmpipe")


# --- keys, folders, completeness -------------------------------------------------------------------

def input_hashes(stage: str, cfg: PipelineConfig, upstream: dict[str, dict], sources: list[str],
                 workdir: Path) -> dict[str, str]:
    hashes = {f"{up}.{name}": upstream[up]["output_hashes"][name] for up, name in STAGE_DEFS[stage].reads(cfg)}
    hashes.update(extra_input_hashes(stage, cfg))
    if stage == "download":
        hashes["sources"] = source_entries_hash(sources, sources_file(cfg, workdir))
    return hashes


def section_for_key(stage: str, cfg: PipelineConfig, sources: list[str]) -> dict:
    section = cfg.section(stage).model_dump(mode="json")
    if stage == "download":  # where files come from does not change what they are (sha256 pinned)
        section = {"sources": sources, "accept_changed": section["accept_changed"]}  # + pinned entries (inputs)
    if stage == "pretrain":
        section.pop("threads", None)  # the thread count changes the weights at most in the last bits
    if stage == "shard":
        section.pop("workers", None)  # how many tokenize does not change the shards at all
    return section


def _key_fn(context: Any, params: dict[str, Any]) -> str:
    """Prefect cache_key_fn: the stage's content key (no per-run values)."""
    return f"{params['stage']}-{stage_key(params['stage'], params['section'], params['input_hashes'])}"


def artifact_dir(workdir: Path, stage: str, key: str) -> Path:
    root = workdir / STAGE_DEFS[stage].out_root
    return root if stage == "download" else root / key[:16]


def marker_path(workdir: Path, stage: str, key: str) -> Path:
    d = artifact_dir(workdir, stage, key)
    return d / f".llmpipe-download-{key[:16]}.json" if stage == "download" else d / MARKER


def is_complete(workdir: Path, stage: str, key: str) -> bool:
    m = marker_path(workdir, stage, key)
    try:
        rec = json.loads(m.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if rec.get("key") != key:
        return False
    base = artifact_dir(workdir, stage, key)
    for rel, size in rec.get("output_sizes", {}).items():
        p = base / rel
        if not p.exists() or (p.is_file() and p.stat().st_size != size):
            return False
    return True


def _relocate(paths: dict[str, Any], src: Path, dst: Path) -> dict[str, str]:
    out = {}
    for name, p in paths.items():
        p = Path(p)
        try:
            out[name] = str(dst / p.relative_to(src))
        except ValueError:
            out[name] = str(p)
    return out


# --- the task ------------------------------------------------------------------------------------------

def _emit(event: str, resource_id: str, payload: dict, workdir: Optional[Path] = None) -> None:
    try:
        from prefect.events import emit_event

        resource = {"prefect.resource.id": resource_id}
        if workdir is not None:  # lets a trigger match one project when several share a server
            resource["llmpipe.workdir"] = str(workdir)
        emit_event(event=event, resource=resource, payload=payload)
    except Exception as e:  # events are best-effort: a missing server must not fail training
        log.debug("could not emit %s: %s", event, e)


@contextlib.contextmanager
def _stage_lock(path: Path):
    """An exclusive lock (flock) so two processes never build the same stage folder at once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _record_info(workdir: Path, stage: str, key: str, nonce: str) -> dict:
    rec = json.loads(marker_path(workdir, stage, key).read_text())
    base = artifact_dir(workdir, stage, key)
    return {"stage": stage, "key": key, "artifact_dir": str(base),
            "outputs": {k: str(base / v) for k, v in rec["outputs"].items()}, "output_hashes": rec["output_hashes"],
            "metrics": rec["metrics"], "run_id": rec["run_id"], "nonce": nonce, "flow_run_id": ""}


def _run_stage_body(stage: str, section: dict, input_hashes: dict, run: dict) -> dict:
    """The body of every stage task: under the stage folder's lock, reuse what another process
    finished meanwhile (unless forced), else run the stage."""
    workdir = Path(run["workdir"])
    key = stage_key(stage, section, input_hashes)
    root = workdir / STAGE_DEFS[stage].out_root
    with _stage_lock(root / f".{stage}-{key[:16]}.lock"):
        if not run.get("forced") and is_complete(workdir, stage, key):
            return _record_info(workdir, stage, key, nonce="completed-by-another-run")
        return _execute_stage(stage, section, input_hashes, run, key)


def _execute_stage(stage: str, section: dict, input_hashes: dict, run: dict, key: str) -> dict:
    """MLflow child run around the stage's llm/ call; the folder appears only when complete."""
    from prefect.runtime import flow_run

    cfg = PipelineConfig.model_validate(run["config"])
    workdir = Path(run["workdir"])
    final = artifact_dir(workdir, stage, key)
    work = final if stage == "download" else final.with_name(final.name + ".partial")
    tracker = get_tracker(workdir)
    flow_run_id = str(flow_run.id or "")
    tags = {"stage": stage, "cache_key": key, "cached": "false", "prefect.flow_run_id": flow_run_id,
            "git_commit": run["git_commit"], "artifact_dir": str(final), "pipeline_run_id": run["parent_run_id"]}
    if stage in DATA_STAGES:
        tags["task_runner"] = cfg.orchestration.task_runner
    if run.get("share"):
        tags["concurrent_with"] = run["concurrent_with"]
        tags["process_share"] = ", ".join(f"{k}={v}" for k, v in run["share"].items() if v is not None)
    run_id = tracker.start_run(stage, tags, parent_run_id=run["parent_run_id"])
    data_runner, own_runner = scaleout.lookup(run["nonce"], cfg.orchestration)
    try:
        tracker.log_params(run_id, section)
        tracker.log_text(run_id, json.dumps({"stage": stage, "config": section, "inputs": input_hashes}, indent=2),
                         "resolved_config.json")
        if stage != "download" and not STAGE_DEFS[stage].resumable:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        metric_log = tracker.metric_logger(run_id)

        def on_checkpoint(path: Path, step: int) -> None:
            metric_log.flush()
            _emit("llmpipe.checkpoint.saved", f"llmpipe.stage.{stage}",
                  {"path": str(path), "step": step, "cache_key": key, "run_id": run_id}, workdir)

        ctx = StageContext(workdir=workdir, progress=run["progress"], log=metric_log, on_checkpoint=on_checkpoint,
                           sources=run["sources"], data_runner=data_runner)
        t0 = time.time()
        if run.get("share"):  # running beside another stage: in a process of its own (flows/isolate.py)
            from flows.isolate import Share, run_body

            result = run_body(stage, cfg, run["upstream"], work, ctx, Share(**run["share"]))
        else:
            result = STAGE_DEFS[stage].body(cfg, run["upstream"], work, ctx)
        metric_log.flush()
        seconds = time.time() - t0
        outputs = {k: str(v) for k, v in result.outputs.items()}
        output_hashes = {k: hash_path(v) for k, v in outputs.items()}
        sizes = {}
        for v in outputs.values():
            p = Path(v)
            for f in ([p] if p.is_file() else [x for x in p.rglob("*") if x.is_file()]):
                sizes[str(f.relative_to(work))] = f.stat().st_size
        metrics = {k: float(v) for k, v in result.metrics.items()}
        metrics["stage_seconds"] = seconds
        record = {"stage": stage, "key": key, "run_id": run_id, "outputs": {k: str(Path(v).relative_to(work))
                  for k, v in outputs.items()}, "output_hashes": output_hashes, "output_sizes": sizes,
                  "metrics": metrics, "input_hashes": input_hashes}
        from llm.fsutil import atomic_write_text

        if stage == "download":
            atomic_write_text(marker_path(workdir, stage, key), json.dumps(record, indent=2))
        else:
            atomic_write_text(work / MARKER, json.dumps(record, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        outputs = _relocate(outputs, work, final)
        artifacts = [Path(p) for p in _relocate({str(i): a for i, a in enumerate(result.artifacts)}, work,
                                                final).values()]
        tracker.log_metrics(run_id, metrics)
        if result.params:
            tracker.log_params(run_id, {f"result.{k}": v for k, v in result.params.items()})
        tracker.log_artifacts(run_id, artifacts)
        if run.get("log_models", True) and stage in ("pretrain", "spam", "instruct"):
            for name in ("checkpoint", "classifier", "model"):
                if name in outputs:
                    tracker.log_artifacts(run_id, [Path(outputs[name])], artifact_path="checkpoint")
        if stage == "download" and metrics.get("sources_changed", 0) > 0:
            _emit("llmpipe.source.changed", "llmpipe.stage.download", {"cache_key": key}, workdir)
        _emit("llmpipe.stage.completed", f"llmpipe.stage.{stage}",
              {"cache_key": key, "artifact_dir": str(final), "run_id": run_id, "outputs": outputs}, workdir)
        tracker.end_run(run_id)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    finally:
        if own_runner:
            data_runner.close()
    return {"stage": stage, "key": key, "artifact_dir": str(final), "outputs": outputs,
            "output_hashes": output_hashes, "metrics": metrics, "run_id": run_id, "nonce": run["nonce"],
            "flow_run_id": flow_run_id}


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as e:
        from llm.sources import TransientDownloadError

        return isinstance(e, TransientDownloadError)
    return False


def _make_task(stage: str):
    opts: dict[str, Any] = {}
    if stage == "download":
        opts = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_transient)
    return task(name=stage, cache_key_fn=_key_fn, persist_result=True, result_serializer="json",
                log_prints=True, **opts)(_run_stage_body)


STAGE_TASKS = {s: _make_task(s) for s in STAGES}


# --- the flow ---------------------------------------------------------------------------------------------

def resolve(preset: str, config_file: Optional[str], overrides: list[str], mirror: Optional[str],
            corpus: list[str]) -> PipelineConfig:
    extra = list(overrides)
    if mirror:
        extra.append(f"download.mirror={json.dumps(str(mirror))}")
    if corpus:
        extra.append(f"clean.corpus={json.dumps([str(c) for c in corpus])}")
        extra.append("clean.sources=[]")
    return load_config(preset, config_file, extra)


@flow(name="llmpipe", log_prints=True)
def pipeline(stages: Optional[list[str]] = None, preset: str = "tiny", config_file: Optional[str] = None,
             overrides: Optional[list[str]] = None, mirror: Optional[str] = None,
             corpus: Optional[list[str]] = None, force: Optional[list[str]] = None, workdir: str = ".",
             progress: bool = True) -> dict:
    """Run the llmpipe stages (default: all) with caching and MLflow tracking; returns the summary."""
    from prefect.runtime import flow_run

    requested = list(stages or ["all"])
    cfg = resolve(preset, config_file, list(overrides or []), mirror, list(corpus or []))
    wd = Path(workdir).resolve()
    order = plan(cfg, requested)
    sources = needed_sources(cfg, order, tuple(requested))
    forced = set(force or [])
    if "all" in forced:
        forced = set(order)
    tracker = get_tracker(wd)
    commit = git_commit(Path(__file__).resolve().parent.parent)
    parent = tracker.start_run(f"pipeline-{cfg.preset}", {
        "stage": "pipeline", "prefect.flow_run_id": str(flow_run.id or ""), "git_commit": commit,
        "preset": cfg.preset, "stages": ",".join(order)})
    tracker.log_params(parent, {"preset": cfg.preset, "config_hash": cfg.config_hash(), "git_commit": commit,
                                "stages": ",".join(order), "requested": ",".join(requested),
                                "task_runner": cfg.orchestration.task_runner})
    tracker.log_text(parent, json.dumps(cfg.model_dump(mode="json"), indent=2), "resolved_config.json")
    nonce = uuid.uuid4().hex
    storage = wd / "data" / "cache" / "prefect"
    upstream: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    data_runner = scaleout.DataRunner(cfg.orchestration)
    scaleout.register(nonce, data_runner)

    def prepare(stage: str) -> dict:
        section = section_for_key(stage, cfg, sources)
        hashes = input_hashes(stage, cfg, upstream, sources, wd)
        key = stage_key(stage, section, hashes)
        refresh = stage in forced or not is_complete(wd, stage, key)
        run = {"config": cfg.model_dump(mode="json"), "workdir": str(wd), "parent_run_id": parent,
               "nonce": nonce, "progress": progress, "git_commit": commit, "sources": sources,
               "upstream": {s: upstream[s] for s in STAGE_DEFS[stage].deps(cfg)}, "log_models": True,
               "forced": stage in forced}
        return {"stage": stage, "section": section, "hashes": hashes, "key": key, "refresh": refresh, "run": run,
                "task": STAGE_TASKS[stage].with_options(result_storage=storage, refresh_cache=refresh)}

    def finish(job: dict, info: dict) -> None:
        """After a stage task returned: a child run for a cached stage, the summary, headline metrics."""
        stage, key, section = job["stage"], job["key"], job["section"]
        cached = info["nonce"] != nonce
        if cached:
            info = dict(info)
            info["cached_from_run_id"] = info["run_id"]
            info["run_id"] = tracker.start_run(stage, {
                "stage": stage, "cache_key": key, "cached": "true", "cached_from_run_id": info["run_id"],
                "prefect.flow_run_id": str(flow_run.id or ""), "git_commit": commit,
                "artifact_dir": info["artifact_dir"], "pipeline_run_id": parent}, parent_run_id=parent)
            tracker.log_params(info["run_id"], section)
            tracker.log_metrics(info["run_id"], info["metrics"])
            tracker.end_run(info["run_id"])
        upstream[stage] = info
        summary[stage] = {"run_id": info["run_id"], "cached": cached, "artifact_dir": info["artifact_dir"],
                          "metrics": info["metrics"], "cache_key": key}
        headline = {HEADLINE[stage][m]: v for m, v in info["metrics"].items() if m in HEADLINE.get(stage, {})}
        if headline:
            tracker.log_metrics(parent, headline)

    together: list[str] = []
    prepared: dict[str, dict] = {}  # instruct, looked at beside spam (it does not depend on spam)
    try:
        for stage in order:
            if stage in together:
                continue  # ran beside the other finetune
            job = prepared.pop(stage, None) or prepare(stage)
            jobs = [job]
            if stage == "spam" and "instruct" in order:
                other = prepared["instruct"] = prepare("instruct")
                shares = finetune_shares(cfg) if job["refresh"] and other["refresh"] else None
                if shares:
                    together = ["spam", "instruct"]
                    jobs.append(other)
                    for j, mate in zip(jobs, ("instruct", "spam")):
                        j["run"]["share"] = asdict(shares[j["stage"]])
                        j["run"]["concurrent_with"] = mate
                    print(f"spam and instruct run concurrently, each in its own process: spam "
                          f"{shares['spam'].describe()}; instruct {shares['instruct'].describe()}")
            if len(jobs) == 1:
                infos = [job["task"](stage=stage, section=job["section"], input_hashes=job["hashes"], run=job["run"])]
            else:
                futures = [j["task"].submit(stage=j["stage"], section=j["section"], input_hashes=j["hashes"],
                                            run=j["run"]) for j in jobs]
                for f in futures:
                    f.wait()
                infos = [f.result() for f in futures]  # raises the first failure, after both ended
            for job, info in zip(jobs, infos):
                finish(job, info)
        tracker.log_metrics(parent, {"stages_cached": sum(s["cached"] for s in summary.values()),
                                     "stages_run": sum(not s["cached"] for s in summary.values())})
        tracker.log_params(parent, {"concurrent_finetunes": ",".join(together) or "none"})
        tracker.end_run(parent)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    finally:
        scaleout.unregister(nonce)
        data_runner.close()
    return {"pipeline_run_id": parent, "stages": summary}


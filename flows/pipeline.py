"""The llmpipe Prefect flow: one task per stage, content-keyed caching, MLflow parent/child runs.

    from flows.pipeline import pipeline
    summary = pipeline(stages=["shard"], preset="tiny", overrides=["download.mirror=../shared/data"])

or from the shell: `llmpipe run [STAGE ...] --preset tiny`.

How a stage runs (see flows/stages.py for the stages themselves, flows/cache.py for the cache):
1. The flow computes the stage's cache key from its config section, the content hashes of the
   upstream outputs it reads and the version of its code. The stage's record (flows/cache.py) is the
   only cache: when it exists for that key and its files verify, the stage is re-used; Prefect
   persists no results. The Prefect task run is named after the stage and tagged with its key and
   `cached` or `ran`.
2. Before a stage runs, the upstream outputs it reads are re-hashed in full; one that changed since
   it was recorded makes that upstream stage stale, and it is rebuilt first (never used).
3. A running stage writes into `<root>/<key>.partial/` and the folder is renamed to `<root>/<key>/`
   only when complete (resumable stages, pretrain, spam and instruct, resume from a crashed
   .partial; other stages' .partial folders are removed when they fail, and other keys' when a
   stage finishes). The raw downloads get one record per source, so a command re-uses every source
   that is present and verified and fetches only what is missing.
4. Each stage task is submitted as soon as the stages it needs are done (Prefect futures with
   wait_for), so independent stages (evaluate, spam, instruct) run side by side; bodies that run in
   this process take turns (torch's RNG and thread count are global). spam and instruct, when both
   must run and orchestration.concurrent_finetunes allows it, each run their llm/ call in a process
   of their own (flows/isolate.py) and so truly at the same time; clean and shard do their
   parallel work on orchestration.task_runner (flows/scaleout.py).
5. Every stage of every invocation gets an MLflow child run (named after the stage) under the
   invocation's parent run (named `<preset> <overrides> @<commit>`, or --name), tagged stage, cache_key,
   cached, prefect.flow_run_id, git_commit and MLflow's reserved source tags; a cached stage's child run
   carries `cached_from_run_id`, the producing run's metrics at their steps, a link to its artifacts and
   its model version. Curves keep their real steps; the end-of-stage summary lands on each curve's last
   point or under `final_<name>` (flows/tracking.summary_points). The parent gets every override and
   the flattened, stage-prefixed config as params, a description, and its headline metrics once.
6. pretrain, spam and instruct log their model as an MLflow pyfunc model and register it
   (flows/registry.py); stages that read data log it with `log_input` (content digests); long
   stages get MLflow system metrics; progress lines, markdown/table/progress artifacts go to Prefect
   (flows/report.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows import scaleout
from flows.cache import (StageInfo, artifact_dir, check_stage, describe_outputs, drop_source_records, input_hashes,
                         remove_stale_partials, section_for_key, stage_key, write_record,
                         write_source_records)
from flows.isolate import CONCURRENT, Share, finetune_shares, run_body
from flows.stages import STAGE_DEFS, StageContext, needed_sources, plan, resolve  # noqa: F401 (resolve: re-exported)
from flows import registry, report
from flows.tracking import (SystemMetrics, flatten, get_tracker, git_commit, log_datasets, override_pairs,
                            reserved_tags, pipeline_run_name, process_tags, run_url, summary_points)
from llm.config import PipelineConfig
from llm.fsutil import publish_dir

DATA_STAGES = ("clean", "shard")  # the stages orchestration.task_runner applies to
HEADLINE = {
    "pretrain": {"train_loss": "pretrain_train_loss", "val_loss": "pretrain_val_loss",
                 "tokens_per_sec": "pretrain_tokens_per_sec"},
    "evaluate": {"val_loss": "val_loss", "val_perplexity": "val_perplexity"},
    "spam": {"test_accuracy": "test_accuracy", "test_f1": "test_f1"},
    "judge": {"judge_mean_score": "judge_mean_score", "judge_reference_score": "judge_reference_score",
              "judge_empty_score": "judge_empty_score", "judge_wrong_score": "judge_wrong_score",
              "judge_auc": "judge_auc"},
}
log = logging.getLogger("llmpipe")
COMPUTE = threading.Lock()


class StaleInput(RuntimeError):
    """An upstream output changed on disk after it was recorded (raised before anything reads it)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage


@dataclass
class StageRun:
    """Everything a stage task needs: one typed record instead of a dict of loose keys."""

    stage: str
    key: str
    section: dict
    input_hashes: dict[str, str]
    config: dict  # the resolved PipelineConfig as JSON
    workdir: str
    parent_run_id: str
    git_commit: str
    nonce: str  # this invocation (flows.scaleout registers its data runner under it)
    sources: list[str]
    upstream: dict[str, StageInfo]
    progress: bool = True
    forced: bool = False
    share: Optional[dict] = None  # running beside another stage in a process of its own
    concurrent_with: str = ""
    flow_run_id: str = ""
    source_name: str = "llmpipe"  # mlflow.source.name: the command that started the pipeline

    @property
    def cfg(self) -> PipelineConfig:
        return PipelineConfig.model_validate(self.config)


# --- the task ------------------------------------------------------------------------------------------

def _emit(event: str, resource_id: str, payload: dict, workdir: Optional[Path] = None) -> None:
    try:
        resource = {"prefect.resource.id": resource_id}
        if workdir is not None:  # lets a trigger match one project when several share a server
            resource["llmpipe.workdir"] = str(workdir)
        emit_event(event=event, resource=resource, payload=payload)
    except Exception as e:  # events are best-effort: a missing server must not fail training
        log.debug("could not emit %s: %s", event, e)


@contextlib.contextmanager
def _stage_lock(path: Path):
    """An exclusive lock (flock) so two processes never build the same stage folder at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def verify_inputs(job: StageRun) -> None:
    """Re-hash, in full, every upstream output this stage reads; raise StaleInput on a change."""
    wd = Path(job.workdir)
    cfg = job.cfg
    for up, name in STAGE_DEFS[job.stage].reads(cfg):
        info = job.upstream[up]
        if up == "download":
            reason = check_stage(wd, "download", "", full=True, sources=[name], cfg=cfg)[1]
        else:
            reason = check_stage(wd, up, info.key, full=True)[1]
        if reason:
            raise StaleInput(up, reason)


def run_stage(job: StageRun) -> StageInfo:
    """The body of every stage task: under the stage folder's lock, re-use what another process
    finished meanwhile (unless forced), else verify the inputs and run the stage."""
    wd = Path(job.workdir)
    root = wd / STAGE_DEFS[job.stage].out_root
    with _stage_lock(root / f".{job.stage}-{job.key[:16]}.lock"):
        if not job.forced:
            info, _ = check_stage(wd, job.stage, job.key, sources=job.sources, cfg=job.cfg)
            if info is not None:
                info.cached = True
                return info
        verify_inputs(job)
        return _execute_stage(job)


def _execute_stage(job: StageRun) -> StageInfo:
    """MLflow child run around the stage's llm/ call; the folder appears only when complete."""
    stage, key, cfg, workdir = job.stage, job.key, job.cfg, Path(job.workdir)
    final = artifact_dir(workdir, stage, key)
    work = final if stage == "download" else final.with_name(final.name + ".partial")
    tracker = get_tracker(workdir)
    tags = {"stage": stage, "cache_key": key, "cached": "false", "prefect.flow_run_id": job.flow_run_id,
            "git_commit": job.git_commit, "artifact_dir": str(final), "pipeline_run_id": job.parent_run_id,
            **reserved_tags(job.git_commit, job.source_name), **process_tags()}
    if stage in DATA_STAGES:
        tags["task_runner"] = cfg.orchestration.task_runner
    if job.share:
        tags["concurrent_with"] = job.concurrent_with
        tags["process_share"] = ", ".join(f"{k}={v}" for k, v in job.share.items() if v is not None)
    run_id = tracker.start_run(stage, tags, parent_run_id=job.parent_run_id)
    data_runner, own_runner = scaleout.lookup(job.nonce, cfg.orchestration)
    resumable = STAGE_DEFS[stage].resumable
    try:
        tracker.log_params(run_id, job.section)
        tracker.log_text(run_id, json.dumps({"stage": stage, "config": job.section, "inputs": job.input_hashes},
                                            indent=2), "resolved_config.json")
        if stage == "download":
            drop_source_records(work, job.sources)  # rewritten below once each file is verified again
        elif not resumable:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        log_datasets(tracker, run_id, stage_datasets(job))
        metric_log = tracker.metric_logger(run_id)
        total = None
        if stage == "pretrain" and "shard" in job.upstream:
            total = report.estimated_pretrain_steps(cfg, Path(job.upstream["shard"].outputs.get("shards", ".")))
        progress_lines = report.ProgressLines(stage, total)
        metric_log.listeners.append(progress_lines)

        def on_checkpoint(path: Path, step: int) -> None:
            metric_log.flush()
            _emit("llmpipe.checkpoint.saved", f"llmpipe.stage.{stage}",
                  {"path": str(path), "step": step, "cache_key": key, "run_id": run_id}, workdir)

        ctx = StageContext(workdir=workdir, progress=job.progress, log=metric_log, on_checkpoint=on_checkpoint,
                           sources=job.sources, data_runner=data_runner)
        upstream = {s: info.to_json() for s, info in job.upstream.items()}
        report.run_logger().info("%s: started (cache key %s)", stage, key[:16])
        with SystemMetrics(tracker, run_id) if stage in SYSTEM_METRIC_STAGES else contextlib.nullcontext():
            if job.share:  # running beside another stage: in a process of its own (flows/isolate.py)
                t0 = time.time()
                result = run_body(stage, cfg, upstream, work, ctx, Share(**job.share))
            else:
                with COMPUTE:  # one stage body at a time in this process (torch's RNG and threads are global)
                    t0 = time.time()
                    result = STAGE_DEFS[stage].body(cfg, upstream, work, ctx)
        metric_log.flush()
        progress_lines.done()
        seconds = time.time() - t0
        metrics = {k: float(v) for k, v in result.metrics.items()}
        metrics["stage_seconds"] = seconds
        rel_outputs, files, output_hashes = describe_outputs(work, result.outputs)
        params = {k: str(v) for k, v in result.params.items()}
        if stage == "download":
            write_source_records(work, result.outputs, cfg, workdir, run_id)
        else:
            write_record(workdir, stage, key, {"run_id": run_id, "outputs": rel_outputs, "files": files,
                                               "output_hashes": output_hashes, "metrics": metrics,
                                               "input_hashes": job.input_hashes, "seconds": seconds},
                         base=work)
            publish_dir(work, final)  # fsync the folder's files, rename it into place, fsync the parent
            remove_stale_partials(workdir, stage, key)
        outputs = {k: str(final / v) for k, v in rel_outputs.items()}
        artifacts = [final / Path(a).relative_to(work) if Path(a).is_relative_to(work) else Path(a)
                     for a in result.artifacts]
        last_step = metric_log.last_step
        points: dict[int, dict[str, float]] = {}
        for name, value, step in summary_points(metrics, metric_log.curve):
            points.setdefault(step, {})[name] = value
        for step, batch in sorted(points.items()):
            tracker.log_metrics(run_id, batch, step=step)
        if params:
            tracker.log_params(run_id, {f"result.{k}": v for k, v in params.items()})
        tracker.log_artifacts(run_id, artifacts)
        model_ref = None
        if stage in registry.MODEL_STAGES:
            name = registry.MODEL_OUTPUT[stage]
            if name in outputs:
                tracker.log_artifacts(run_id, [Path(outputs[name])], artifact_path="checkpoint")
                try:
                    model_ref = registry.log_model(tracker, run_id, stage, cfg.preset, Path(outputs[name]), metrics,
                                                   step=last_step)
                    MODEL_REFS[run_id] = model_ref
                except Exception as e:  # e.g. a tracking server without a model registry: keep the trained stage
                    log.warning("%s: could not log or register the model in MLflow: %s", stage, e)
        url = run_url(tracker, run_id)
        report.run_logger().info("%s: done in %s s: %s", stage, report.fmt(round(seconds, 1)),
                                 report.headline_text(stage, metrics))
        report.prefect_markdown(stage, report.stage_markdown(stage, "ran", metrics, str(final), run_id, url, seconds,
                                                             model_ref["uri"] if model_ref else ""))
        if stage == "download" and metrics.get("sources_changed", 0) > 0:
            _emit("llmpipe.source.changed", "llmpipe.stage.download", {"cache_key": key}, workdir)
        _emit("llmpipe.stage.completed", f"llmpipe.stage.{stage}",
              {"cache_key": key, "artifact_dir": str(final), "run_id": run_id, "outputs": outputs}, workdir)
        tracker.end_run(run_id)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        if stage != "download" and not resumable:
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from: leave no empty .partial
        raise
    finally:
        if own_runner:
            data_runner.close()
    return StageInfo(stage=stage, key=key, artifact_dir=str(final), outputs=outputs, output_hashes=output_hashes,
                     metrics=metrics, run_id=run_id, seconds=seconds, params=params)


def stage_datasets(job: StageRun) -> list[dict]:
    """The data a stage reads (upstream outputs and local files), named, with their content hashes."""
    cfg = job.cfg
    context = {"evaluate": "evaluation", "judge": "evaluation"}.get(job.stage, "training")
    out = []
    for up, name in STAGE_DEFS[job.stage].reads(cfg):
        info = job.upstream.get(up)
        if info is None or name not in info.outputs or name in ("checkpoint", "classifier", "model"):
            continue
        label = name if up != "download" else f"raw/{name}"
        out.append({"name": label, "path": info.outputs[name], "sha256": info.output_hashes[name], "context": context})
    for field_name, value in (("spam.source", cfg.spam.source), ("instruct.data", cfg.instruct.data)):
        if job.stage == field_name.split(".")[0] and field_name in job.input_hashes:
            out.append({"name": Path(value).name, "path": value, "sha256": job.input_hashes[field_name],
                        "context": context})
    return out


SYSTEM_METRIC_STAGES = ("pretrain", "spam", "instruct", "judge", "dpo")
MODEL_REFS: dict[str, dict] = {}  # run id -> the registered model version it logged (this process)


STAGE_TASKS = {s: task(name=s, cache_policy=NO_CACHE, persist_result=False, log_prints=True)(run_stage)
               for s in STAGE_DEFS}


# --- the flow ---------------------------------------------------------------------------------------------

def _flow_run_name() -> str:
    """The Prefect flow run's name: the MLflow parent run's name (`tiny spam.lr=1e-4 @5157131`)."""
    p = flow_run.parameters or {}
    if p.get("name"):
        return p["name"]
    return pipeline_run_name(p.get("preset") or "tiny", list(p.get("overrides") or []), checkout_commit(),
                             p.get("config_file"))


def checkout_commit() -> str:
    """The git commit of this llmpipe checkout (for run names and tags)."""
    return git_commit(Path(__file__).resolve().parent.parent)


def config_file_params(path: Optional[str]) -> dict[str, str]:
    """The values a --config file sets, flattened, as `config_file.<key>` params."""
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return {f"config_file.{k}": str(v) for k, v in flatten(data).items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def parent_params(cfg: PipelineConfig, overrides: list[str], config_file: Optional[str]) -> dict[str, str]:
    """What makes a pipeline run differ from another, as parent params: each override
    (`override.spam.lr`), the --config file's values, and the whole resolved config flattened and
    stage-prefixed (`spam.lr`, `pretrain.lr`, ...). Keys stay within MLflow's 250 characters."""
    out = {f"override.{k}": v for k, v in override_pairs(overrides).items()}
    out.update(config_file_params(config_file))
    for k, v in flatten(cfg.model_dump(mode="json")).items():
        out.setdefault(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    return {k: v for k, v in out.items() if len(k) <= 250}


@flow(name="llmpipe", log_prints=True, persist_result=False, flow_run_name=_flow_run_name)
def pipeline(stages: Optional[list[str]] = None, preset: str = "tiny", config_file: Optional[str] = None,
             overrides: Optional[list[str]] = None, mirror: Optional[str] = None,
             corpus: Optional[list[str]] = None, force: Optional[list[str]] = None, workdir: str = ".",
             progress: bool = True, name: Optional[str] = None, command: Optional[str] = None,
             parent_run_id: Optional[str] = None) -> dict:
    """Run the llmpipe stages (default: all) with caching and MLflow tracking; returns the summary.

    `name` names the MLflow parent run and the Prefect flow run (default `<preset> <overrides> @<commit>`);
    `command` is the command line recorded in the run's description; `parent_run_id` nests the
    pipeline run under another MLflow run (a sweep's)."""
    requested = list(stages or ["all"])
    cfg = resolve(preset, config_file, list(overrides or []), mirror, list(corpus or []))
    wd = Path(workdir).resolve()
    order = plan(cfg, requested)
    sources = needed_sources(cfg, order, tuple(requested))
    forced = set(force or [])
    if "all" in forced:
        forced = set(order)
    tracker = get_tracker(wd)
    tracker.mark_dead_runs()
    commit = checkout_commit()
    flow_run_id = str(flow_run.id or "")
    user_overrides = list(overrides or [])
    run_name = pipeline_run_name(cfg.preset, user_overrides, commit, config_file, name)
    command = command or "llmpipe run " + " ".join(requested)
    source_name = " ".join(command.split()[:2])
    parent = tracker.start_run(run_name, {
        "stage": "pipeline", "prefect.flow_run_id": flow_run_id, "git_commit": commit,
        "preset": cfg.preset, "stages": ",".join(order), **reserved_tags(commit, source_name), **process_tags()},
        parent_run_id=parent_run_id)
    tracker.log_params(parent, {"preset": cfg.preset, "config_hash": cfg.config_hash(), "git_commit": commit,
                                "stages": ",".join(order), "requested": ",".join(requested),
                                "task_runner": cfg.orchestration.task_runner, "mirror": str(mirror or ""),
                                **({"config_file": str(config_file)} if config_file else {}),
                                **parent_params(cfg, user_overrides, config_file)})
    tracker.log_text(parent, json.dumps(cfg.model_dump(mode="json"), indent=2), "resolved_config.json")
    nonce = uuid.uuid4().hex
    upstream: dict[str, StageInfo] = {}
    summary: dict[str, dict] = {}
    data_runner = scaleout.DataRunner(cfg.orchestration)
    scaleout.register(nonce, data_runner)
    config_json = cfg.model_dump(mode="json")

    def prepare(stage: str, force_it: bool = False) -> StageRun:
        section = section_for_key(stage, cfg, sources)
        hashes = input_hashes(stage, cfg, upstream, sources, wd)
        return StageRun(stage=stage, key=stage_key(stage, section, hashes), section=section, input_hashes=hashes,
                        config=config_json, workdir=str(wd), parent_run_id=parent, git_commit=commit, nonce=nonce,
                        sources=sources, upstream={s: upstream[s] for s in STAGE_DEFS[stage].deps(cfg)},
                        progress=progress, forced=force_it or stage in forced, flow_run_id=flow_run_id,
                        source_name=source_name)

    def will_run(job: StageRun) -> bool:
        return job.forced or check_stage(wd, job.stage, job.key, sources=sources, cfg=cfg)[0] is None

    futures: dict[str, Any] = {}  # the latest task run of each stage: the dependency edges Prefect draws

    def submit(job: StageRun, cached: bool):
        opts = dict(task_run_name=job.stage, tags=[f"cache_key:{job.key[:16]}", "cached" if cached else "ran"])
        deps = [futures[d] for d in STAGE_DEFS[job.stage].deps(cfg) if d in futures]
        futures[job.stage] = STAGE_TASKS[job.stage].with_options(**opts).submit(job, wait_for=deps)
        return futures[job.stage]

    models: dict[str, dict] = {}  # model stage -> its registered version (made here or by the producing run)
    headline: dict[str, float] = {}  # the parent's metrics, logged once at the end

    def finish(job: StageRun, info: StageInfo) -> None:
        """After a stage task returned: a child run for a cached stage, the summary, headline metrics."""
        if info.cached:
            info.cached_from_run_id = info.run_id
            info.run_id, ref = tracker.call("flows.registry:cached_child", job.stage, job.key, job.section, info,
                                            parent, flow_run_id, commit, source_name, process_tags())
            if ref:
                models[job.stage] = ref
        elif info.run_id in MODEL_REFS:
            models[job.stage] = MODEL_REFS.pop(info.run_id)
        rated = registry.RATED_BY.get(job.stage)
        metric = registry.BEST_BY[rated][0] if rated else None
        # a model stage rates its own version when it logs it; evaluate and judge rate the upstream model's
        if (rated in models and rated != job.stage and metric in info.metrics
                and not (info.cached and upstream[rated].cached)):
            try:
                registry.rate(tracker, rated, models[rated], float(info.metrics[metric]))
            except Exception as e:  # a store without a registry must not fail the pipeline
                log.warning("could not rate %s: %s", models[rated]["uri"], e)
        info.key = job.key
        upstream[job.stage] = info
        summary[job.stage] = {"run_id": info.run_id, "cached": info.cached, "artifact_dir": info.artifact_dir,
                              "metrics": info.metrics, "cache_key": job.key, "seconds": round(info.seconds, 3)}
        if job.stage in models:
            summary[job.stage]["model"] = models[job.stage]["uri"]
        headline.update({HEADLINE[job.stage][m]: v for m, v in info.metrics.items()
                         if m in HEADLINE.get(job.stage, {})})

    together: list[str] = []
    rebuilds: dict[str, int] = {}

    def pair_finetunes(jobs: dict[str, StageRun], to_run: set[str]) -> None:
        """spam and instruct, when both must run now and the machine allows it, each in a process of its own."""
        if not set(CONCURRENT) <= to_run:
            return
        shares = finetune_shares(cfg)
        if not shares:
            return
        together[:] = list(CONCURRENT)
        for name, mate in zip(CONCURRENT, reversed(CONCURRENT)):
            jobs[name].share = asdict(shares[name])
            jobs[name].concurrent_with = mate
        print(f"spam and instruct run concurrently, each in its own process: spam "
              f"{shares['spam'].describe()}; instruct {shares['instruct'].describe()}")

    # The stages form a graph (STAGE_DEFS[s].deps): each is submitted as soon as its upstream stages
    # are done, so independent ones (evaluate, spam, instruct after pretrain) run side by side. Stage
    # bodies that run in this process take turns (COMPUTE lock: torch's RNG and thread count are
    # global); cached stages and finetunes in their own process do not wait for them.
    pending = list(order)
    running: dict[Any, StageRun] = {}
    done: set[str] = set()
    forced_now: set[str] = set()
    try:
        while pending or running:
            ready = [s for s in pending if all(d in done for d in STAGE_DEFS[s].deps(cfg))]
            jobs = {s: prepare(s, force_it=s in forced_now) for s in ready}
            to_run = {s for s, j in jobs.items() if will_run(j)}
            pair_finetunes(jobs, to_run)
            for s, j in jobs.items():
                pending.remove(s)
                running[submit(j, cached=s not in to_run)] = j
            if not running:
                raise RuntimeError(f"stages {pending} wait for stages that never run")  # a bug in STAGE_DEFS
            fut = next(as_completed(list(running)))
            job = running.pop(fut)
            try:
                info = fut.result()
            except StaleInput as e:  # an upstream output changed on disk: rebuild it, then this stage again
                for f in list(running):  # the others finish first (they may read the same upstream)
                    f.wait()  # and are handled in the next rounds
                if e.stage not in forced_now:
                    rebuilds[e.stage] = rebuilds.get(e.stage, 0) + 1
                    if rebuilds[e.stage] > 2:
                        raise RuntimeError(f"{e.stage}: its output keeps changing on disk while the pipeline "
                                           f"runs ({e})") from None
                    print(f"{e.stage}: its output changed since it was recorded ({e}); rebuilding {e.stage}")
                    done.discard(e.stage)
                    forced_now.add(e.stage)
                pending = [s for s in order if s in set(pending) | {job.stage, e.stage}]
                continue
            forced_now.discard(job.stage)
            finish(job, info)
            done.add(job.stage)
        ordered = {s: summary.pop(s) for s in order if s in summary}
        summary.update(ordered)
        headline.update({"stages_cached": sum(s["cached"] for s in summary.values()),
                         "stages_run": sum(not s["cached"] for s in summary.values())})
        tracker.log_batch(parent, params={"concurrent_finetunes": ",".join(together) or "none"}, metrics=headline)
        tracker.set_tags(parent, {"mlflow.note.content": report.parent_description(
            command, cfg.preset, override_pairs(user_overrides), config_file, summary, tracker.experiment_id,
            {s: v["seconds"] for s, v in summary.items()})})
        report.prefect_summary_table({"stages": summary})
        tracker.end_run(parent)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    finally:
        scaleout.unregister(nonce)
        data_runner.close()
    return {"pipeline_run_id": parent, "name": run_name, "prefect_flow_run_id": flow_run_id,
            "mlflow_url": run_url(tracker, parent), "stages": summary}

"""The trained models in MLflow: logged as pyfunc models, registered, with `latest` and `best` aliases.

- pretrain, spam and instruct log their model folder as an MLflow model (flows/pyfunc.py: code, no
  pickles; safetensors weights; a signature and an input example) and register it as
  `llmpipe-<preset>-<stage>`. `latest` is always the newest version: MLflow reserves the alias name
  "latest" and resolves `models:/NAME/latest` to the newest version itself, so llmpipe sets no alias
  for it and reads `models:/NAME@latest` as `models:/NAME/latest`.
- `best` moves to a version only when its headline metric beats the current holder's:
  pretrain by `val_perplexity` (lower; from the evaluate stage of the same pipeline run),
  spam by `test_accuracy` (higher), instruct by `judge_mean_score` (higher; from the judge stage).
  The value is kept as a tag on the version, so the comparison needs no run look-ups.
- A cached stage registers nothing: its child run links the producing run's logged model and names
  the same version (tags `model_uri`, `model_version`).

    llmpipe generate --prompt "Every effort" --model models:/llmpipe-tiny-pretrain@best
    python -c "import mlflow; print(mlflow.pyfunc.load_model('models:/llmpipe-tiny-spam@latest')
               .predict({'text': ['WIN a prize now']}))"      # with MLFLOW_TRACKING_URI set to the store
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import yaml

import llm
from flows import report
from flows.errors import UsageError
from flows.tracking import get_tracker, reserved_tags
from llm.fsutil import publish_dir
# mlflow and flows.pyfunc (torch) are imported inside the functions that use them (deliberately lazy):
# a cached run's main process and `llmpipe --help` never import them.

# mlflow (and flows.pyfunc, which imports it and torch) are imported inside the functions that use them,
# deliberately: flows.pipeline imports this module, and a fully cached run must not import mlflow or torch.

MODEL_STAGES = ("pretrain", "spam", "instruct", "dpo")
MODEL_OUTPUT = {"pretrain": "checkpoint", "spam": "classifier", "instruct": "model", "dpo": "model"}
BEST_BY = {"pretrain": ("val_perplexity", "min"), "spam": ("test_accuracy", "max"),
           "instruct": ("judge_mean_score", "max"), "dpo": ("val_reward_accuracy", "max")}  # dpo rates itself
RATED_BY = {"evaluate": "pretrain", "spam": "spam", "judge": "instruct"}  # stage whose metric rates which model
ALIASES = ("latest", "best")
_LOCK = threading.Lock()  # MLflow's model logging reads the process-wide tracking URI
log = logging.getLogger("llmpipe")


def model_name(preset: str, stage: str) -> str:
    return f"llmpipe-{preset}-{stage}"


@contextlib.contextmanager
def _store(uri: str, experiment_id: Optional[str] = None):
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    import mlflow.tracking.fluent as fluent

    with _LOCK, _use_tracking_uri(uri):
        before = fluent._active_experiment_id
        fluent._active_experiment_id = experiment_id  # the logged model's experiment (else "0", under ./mlruns)
        try:
            yield
        finally:
            fluent._active_experiment_id = before


def _requirements() -> list[str]:
    out = []
    for pkg in ("mlflow", "torch", "tiktoken", "safetensors", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml"):
        try:
            out.append(f"{pkg}=={md.version(pkg).split('+')[0]}")
        except md.PackageNotFoundError:
            pass
    return out


def log_model(tracker, run_id: str, stage: str, preset: str, model_dir: Path, metrics: dict,
              step: int = 0) -> dict:
    """Log `model_dir` as the run's pyfunc model, register it, move `latest`; returns the reference."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from flows import pyfunc

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "Validating input example ..." lines in the run's output
    kind = pyfunc.KINDS[stage]
    name = model_name(preset, stage)
    example_params = {"generate": {"max_new_tokens": 4}, "ask": {"max_new_tokens": 4}}.get(kind)
    example = pyfunc.INPUT_EXAMPLES[kind]
    with _store(tracker.uri, tracker.experiment_id), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
        info = Model.log(artifact_path=None, name=stage, flavor=mlflow.pyfunc, run_id=run_id,
                         python_model=str(Path(pyfunc.__file__).resolve()), model_config={"kind": kind},
                         code_paths=[str(Path(llm.__file__).resolve().parent)],
                         artifacts={"model": str(model_dir)}, signature=pyfunc.signature(kind),
                         input_example=(example, example_params) if example_params else example,
                         pip_requirements=_requirements(), registered_model_name=name, await_registration_for=0,
                         step=step, metadata={"llmpipe_stage": stage, "llmpipe_preset": preset},
                         params={k: str(v) for k, v in metrics.items()})
    version = str(info.registered_model_version)
    client = tracker.client
    ref = {"name": name, "version": version, "model_id": info.model_id, "uri": f"models:/{name}/{version}"}
    client.set_model_version_tag(name, version, "llmpipe.run_id", run_id)
    tracker.set_tags(run_id, ref_tags(ref))
    metric, _ = BEST_BY[stage]
    if metric in metrics:
        rate(tracker, stage, ref, float(metrics[metric]))
    return ref


def ref_from_run(run) -> Optional[dict]:
    """The model reference a (producing) run recorded in its tags, if any."""
    t = run.data.tags
    if "model_uri" not in t:
        return None
    name, version = t["model_uri"][len("models:/"):].rsplit("/", 1)
    return {"name": name, "version": version, "model_id": t.get("llmpipe.model_id", ""), "uri": t["model_uri"]}


def rate(tracker, stage: str, ref: dict, value: float) -> bool:
    """Record the version's headline metric and move `best` to it when it beats the current holder."""
    metric, direction = BEST_BY[stage]
    client = tracker.client
    name, version = ref["name"], ref["version"]
    client.set_model_version_tag(name, version, metric, repr(float(value)))
    try:
        holder = client.get_model_version_by_alias(name, "best")
    except Exception:
        holder = None
    if holder is not None and str(holder.version) != str(version):
        try:
            held = float(holder.tags.get(metric, "nan"))
        except ValueError:
            held = float("nan")
        if held == held and not (value < held if direction == "min" else value > held):
            return False
    client.set_registered_model_alias(name, "best", version)
    return True


def ref_tags(ref: dict) -> dict[str, str]:
    return {"model_uri": ref["uri"], "model_version": ref["version"], "llmpipe.model_id": ref.get("model_id", "")}


def link_cached(tracker, run_id: str, ref: dict) -> None:
    """A cached stage's child run: the same model version, linked as the run's output (no new version).
    Its tags (ref_tags) are set when the run is created."""
    from mlflow.entities import LoggedModelOutput

    if ref.get("model_id"):
        try:
            tracker.client.log_outputs(run_id, [LoggedModelOutput(ref["model_id"], step=0)])
        except Exception as e:  # an older store without logged models
            log.debug("could not link model %s to %s: %s", ref["model_id"], run_id, e)


def download_model(uri: str, workdir: Path, stage: str) -> Path:
    """`--model models:/NAME@ALIAS` (or models:/NAME/VERSION, runs:/..): the checkpoint folder inside it."""
    if not uri.startswith(("models:/", "runs:/")):
        raise UsageError(f"--model {uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
    if uri.startswith("models:/") and uri.lower().endswith("@latest"):
        uri = uri[: -len("@latest")] + "/latest"  # MLflow reserves the alias; its own `latest` is the newest
    tr = get_tracker(workdir)
    import mlflow.artifacts

    dst = Path(tempfile.mkdtemp(prefix="llmpipe-model-"))
    cache = _cache_dir(tr, uri, Path(workdir))
    if cache is not None and (cache / "MLmodel").is_file():
        local = cache  # this version was fetched before: versions never change
    else:
        try:
            with _store(tr.uri, tr.experiment_id):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                                 tracking_uri=tr.uri))
        except Exception as e:
            raise UsageError(f"--model {uri}: not found in {tr.uri} ({str(e).splitlines()[0][:200]})") from None
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
            shutil.copytree(local, tmp)
            try:
                publish_dir(tmp, cache, replace=False)  # fsynced, renamed: a half-copied folder is never used
                local = cache
            except OSError:  # another process cached it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
    if not str(local).startswith(str(dst)):
        shutil.rmtree(dst, ignore_errors=True)
    found = sorted(p.parent for p in local.rglob("config.json") if (p.parent / "model.safetensors").exists())
    if not found:
        raise UsageError(f"--model {uri}: holds no llmpipe checkpoint (config.json + model.safetensors)")
    meta_stage = _model_stage(local)
    if meta_stage and meta_stage != stage:
        raise UsageError(f"--model {uri}: a {meta_stage} model; expected a {stage} model")
    return found[0]


def _cache_dir(tr, uri: str, workdir: Path) -> Optional[Path]:
    """<workdir>/data/cache/models/<name>/<version>-<model id> for a registered version (aliases resolved
    first; the model id keeps a re-created registered model's version 1 apart from the old one)."""
    try:
        if not uri.startswith("models:/"):
            return None
        rest = uri[len("models:/"):]
        c = tr.client
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, version = rest.rsplit("/", 1)
            if version == "latest":
                version = str(max(int(v.version) for v in c.search_model_versions(f"name='{name}'")))
            mv = c.get_model_version(name, version)
        ident = "".join(ch for ch in str(getattr(mv, "model_id", None) or mv.run_id or "") if ch.isalnum())[:16]
        if "/" in name or name.startswith("."):
            return None
        return Path(workdir).resolve() / "data" / "cache" / "models" / name / f"{mv.version}-{ident}"
    except Exception:  # unknown name or alias: the download reports it
        return None


def _model_stage(local: Path) -> str:
    try:
        meta = yaml.safe_load((local / "MLmodel").read_text()) or {}
        return (meta.get("metadata") or {}).get("llmpipe_stage", "")
    except (OSError, ValueError):
        return ""


def cached_child(tracker, stage: str, key: str, section: dict, info, parent: str, flow_run_id: str, commit: str,
                 source_name: str, owner_tags: dict[str, str]) -> tuple[str, Optional[dict]]:
    """The child run of a re-used stage: the producing run's metrics at their steps, a link to it and its
    artifacts (description + `artifact_uri` param), and the same model version (nothing registered).
    Runs next to the store: `tracker.call("flows.registry:cached_child", ...)` (flows/trackproc.py)."""
    producer, ref = None, None
    try:
        producer = tracker.client.get_run(info.cached_from_run_id)
    except Exception:  # the producing run was deleted, or lives in another store
        pass
    tags = {"stage": stage, "cache_key": key, "cached": "true", "cached_from_run_id": info.cached_from_run_id,
            "prefect.flow_run_id": flow_run_id, "git_commit": commit, "artifact_dir": info.artifact_dir,
            "pipeline_run_id": parent, **reserved_tags(commit, source_name), **owner_tags}
    artifact_uri = producer.info.artifact_uri if producer else ""
    if producer:
        ref = ref_from_run(producer)
        tags["mlflow.note.content"] = report.cached_description(
            stage, producer.info.run_id, producer.info.run_name, tracker.experiment_id, artifact_uri,
            info.artifact_dir, ref["uri"] if ref else "")
        if ref:
            tags.update(ref_tags(ref))
    run_id = tracker.start_run(stage, tags, parent_run_id=parent)
    params = {**section, **({"artifact_uri": artifact_uri} if artifact_uri else {})}
    if producer is not None and producer.data._metric_objs:  # the producer's latest values, at their steps
        points = [(m.key, m.value, m.step) for m in producer.data._metric_objs if not m.key.startswith("system/")]
    else:
        points = [(k, v, 0) for k, v in info.metrics.items()]
    tracker.log_points(run_id, params, points)
    if ref:
        link_cached(tracker, run_id, ref)
    tracker.end_run(run_id)
    return run_id, ref

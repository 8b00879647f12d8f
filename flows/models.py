"""Find a trained model for `llmpipe generate/classify/ask`: by MLflow run id, folder, or newest.

    resolve_model_dir(run_id=None, checkpoint=None, workdir=Path("."), stage="pretrain")

- `--checkpoint DIR`: that folder.
- `--run-id ID`: a stage run (its artifact folder, or its logged `checkpoint` artifact when the
  folder is gone), or a pipeline run (its child run of the wanted stage).
- neither: the newest completed artifact of the stage under the workdir.

A model folder that belongs to a stage's recorded artifacts is re-hashed against the record before
it is returned: weights that changed on disk are refused with one line naming the file.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

from flows.cache import RECORD as MARKER
from flows.cache import verify_files
# flows.tracking (MLflow client) is imported only when a run id must be resolved (deliberately lazy).
from flows.stages import STAGE_DEFS

OUTPUT_NAME = {"pretrain": "checkpoint", "spam": "classifier", "instruct": "model", "dpo": "model"}


def _from_marker(artifact_dir: Path, stage: str) -> Optional[Path]:
    m = artifact_dir / MARKER
    if not m.exists():
        return None
    rec = json.loads(m.read_text())
    rel = rec["outputs"].get(OUTPUT_NAME[stage])
    return artifact_dir / rel if rel else None


def newest(workdir: Path, stage: str) -> Path:
    root = workdir / STAGE_DEFS[stage].out_root
    markers = sorted(root.glob(f"*/{MARKER}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for m in markers:
        d = _from_marker(m.parent, stage)
        if d is not None and d.exists():
            return d
    raise FileNotFoundError(f"{root}: no completed {stage} stage yet; run `llmpipe run {stage}` first "
                            "or pass --checkpoint DIR / --run-id ID")


def check_model_dir(d: Path) -> Path:
    """Verify a model folder against the stage record it belongs to (if any); raise ValueError on a change."""
    d = Path(d).resolve()
    for base in (d, *list(d.parents)[:3]):
        rec_file = base / MARKER
        if not rec_file.is_file():
            continue
        try:
            files = json.loads(rec_file.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return d  # a record of an older llmpipe: nothing to check against
        prefix = d.relative_to(base).as_posix()
        mine = {rel: e for rel, e in files.items() if prefix == "." or rel.startswith(prefix + "/")}
        reason, _ = verify_files(base, {rel: dict(e) for rel, e in mine.items()}, full=True)
        if reason:
            raise ValueError(f"{reason}; refusing to load a model whose files differ from what the stage recorded "
                             f"(re-run the stage that made it)")
        return d
    return d


def resolve_model_dir(run_id: Optional[str], checkpoint: Optional[str], workdir: Path, stage: str) -> Path:
    return check_model_dir(_resolve_model_dir(run_id, checkpoint, workdir, stage))


def _resolve_model_dir(run_id: Optional[str], checkpoint: Optional[str], workdir: Path, stage: str) -> Path:
    if checkpoint:
        p = Path(checkpoint)
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: expected a folder with config.json and "
                                    "model.safetensors")
        return p
    if not run_id:
        return newest(workdir, stage)
    from flows.tracking import get_tracker

    tr = get_tracker(workdir)
    try:
        run = tr.client.get_run(run_id)
    except Exception:
        raise ValueError(f"--run-id {run_id}: no such MLflow run in {tr.uri}") from None
    if run.data.tags.get("stage") == "pipeline":
        children = tr.client.search_runs(
            [tr.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.stage = '{stage}'")
        if not children:
            raise ValueError(f"--run-id {run_id}: this pipeline run has no {stage} stage")
        run = children[0]
    elif run.data.tags.get("stage") != stage:
        raise ValueError(f"--run-id {run_id}: a {run.data.tags.get('stage')!r} run; expected a {stage} run "
                         "or a pipeline run")
    art = run.data.tags.get("artifact_dir")
    if art:
        d = _from_marker(Path(art), stage)
        if d is not None and d.exists():
            return d
    src = run.data.tags.get("cached_from_run_id", run.info.run_id)
    dst = Path(tempfile.mkdtemp(prefix="llmpipe-model-"))
    try:
        path = tr.client.download_artifacts(src, "checkpoint", str(dst))
    except Exception:
        raise FileNotFoundError(f"--run-id {run_id}: its artifact folder {art} is gone and the run logged no "
                                "checkpoint artifact") from None
    sub = [p for p in Path(path).iterdir() if p.is_dir()]
    return sub[0] if sub and not (Path(path) / "config.json").exists() else Path(path)

"""`llmpipe stages`: each stage's cache key, whether its artifacts are cached, and where.

A stage's key can be computed only once the stages it reads from are complete (their output
hashes are part of it); later stages then show as "pending".

    llmpipe stages --preset tiny
"""
from __future__ import annotations

import json
from pathlib import Path

from flows.cache import stage_key
from flows.pipeline import artifact_dir, input_hashes, is_complete, marker_path, resolve, section_for_key
from flows.stages import STAGE_DEFS, needed_sources, plan


def stage_table(stages, preset, config_file, overrides, mirror, corpus, workdir: Path) -> list[dict]:
    cfg = resolve(preset, config_file, overrides, mirror, corpus)
    wd = Path(workdir).resolve()
    order = plan(cfg, stages)
    sources = needed_sources(cfg, order, tuple(stages))
    known: dict[str, dict] = {}
    rows = []
    for stage in order:
        deps = STAGE_DEFS[stage].deps(cfg)
        if any(d not in known for d in deps):
            rows.append({"stage": stage, "state": "pending", "key": None, "artifact_dir": "-"})
            continue
        section = section_for_key(stage, cfg, sources)
        key = stage_key(stage, section, input_hashes(stage, cfg, known, sources, wd))
        done = is_complete(wd, stage, key)
        rows.append({"stage": stage, "state": "cached" if done else "stale", "key": key,
                     "artifact_dir": str(artifact_dir(wd, stage, key))})
        if done:
            known[stage] = json.loads(marker_path(wd, stage, key).read_text())
    return rows

"""`llmpipe stages`: each stage's cache key, whether its artifacts are cached, and where.

A stage's key can be computed only once the stages it reads from are complete (their output
hashes are part of it); later stages then show as "pending".

    llmpipe stages --preset tiny
"""
from __future__ import annotations

from pathlib import Path

from flows.cache import StageInfo, artifact_dir, check_stage, input_hashes, section_for_key, stage_key
from flows.stages import STAGE_DEFS, needed_sources, plan, resolve


def stage_table(stages, preset, config_file, overrides, mirror, corpus, workdir: Path,
                verify: bool = False) -> list[dict]:
    """One row per planned stage: state cached | stale | pending, key, artifact folder, and for a
    stale stage the reason (a missing record, or which file changed: expected vs actual).
    `verify` re-hashes every recorded file instead of trusting unchanged sizes and mtimes."""
    cfg = resolve(preset, config_file, overrides, mirror, corpus)
    wd = Path(workdir).resolve()
    order = plan(cfg, stages)
    sources = needed_sources(cfg, order, tuple(stages))
    known: dict[str, StageInfo] = {}
    rows = []
    for stage in order:
        deps = STAGE_DEFS[stage].deps(cfg)
        if any(d not in known for d in deps):
            rows.append({"stage": stage, "state": "pending", "key": None, "artifact_dir": "-",
                         "reason": "an upstream stage is not cached"})
            continue
        section = section_for_key(stage, cfg, sources)
        key = stage_key(stage, section, input_hashes(stage, cfg, known, sources, wd))
        info, why = check_stage(wd, stage, key, full=verify, sources=sources, cfg=cfg)
        rows.append({"stage": stage, "state": "cached" if info else "stale", "key": key,
                     "artifact_dir": str(artifact_dir(wd, stage, key)), "reason": why})
        if info:
            known[stage] = info
    return rows

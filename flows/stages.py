"""The nine stages as data: what each reads, where it writes, and the thin call into llm/.

Each `Stage` says which upstream stages it needs for a given config, which upstream outputs
it reads (their content hashes go into its cache key), and how to call its llm/ function.
flows/pipeline.py turns each into a Prefect task with MLflow tracking and caching.

    python -m flows.stages tiny      # print the plan (stages, dependencies) of a preset
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llm.config import STAGES, PipelineConfig, load_config
from llm.result import StageResult
from llm.sources import default_sources_path, load_sources

# The stage bodies below import their llm/ module inside the function, deliberately: (1) flows/cache.py keys
# each stage's code by the imports in its body's source (an import up here would drop the module from the
# key), and (2) a fully cached run must not import torch (llm.train, llm.spam, ...) or the judge's pandas.

# upstream: {stage: info}; info = {"outputs": {name: path}, "output_hashes": {name: sha}, ...}
Upstream = dict[str, dict]


@dataclass(frozen=True)
class Stage:
    name: str
    out_root: str  # folder under the workdir that holds this stage's keyed artifact folders
    deps: Callable[[PipelineConfig], list[str]]
    reads: Callable[[PipelineConfig], list[tuple[str, str]]]  # (upstream stage, output name) pairs
    body: Callable[..., StageResult]
    resumable: bool = False  # keep a crashed run's work folder so the next run resumes from it


def _is_source_name(value: str) -> bool:
    """A source name (no path separators, no suffix) rather than a file path."""
    return "/" not in value and "\\" not in value and "." not in value


def needed_sources(cfg: PipelineConfig, stages: list[str], requested: tuple[str, ...] = ()) -> list[str]:
    """Sources the download stage fetches: download.sources, plus what the planned stages read
    (everything the preset uses when `download` or `all` was asked for explicitly)."""
    names = list(cfg.download.sources)
    if "download" in requested or "all" in requested:
        stages = list(STAGES)
    if "clean" in stages:
        names += cfg.clean.sources
    if "spam" in stages and _is_source_name(cfg.spam.source):
        names.append(cfg.spam.source)
    if "instruct" in stages and _is_source_name(cfg.instruct.data):
        names.append(cfg.instruct.data)
    if "dpo" in stages and _is_source_name(cfg.dpo.data):
        names.append(cfg.dpo.data)
    return sorted(dict.fromkeys(names))


def local_file_input(value: str, field: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{field}: {value}: no such file")
    return p


@dataclass
class StageContext:
    """What a stage body gets besides its config and upstream outputs."""

    workdir: Path
    progress: bool = True
    log: Optional[Callable[[dict, int], None]] = None
    on_checkpoint: Optional[Callable[[Path, int], None]] = None
    sources: list[str] = field(default_factory=list)
    data_runner: Any = None  # flows.scaleout.DataRunner: where clean/shard run parallel work


def resolve(preset: str, config_file: Optional[str], overrides: list[str], mirror: Optional[str],
            corpus: list[str]) -> PipelineConfig:
    """The pipeline's config: preset, then --config file, then --set overrides, --mirror, --corpus."""
    extra = list(overrides)
    if mirror:
        extra.append(f"download.mirror={json.dumps(str(mirror))}")
    if corpus:
        extra.append(f"clean.corpus={json.dumps([str(c) for c in corpus])}")
        extra.append("clean.sources=[]")
    return load_config(preset, config_file, extra)


# --- bodies: thin calls into llm/ -------------------------------------------------------------

def sources_file(cfg: PipelineConfig, workdir: Path) -> Path:
    """download.sources_file, else <workdir>/data/sources.yaml, else the copy shipped with llmpipe."""
    if cfg.download.sources_file:
        p = Path(cfg.download.sources_file).expanduser()
        if not p.is_absolute():
            p = workdir / p
        if not p.is_file():
            raise FileNotFoundError(f"download.sources_file: {p}: no such file")
        return p
    local = workdir / "data" / "sources.yaml"
    return local if local.is_file() else default_sources_path()


# Stage bodies import their llm/ module inside the body (deliberately lazy): a fully cached run never
# imports torch or the recipes, and flows/cache.py keys each stage by the imports of its own body.


def _download(cfg: PipelineConfig, up: Upstream, out: Path, ctx) -> StageResult:
    from llm.sources import run_download

    section = cfg.download.model_copy(update={"sources": ctx.sources})
    return run_download(section, out, progress=ctx.progress, log=ctx.log,
                        sources_path=sources_file(cfg, ctx.workdir))


def _clean(cfg, up, out, ctx):
    from llm.clean import run_clean

    files = up.get("download", {}).get("outputs", {})
    inputs = {name: Path(files[name]) for name in cfg.clean.sources}
    executor, slots = ctx.data_runner.executor() if ctx.data_runner else (None, 0)
    return run_clean(cfg.clean, inputs, out, progress=ctx.progress, log=ctx.log, executor=executor,
                     executor_slots=slots)


def _shard(cfg, up, out, ctx):
    from llm.shards import run_shard
    from llm.tokenizer import EncoderPool

    executor, slots = ctx.data_runner.executor() if ctx.data_runner else (None, 0)
    pool = EncoderPool(slots, executor=executor) if executor is not None else None
    return run_shard(cfg.shard, Path(up["clean"]["outputs"]["documents"]), out, progress=ctx.progress, log=ctx.log,
                     pool=pool)


def _pretrain(cfg, up, out, ctx):
    from llm.train import run_pretrain

    return run_pretrain(cfg.pretrain, Path(up["shard"]["outputs"]["shards"]), out, progress=ctx.progress,
                        log=ctx.log, on_checkpoint=ctx.on_checkpoint)


def _evaluate(cfg, up, out, ctx):
    from llm.evaluate import run_evaluate

    return run_evaluate(cfg.evaluate, Path(up["shard"]["outputs"]["shards"]),
                        Path(up["pretrain"]["outputs"]["checkpoint"]), out, progress=ctx.progress, log=ctx.log)


def _data_file(value: str, field: str, up: Upstream) -> Path:
    if _is_source_name(value):
        return Path(up["download"]["outputs"][value])
    return local_file_input(value, field)


def _base_checkpoint(init: str, up: Upstream) -> Optional[Path]:
    return Path(up["pretrain"]["outputs"]["checkpoint"]) if init == "pretrain" else None


def _spam(cfg, up, out, ctx):
    from llm.spam import run_spam

    return run_spam(cfg.spam, _data_file(cfg.spam.source, "spam.source", up), out,
                    base_checkpoint=_base_checkpoint(cfg.spam.init, up), progress=ctx.progress, log=ctx.log)


def _instruct(cfg, up, out, ctx):
    from llm.instruct import run_instruct

    return run_instruct(cfg.instruct, _data_file(cfg.instruct.data, "instruct.data", up), out,
                        base_checkpoint=_base_checkpoint(cfg.instruct.init, up), progress=ctx.progress, log=ctx.log)


def _dpo(cfg, up, out, ctx):
    from llm.dpo import run_dpo

    return run_dpo(cfg.dpo, _data_file(cfg.dpo.data, "dpo.data", up), out,
                   base_model=Path(up["instruct"]["outputs"]["model"]), progress=ctx.progress, log=ctx.log)


def _judge(cfg, up, out, ctx):
    from llm.judge import run_judge

    dpo = Path(up["dpo"]["outputs"]["responses"]) if "dpo" in up else None
    return run_judge(cfg.judge, Path(up["instruct"]["outputs"]["responses"]), out,
                     cache_path=ctx.workdir / "data" / "cache" / "judge.sqlite", progress=ctx.progress, log=ctx.log,
                     dpo_responses=dpo)


# --- dependencies and reads ----------------------------------------------------------------------

def _finetune_deps(source: str, init: str) -> list[str]:
    return (["download"] if _is_source_name(source) else []) + (["pretrain"] if init == "pretrain" else [])


def _finetune_reads(source: str, init: str) -> list[tuple[str, str]]:
    reads = [("download", source)] if _is_source_name(source) else []
    return reads + ([("pretrain", "checkpoint")] if init == "pretrain" else [])


STAGE_DEFS: dict[str, Stage] = {
    "download": Stage("download", "data/raw", lambda c: [], lambda c: [], _download),
    "clean": Stage("clean", "data/clean", lambda c: ["download"] if c.clean.sources else [],
                   lambda c: [("download", s) for s in c.clean.sources], _clean),
    "shard": Stage("shard", "data/shards", lambda c: ["clean"], lambda c: [("clean", "documents")], _shard),
    "pretrain": Stage("pretrain", "data/artifacts/pretrain", lambda c: ["shard"], lambda c: [("shard", "shards")],
                      _pretrain, resumable=True),
    "evaluate": Stage("evaluate", "data/artifacts/evaluate", lambda c: ["shard", "pretrain"],
                      lambda c: [("shard", "shards"), ("pretrain", "checkpoint")], _evaluate),
    "spam": Stage("spam", "data/artifacts/spam", lambda c: _finetune_deps(c.spam.source, c.spam.init),
                  lambda c: _finetune_reads(c.spam.source, c.spam.init), _spam, resumable=True),
    "instruct": Stage("instruct", "data/artifacts/instruct",
                      lambda c: _finetune_deps(c.instruct.data, c.instruct.init),
                      lambda c: _finetune_reads(c.instruct.data, c.instruct.init), _instruct, resumable=True),
    "dpo": Stage("dpo", "data/artifacts/dpo",
                 lambda c: ["instruct"] + (["download"] if _is_source_name(c.dpo.data) else []),
                 lambda c: [("instruct", "model")] + ([("download", c.dpo.data)] if _is_source_name(c.dpo.data) else []),
                 _dpo, resumable=True),
    "judge": Stage("judge", "data/artifacts/judge", lambda c: ["instruct"] + (["dpo"] if c.judge.dpo else []),
                   lambda c: [("instruct", "responses")] + ([("dpo", "responses")] if c.judge.dpo else []),
                   _judge),
}
assert tuple(STAGE_DEFS) == STAGES


def plan(cfg: PipelineConfig, requested: list[str]) -> list[str]:
    """The requested stages plus everything they need, in pipeline order."""
    want: set[str] = set()

    def visit(s: str) -> None:
        if s in want:
            return
        want.add(s)
        for d in STAGE_DEFS[s].deps(cfg):
            visit(d)

    for s in requested:
        if s == "all":
            for t in STAGES:
                visit(t)
        else:
            visit(s)
    return [s for s in STAGES if s in want]


def extra_input_hashes(stage: str, cfg: PipelineConfig) -> dict[str, str]:
    """Content hashes of inputs that are not upstream outputs: user corpus files, local data files,
    and for download the pinned entries of the sources it fetches."""
    from flows.cache import sha256_file  # lazy: flows.cache imports this module

    out: dict[str, str] = {}
    if stage == "clean" and cfg.clean.corpus:
        from llm.clean import resolve_corpus  # lazy: llm.clean imports pyarrow

        for p in resolve_corpus(cfg.clean.corpus):
            out[f"corpus:{p.resolve()}"] = sha256_file(p)
    if stage == "spam" and not _is_source_name(cfg.spam.source):
        out["spam.source"] = sha256_file(local_file_input(cfg.spam.source, "spam.source"))
    if stage == "instruct" and not _is_source_name(cfg.instruct.data):
        out["instruct.data"] = sha256_file(local_file_input(cfg.instruct.data, "instruct.data"))
    if stage == "dpo" and not _is_source_name(cfg.dpo.data):
        out["dpo.data"] = sha256_file(local_file_input(cfg.dpo.data, "dpo.data"))
    return out


def source_entries_hash(names: list[str], path: Path) -> str:
    """Hash of the pinned entries (url, sha256, member) of the sources the download stage fetches."""
    from flows.cache import stable_json  # lazy: flows.cache imports this module

    known = load_sources(path)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{path}: no source named {unknown[0]!r} (asked for by the config); "
                         f"expected one of {', '.join(sorted(known))}")
    entries = {n: {"url": known[n].url, "sha256": known[n].sha256, "member": getattr(known[n], "member", None)}
               for n in names}
    return hashlib.sha256(stable_json(entries).encode()).hexdigest()


if __name__ == "__main__":
    c = load_config(sys.argv[1] if len(sys.argv) > 1 else "tiny")
    for s in plan(c, ["all"]):
        print(f"{s:9s} <- {', '.join(STAGE_DEFS[s].deps(c)) or '-'}")

"""Content hashing for stage cache keys.

A stage's cache key is the sha256 of three things and nothing else:
  1. its resolved config section (stable JSON),
  2. the content hashes of the upstream outputs it reads (file bytes, not paths or times),
  3. the version of the code it runs (the bytes of its llm/ modules + the package version).
Per-run values (MLflow run ids, Prefect flow run ids, timestamps) never enter a key, so
re-running the same command re-uses every stage, and regenerating byte-identical upstream
files does not invalidate anything downstream.

    python -m flows.cache data/shards/<key>      # print the content hash of a file or folder
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import llm
from llm.fsutil import sha256_file  # noqa: F401  (used here and by flows.stages)

# Which llm/ modules each stage runs: editing one invalidates exactly the stages that use it.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "download": ("sources",),
    "clean": ("clean",),
    "shard": ("shards", "tokenizer"),
    "pretrain": ("train", "model", "shards", "checkpoint", "weights"),
    "evaluate": ("evaluate", "model", "shards", "checkpoint", "generate", "tokenizer"),
    "spam": ("spam", "lora", "model", "checkpoint", "weights", "tokenizer"),
    "instruct": ("instruct", "lora", "model", "checkpoint", "weights", "generate", "tokenizer", "train"),
    "judge": ("judge", "judge_server"),
}
CODE_SALT = "llmpipe-cache-v1"




def hash_path(path: str | Path) -> str:
    """Content hash of a file, or of a folder's files (relative names + bytes; hidden files skipped)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: cannot hash a missing output")
    h = hashlib.sha256()
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            f = Path(root) / name
            h.update(f.relative_to(p).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@lru_cache(maxsize=None)
def code_version(stage: str) -> str:
    """Hash of the llm/ modules a stage runs (missing modules hash as absent)."""
    h = hashlib.sha256(CODE_SALT.encode())
    h.update(getattr(llm, "__version__", "0").encode())
    base = Path(llm.__file__).parent
    for mod in STAGE_MODULES[stage]:
        f = base / f"{mod}.py"
        h.update(mod.encode() + b"\0")
        h.update(f.read_bytes() if f.exists() else b"<absent>")
    return h.hexdigest()


def stage_key(stage: str, section: dict, input_hashes: dict[str, str]) -> str:
    """The cache key of one stage from its config section and the content hashes of what it reads."""
    payload = {"stage": stage, "config": section, "inputs": input_hashes, "code": code_version(stage)}
    return hashlib.sha256(stable_json(payload).encode()).hexdigest()


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(hash_path(arg), arg)

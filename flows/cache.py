"""The stage cache: content keys, the record each finished stage leaves, and its verification.

This is the only cache layer. A stage is re-used when, and only when, its record says so:

- **Key.** A stage's cache key is the sha256 of three things and nothing else: its resolved config
  section (stable JSON), the content hashes of the upstream outputs it reads (file bytes, not paths
  or times), and the version of the code it runs. The code version is the hash of the stage body
  in flows/stages.py (with the helpers it calls) plus every llm/ module that body reaches through
  its imports, found by walking the imports (AST), so editing any module a stage really runs
  invalidates it and nothing else. Per-run values (MLflow run ids, Prefect flow run ids,
  timestamps) never enter a key.
- **Record.** A finished stage writes `<artifact dir>/.llmpipe-stage.json`: its key, the MLflow run
  that produced it, its outputs as paths *relative to the artifact folder*, and every output
  file's sha256, size and mtime (ns). A workdir can therefore be copied or moved and its cache
  stays valid and self-contained. Raw downloads get one record per source
  (`data/raw/.llmpipe/<name>.json`), checked against the sha256 pinned in sources.yaml.
- **Verification.** Re-use stats every recorded file and re-hashes any whose size or mtime changed
  (`full=True`, as in `llmpipe stages --verify`, re-hashes everything). Any difference makes the
  stage stale, with the reason (file, expected vs actual), and it is rebuilt; a mismatching file is
  never used. Before a stage runs, the outputs it reads are re-hashed in full.

No prefect or mlflow import here, so `llmpipe stages`, `generate`, `classify` and `ask` stay light.

    python -m flows.cache data/shards/<key>      # print the content hash of a file or folder
    python -m flows.cache --closure evaluate     # the modules a stage's code key covers
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import shutil
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import llm
from flows import timing
from llm.config import PipelineConfig
from llm.fsutil import atomic_write_text, sha256_file
from flows.stages import STAGE_DEFS, extra_input_hashes, source_entries_hash, sources_file

CODE_SALT = "llmpipe-cache-v2"
RECORD = ".llmpipe-stage.json"
SOURCE_RECORDS = ".llmpipe"  # data/raw/.llmpipe/<source>.json
RECORD_VERSION = 2
LLM_ROOT = Path(llm.__file__).resolve().parent


# --- content hashes ------------------------------------------------------------------------------------------

def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _visible_files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / n for n in sorted(files) if not n.startswith(".")]
    return sorted(out, key=lambda f: f.relative_to(folder).as_posix())


def folder_hash(file_hashes: dict[str, str]) -> str:
    """Content hash of a folder from {relative posix name: sha256} (hidden files are not part of it)."""
    h = hashlib.sha256()
    for rel in sorted(file_hashes):
        h.update(rel.encode() + b"\0" + file_hashes[rel].encode() + b"\n")
    return h.hexdigest()


def hash_path(path: str | Path) -> str:
    """Content hash of a file, or of a folder's files (relative names + bytes; hidden files skipped)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: cannot hash a missing output")
    return folder_hash({f.relative_to(p).as_posix(): sha256_file(f) for f in _visible_files(p)})


# --- code versions from the real import closure -------------------------------------------------------------

def _module_file(name: str, root: Path) -> Optional[Path]:
    """The file of module `name` (llm.x.y) under the llm package folder `root`, or None."""
    parts = name.split(".")
    if parts[0] != "llm":
        return None
    base = root.joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an AST imports, at any depth (lazy imports inside functions count)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from llm import train` names a module
    return names


@lru_cache(maxsize=None)
def _module_imports(name: str, f: Path) -> frozenset[str]:
    tree = ast.parse(f.read_bytes(), filename=str(f))
    return frozenset(_imported_names(tree, name, f.name == "__init__.py"))


def import_closure(start: set[str], root: Path = LLM_ROOT) -> dict[str, Path]:
    """{module name: file} of every llm module reachable from the module names `start`,
    including the packages (their __init__.py) that Python runs on the way. Reaching a subpackage
    (llm/judge/) counts all of its modules, since a package may import them by name at run time."""
    seen: dict[str, Path] = {}
    looked: set[str] = set()
    todo = [n for n in start if n.split(".")[0] == "llm"]
    while todo:
        name = todo.pop()
        if name in looked:
            continue
        looked.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        f = _module_file(name, root)
        if f is None:
            continue
        seen[name] = f
        todo.extend(n for n in _module_imports(name, f) if n.split(".")[0] == "llm" and n not in looked)
        if f.name == "__init__.py" and name != "llm":  # a subpackage may load its modules lazily
            todo.extend(f"{name}.{m.stem}" for m in f.parent.glob("*.py") if m.stem != "__init__")
    return seen


@lru_cache(maxsize=None)
def _body_sources(stage: str) -> tuple[str, frozenset[str]]:
    """The source of a stage's body in flows/stages.py plus the module-level helpers it calls
    (transitively), and the module names all of them import."""
    mod = sys.modules[STAGE_DEFS[stage].body.__module__]
    texts: list[str] = []
    imports: set[str] = set()
    todo, done = [STAGE_DEFS[stage].body.__name__], set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        obj = getattr(mod, name)
        src = textwrap.dedent(inspect.getsource(obj))
        texts.append(f"# {name}\n{src}")
        tree = ast.parse(src)
        imports |= _imported_names(tree, mod.__name__, False)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id != name and inspect.isfunction(getattr(mod, node.id, None)) \
                    and getattr(mod, node.id).__module__ == mod.__name__:
                todo.append(node.id)
    return "\n".join(sorted(texts)), frozenset(imports)


@lru_cache(maxsize=None)
def stage_closure(stage: str, root: Path = LLM_ROOT) -> dict[str, Path]:
    """The llm modules a stage runs: everything its body reaches through imports."""
    _, imports = _body_sources(stage)
    return import_closure(imports | {"llm"}, root)


@lru_cache(maxsize=None)
def code_version(stage: str, root: Path = LLM_ROOT) -> str:
    """Hash of the code a stage runs: its body (+ helpers) and the llm modules of its import closure."""
    h = hashlib.sha256(CODE_SALT.encode())
    h.update(getattr(llm, "__version__", "0").encode())
    body, _ = _body_sources(stage)
    h.update(body.encode())
    for name, f in sorted(stage_closure(stage, root).items()):
        h.update(b"\0" + name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@timing.timed("keys")
def stage_key(stage: str, section: dict, input_hashes: dict[str, str], root: Path = LLM_ROOT) -> str:
    """The cache key of one stage from its config section and the content hashes of what it reads."""
    payload = {"stage": stage, "config": section, "inputs": input_hashes, "code": code_version(stage, root)}
    return hashlib.sha256(stable_json(payload).encode()).hexdigest()


def section_for_key(stage: str, cfg: PipelineConfig, sources: list[str]) -> dict:
    """The part of the config that decides a stage's output."""
    section = cfg.section(stage).model_dump(mode="json")
    if stage == "download":  # where files come from does not change what they are (sha256 pinned)
        section = {"sources": sources, "accept_changed": section["accept_changed"]}  # + pinned entries (inputs)
    if stage == "shard":
        section.pop("workers", None)  # how many tokenize does not change the shards at all
    return section


def input_hashes(stage: str, cfg: PipelineConfig, upstream: dict[str, "StageInfo"], sources: list[str],
                 workdir: Path) -> dict[str, str]:
    hashes = {f"{up}.{name}": upstream[up].output_hashes[name] for up, name in STAGE_DEFS[stage].reads(cfg)}
    hashes.update(extra_input_hashes(stage, cfg))
    if stage == "download":
        hashes["sources"] = source_entries_hash(sources, sources_file(cfg, workdir))
    return hashes


# --- records ------------------------------------------------------------------------------------------------------

def artifact_dir(workdir: Path, stage: str, key: str) -> Path:
    root = Path(workdir) / STAGE_DEFS[stage].out_root
    return root if stage == "download" else root / key[:16]


def record_path(workdir: Path, stage: str, key: str) -> Path:
    return artifact_dir(workdir, stage, key) / RECORD



def source_record_path(raw_dir: Path, name: str) -> Path:
    return Path(raw_dir) / SOURCE_RECORDS / f"{name}.json"


def file_entry(f: Path, sha256: Optional[str] = None) -> dict:
    st = f.stat()
    return {"sha256": sha256 or sha256_file(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def describe_outputs(base: Path, outputs: dict[str, Path]) -> tuple[dict, dict, dict]:
    """(outputs relative to base, {file: entry} of every output file, {output: content hash})."""
    rel_outputs, files, hashes = {}, {}, {}
    for name, p in outputs.items():
        p = Path(p)
        rel = p.relative_to(base).as_posix()
        rel_outputs[name] = rel
        if p.is_file():
            files[rel] = file_entry(p)
            hashes[name] = files[rel]["sha256"]
        elif p.is_dir():
            inner = {}
            for f in _visible_files(p):
                r = f.relative_to(base).as_posix()
                files[r] = file_entry(f)
                inner[f.relative_to(p).as_posix()] = files[r]["sha256"]
            hashes[name] = folder_hash(inner)
        else:
            raise FileNotFoundError(f"{p}: the stage reported an output that does not exist")
    return rel_outputs, files, hashes


def verify_files(base: Path, files: dict[str, dict], full: bool = False) -> tuple[Optional[str], bool]:
    """Check recorded files under `base`: (None, touched) when all match, else (reason, touched).

    A file whose size and mtime are unchanged is trusted unless `full`; one whose mtime changed is
    re-hashed, and when its bytes still match the entry's mtime is refreshed (touched=True)."""
    touched = False
    for rel, e in sorted(files.items()):
        f = base / rel
        try:
            st = f.stat()
        except OSError:
            return f"{f}: missing", touched
        if st.st_size != e["size"]:
            return f"{f}: size {st.st_size} bytes, expected {e['size']}", touched
        if full or st.st_mtime_ns != e["mtime_ns"]:
            actual = sha256_file(f)
            if actual != e["sha256"]:
                return f"{f}: sha256 {actual[:16]}…, expected {e['sha256'][:16]}… (the file changed)", touched
            if st.st_mtime_ns != e["mtime_ns"]:
                e["mtime_ns"] = st.st_mtime_ns
                touched = True
    return None, touched


@dataclass
class StageInfo:
    """What the flow knows about a finished (or re-used) stage: paths are absolute for this workdir."""

    stage: str
    key: str
    artifact_dir: str
    outputs: dict[str, str]
    output_hashes: dict[str, str]
    metrics: dict[str, float]
    run_id: str
    cached: bool = False
    cached_from_run_id: str = ""
    seconds: float = 0.0
    params: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def read_record(workdir: Path, stage: str, key: str) -> Optional[dict]:
    try:
        rec = json.loads(record_path(workdir, stage, key).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("version") == RECORD_VERSION else None


def write_record(workdir: Path, stage: str, key: str, rec: dict, base: Optional[Path] = None) -> None:
    rec = dict(rec, version=RECORD_VERSION, stage=stage, key=key)
    atomic_write_text((base or artifact_dir(workdir, stage, key)) / RECORD, json.dumps(rec, indent=2))


@timing.timed("verify")
def check_stage(workdir: Path, stage: str, key: str, full: bool = False,
                sources: Optional[list[str]] = None, cfg: Optional[PipelineConfig] = None
                ) -> tuple[Optional[StageInfo], str]:
    """(info, "") when the stage's artifacts for `key` are complete and verified, else (None, why)."""
    if stage == "download":
        return check_sources(workdir, sources or [], cfg, full)
    rec = read_record(workdir, stage, key)
    base = artifact_dir(workdir, stage, key)
    if rec is None:
        return None, f"no finished run with this key ({base} has no record)"
    if rec.get("key") != key:
        return None, f"{base / RECORD}: recorded for key {str(rec.get('key'))[:16]}, not {key[:16]}"
    reason, touched = verify_files(base, rec["files"], full)
    if reason:
        return None, reason
    if touched:
        write_record(workdir, stage, key, rec)
    return StageInfo(stage=stage, key=key, artifact_dir=str(base),
                     outputs={k: str(base / v) for k, v in rec["outputs"].items()},
                     output_hashes=rec["output_hashes"], metrics=rec["metrics"], run_id=rec.get("run_id", ""),
                     seconds=rec.get("seconds", 0.0), params=rec.get("params", {})), ""



# --- raw downloads: one record per source -------------------------------------------------------------------

def _pins(cfg: Optional[PipelineConfig], workdir: Path) -> dict:
    from llm.sources import load_sources

    cfg = cfg or PipelineConfig()
    return load_sources(sources_file(cfg, workdir))


def check_sources(workdir: Path, names: list[str], cfg: Optional[PipelineConfig], full: bool = False
                  ) -> tuple[Optional[StageInfo], str]:
    """The download stage is complete when every needed source has a record whose file verifies
    and whose pin is the one sources.yaml has now."""
    raw = Path(workdir) / STAGE_DEFS["download"].out_root
    pins = _pins(cfg, workdir)
    accept = set(cfg.download.accept_changed) if cfg else set()
    outputs, hashes, run_ids, missing = {}, {}, [], []
    for name in names:
        rp = source_record_path(raw, name)
        try:
            rec = json.loads(rp.read_text())
        except (OSError, ValueError):
            missing.append(f"{name}: not downloaded yet")
            continue
        pin = pins[name].sha256 if name in pins else None
        if rec.get("pinned") != pin:
            missing.append(f"{name}: sources.yaml pins {str(pin)[:16]}…, the file was fetched for "
                           f"{str(rec.get('pinned'))[:16]}…")
            continue
        if rec["sha256"] != pin and name not in accept:
            missing.append(f"{name}: recorded sha256 differs from the pin and download.accept_changed omits it")
            continue
        reason, touched = verify_files(raw, {rec["file"]: rec}, full)
        if reason:
            missing.append(f"{reason} (source {name}, pinned sha256 {str(pin)[:16]}…)")
            continue
        if touched:
            atomic_write_text(rp, json.dumps(rec, indent=2))
        outputs[name] = str(raw / rec["file"])
        hashes[name] = rec["sha256"]
        run_ids.append(rec.get("run_id", ""))
    if missing:
        return None, "; ".join(missing)
    return StageInfo(stage="download", key="", artifact_dir=str(raw), outputs=outputs, output_hashes=hashes,
                     metrics={"files_downloaded": 0.0, "files_skipped": float(len(names))},
                     run_id=next((r for r in run_ids if r), "")), ""


def write_source_records(raw: Path, outputs: dict[str, Path], cfg: PipelineConfig, workdir: Path,
                         run_id: str) -> None:
    pins = _pins(cfg, workdir)
    for name, p in outputs.items():
        p = Path(p)
        rec = file_entry(p)
        rec.update(name=name, file=p.relative_to(raw).as_posix(), pinned=pins[name].sha256, run_id=run_id)
        atomic_write_text(source_record_path(raw, name), json.dumps(rec, indent=2))


def drop_source_records(raw: Path, names: list[str]) -> None:
    for n in names:
        source_record_path(raw, n).unlink(missing_ok=True)


# --- leftovers ------------------------------------------------------------------------------------------------

def remove_stale_partials(workdir: Path, stage: str, key: str) -> list[Path]:
    """After `stage` finished under `key`: remove its other keys' unfinished `.partial` folders."""
    if stage == "download":
        return []
    root = Path(workdir) / STAGE_DEFS[stage].out_root
    keep = artifact_dir(workdir, stage, key).name + ".partial"
    removed = []
    for p in root.glob("*.partial"):
        if p.name != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


if __name__ == "__main__":
    if sys.argv[1:2] == ["--closure"]:
        for st in sys.argv[2:]:
            print(st, " ".join(sorted(stage_closure(st))))
    else:
        for arg in sys.argv[1:]:
            print(hash_path(arg), arg)

"""Dataset sources (data/sources.yaml) and the download stage: fetch, verify sha256, extract, record.

Every dataset llmpipe uses is pinned in data/sources.yaml by URL and the sha256 of the file the
pipeline reads (for a zip: of the extracted member). `fetch` gets one source into a raw folder:

- http(s) URLs, file:// URLs and plain local paths;
- `mirror` replaces the URL's base: a local folder (or file:// URL) -> <mirror>/<file>, falling back
  to <mirror>/<basename(url)>; a base URL -> <base>/<file>, then <base>/<basename(url)>. So a mirror
  may hold the bare file or the original archive;
- transient failures (connection errors, HTTP 5xx, 408 and 429, a body shorter than its
  Content-Length) are retried here, and only here, with exponential backoff (a Retry-After header is
  honoured), each retry logged with its number; after the last try a `TransientDownloadError`;
- bytes go to a temp file that is renamed into place only once verified; a file already present
  with the pinned hash is not fetched again (no network at all);
- zip archives are checked before extraction: a member whose path would escape the target folder
  ("../x", "/etc/x") makes the whole archive an error;
- a sha256 mismatch raises `ChecksumError` and leaves no file behind, unless the source is
  accepted as changed (`accept_changed`): then the file is kept and its new hash recorded.

    from llm.sources import load_sources, fetch
    src = load_sources()["the_verdict"]
    res = fetch(src, "data/raw", mirror="../shared/data")   # FetchResult(path, sha256, downloaded, changed, url)

`run_download(cfg, raw_dir)` is the pipeline stage: it fetches cfg.sources and writes
raw_dir/download_manifest.json (name, url actually used, sha256, size). Run
`python -m llm.sources [--mirror DIR] NAME ...` to fetch sources into data/raw by hand.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import posixpath
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

import yaml
from tqdm.auto import tqdm

import llm
from llm.config import DownloadConfig, yaml_error_message
from llm.fsutil import atomic_write_text, publish_file, sha256_file, temp_file
from llm.result import MetricLogger, StageResult, log_or_null

log = logging.getLogger("llmpipe")
KINDS = ("text", "sms_spam", "instructions", "preferences")
MANIFEST_NAME = "download_manifest.json"
CHUNK = 1 << 16
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {"name", "url", "file", "sha256", "member", "kind", "description", "license"}


class DownloadError(OSError):
    """A download failed for a reason that retrying will not fix (HTTP 4xx, unreadable archive...)."""


class TransientDownloadError(DownloadError):
    """A failure that may succeed on retry: connection error, HTTP 5xx, truncated body, timeout."""


class ChecksumError(ValueError):
    """The fetched file's sha256 differs from the pinned one."""


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    file: str  # relative posix path under the raw folder / mirror
    sha256: str
    kind: str = "text"
    member: Optional[str] = None
    description: str = ""
    license: str = ""


@dataclass
class FetchResult:
    path: Path
    sha256: str
    downloaded: bool  # False: an existing verified file was kept
    changed: bool  # True: the hash differs from the pinned one and was accepted
    url: str = ""  # where the bytes came from ("" when skipped)
    size: int = 0
    bytes_fetched: int = 0  # bytes transferred (the archive's size for a zip)


# ----------------------------------------------------------------------------------- sources.yaml

def default_sources_path() -> Path:
    """<cwd>/data/sources.yaml if present, else the copy shipped next to the package."""
    candidates = [
        Path.cwd() / "data" / "sources.yaml",
        Path(llm.__file__).resolve().parent.parent / "data" / "sources.yaml",
        Path(llm.__file__).resolve().parent / "sources.yaml",  # package-data copy in a wheel install
    ]
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(f"sources.yaml not found (looked in {', '.join(str(c) for c in candidates)})")


def _check_relpath(value: str, where: str, fld: str) -> str:
    p = PurePosixPath(value)
    if not value or p.is_absolute() or ".." in p.parts or "\\" in value:
        raise ValueError(f"{where}: field '{fld}': expected a relative path without '..', got {value!r}")
    return str(p)


def load_sources(path: str | Path | None = None) -> dict[str, Source]:
    """Parse sources.yaml into {name: Source}; a malformed entry is a ValueError naming file and entry."""
    path = Path(path) if path is not None else default_sources_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: sources file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(yaml_error_message(path, e)) from None
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        raise ValueError(f"{path}: expected a top-level 'sources:' list of entries")
    out: dict[str, Source] = {}
    for i, entry in enumerate(data["sources"]):
        where = f"{path}: sources[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping with name, url, file, sha256, kind; got {entry!r}")
        if isinstance(entry.get("name"), str):
            where = f"{path}: source '{entry['name']}' (sources[{i}])"
        unknown = set(entry) - _FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(_FIELDS)}")
        for fld in ("name", "url", "file", "sha256"):
            if not isinstance(entry.get(fld), str) or not entry[fld].strip():
                raise ValueError(f"{where}: field '{fld}': expected a non-empty string, got {entry.get(fld)!r}")
        name = entry["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{where}: field 'name': expected letters, digits, _ . -; got {name!r}")
        if name in out:
            raise ValueError(f"{where}: duplicate source name {name!r}")
        sha = entry["sha256"].strip().lower()
        if not _SHA256_RE.match(sha):
            raise ValueError(f"{where}: field 'sha256': expected 64 hex digits, got {entry['sha256']!r}")
        kind = entry.get("kind", "text")
        if kind not in KINDS:
            raise ValueError(f"{where}: field 'kind': expected one of {', '.join(KINDS)}, got {kind!r}")
        member = entry.get("member")
        if member is not None and (not isinstance(member, str) or not member.strip()):
            raise ValueError(f"{where}: field 'member': expected a zip member name, got {member!r}")
        for fld in ("description", "license"):
            if not isinstance(entry.get(fld, ""), str):
                raise ValueError(f"{where}: field '{fld}': expected a string, got {entry[fld]!r}")
        out[name] = Source(
            name=name, url=entry["url"].strip(), file=_check_relpath(entry["file"].strip(), where, "file"),
            sha256=sha, kind=kind, member=member, description=entry.get("description", ""),
            license=entry.get("license", ""),
        )
    return out


# ------------------------------------------------------------------------------------ fetching



def _is_url(s: str) -> bool:
    return urllib.parse.urlsplit(s).scheme in ("http", "https", "file")


def _local_path(s: str) -> Path:
    """A plain path or file:// URL as a Path."""
    parts = urllib.parse.urlsplit(s)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return Path(s)


def _url_basename(url: str) -> str:
    if _is_url(url):
        return posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    return _local_path(url).name


def candidates(source: Source, mirror: str | Path | None = None) -> list[str]:
    """Locations to try, in order: the URL itself, or <mirror>/<file> then <mirror>/<basename(url)>."""
    if mirror is None or str(mirror) == "":
        return [source.url]
    mirror = str(mirror)
    names = [source.file]
    base = _url_basename(source.url)
    if base and base != source.file:
        names.append(base)
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme in ("http", "https"):
        root = mirror.rstrip("/")
        return [f"{root}/{urllib.parse.quote(n)}" for n in names]
    root = _local_path(mirror)
    return [str(root / n) for n in names]


class _NotFound(Exception):
    pass


def _copy_stream(src, dst, total: Optional[int], desc: str, progress: bool) -> int:
    n = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress,
              leave=False) as bar:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            dst.write(chunk)
            n += len(chunk)
            bar.update(len(chunk))
    return n


def _fetch_to(location: str, tmp: Path, timeout: float, desc: str, progress: bool) -> int:
    """Copy one location's bytes to tmp. Raises _NotFound, TransientDownloadError or DownloadError."""
    scheme = urllib.parse.urlsplit(location).scheme
    if scheme not in ("http", "https"):
        path = _local_path(location)
        if not path.is_file():
            raise _NotFound(location)
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            return _copy_stream(src, dst, path.stat().st_size, desc, progress)
    req = urllib.request.Request(location, headers={"User-Agent": "llmpipe/0.1"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with open(tmp, "wb") as dst:
                n = _copy_stream(resp, dst, total, desc, progress)
            if total is not None and n < total:
                raise TransientDownloadError(f"{location}: truncated body ({n} of {total} bytes)")
            return n
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise _NotFound(location) from None
        if e.code >= 500 or e.code in (408, 429):
            err = TransientDownloadError(f"{location}: HTTP {e.code} {e.reason}")
            retry_after = (e.headers or {}).get("Retry-After", "")
            err.retry_after = float(retry_after) if retry_after.strip().isdigit() else None
            raise err from None
        raise DownloadError(f"{location}: HTTP {e.code} {e.reason}") from None
    except TransientDownloadError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError,
            ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        raise TransientDownloadError(f"{location}: {type(e).__name__}: {reason}") from None


def _safe_member_path(folder: Path, name: str) -> Path:
    p = PurePosixPath(name.replace("\\", "/"))
    target = (folder / p).resolve()
    root = folder.resolve()
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name) or (target != root and root not in target.parents):
        raise ValueError(f"unsafe zip member {name!r}: its path escapes the target folder {folder}")
    return target


def _extract_member(archive: Path, member: str, dest_tmp: Path, where: str) -> None:
    """Extract `member` of a zip to dest_tmp after checking every member path is safe."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                try:
                    _safe_member_path(dest_tmp.parent, info.filename)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            match = [i for i in infos if i.filename == member]
            if not match:
                match = [i for i in infos if PurePosixPath(i.filename).name == member and not i.is_dir()]
            if len(match) != 1:
                names = [i.filename for i in infos]
                raise ValueError(f"{where}: archive has {'no' if not match else 'several'} member {member!r} "
                                 f"(members: {names[:20]})")
            with zf.open(match[0]) as src, open(dest_tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{where}: not a readable zip archive ({e})") from None


def _recorded_sha256(raw_dir: Path, name: str) -> Optional[str]:
    """The hash a previous run accepted for `name` (download manifest), if any."""
    try:
        data = json.loads((raw_dir / MANIFEST_NAME).read_text())
        return data["sources"][name]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fetch(source: Source, raw_dir: str | Path, mirror: str | Path | None = None, retries: int = 3,
          timeout: float = 60.0, accept_changed: bool = False, progress: bool = True,
          backoff: float = 1.0) -> FetchResult:
    """Get `source` into raw_dir/<source.file>, verified; see the module docstring for the rules."""
    raw_dir = Path(raw_dir)
    dest = raw_dir / source.file
    if dest.is_file():
        have = sha256_file(dest)
        if have == source.sha256:
            return FetchResult(dest, have, downloaded=False, changed=False, size=dest.stat().st_size)
        if accept_changed and have == _recorded_sha256(raw_dir, source.name):
            return FetchResult(dest, have, downloaded=False, changed=True, size=dest.stat().st_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tried: list[str] = []
    for location in candidates(source, mirror):
        tmp = temp_file(dest.parent, prefix=f".{dest.name}.", suffix=".part")
        member_tmp = tmp.with_suffix(".member")
        try:
            attempt = 0
            while True:
                try:
                    nbytes = _fetch_to(location, tmp, timeout, source.name, progress)
                    break
                except TransientDownloadError as e:
                    if attempt >= retries:
                        raise TransientDownloadError(f"source '{source.name}': giving up after "
                                                     f"{attempt + 1} tries: {e}") from None
                    wait = backoff * (2 ** attempt)
                    if getattr(e, "retry_after", None) is not None:
                        wait = min(max(wait, e.retry_after), 300.0)  # the server's Retry-After, capped
                    log.warning("source '%s': try %d of %d failed (%s); trying again in %.0f s",
                                source.name, attempt + 1, retries + 1, e, wait)
                    time.sleep(wait)
                    attempt += 1
            final = tmp
            if source.member and zipfile.is_zipfile(tmp):
                _extract_member(tmp, source.member, member_tmp, f"source '{source.name}' ({location})")
                final = member_tmp
            actual = sha256_file(final)
            changed = actual != source.sha256
            if changed and not accept_changed:
                what = f"member {source.member!r} of " if final is member_tmp else ""
                raise ChecksumError(
                    f"source '{source.name}': sha256 mismatch for {what}{location}: expected {source.sha256}, "
                    f"got {actual}. If the upstream file legitimately changed, accept it with "
                    f"download.accept_changed=[{source.name}] (the new hash is recorded).")
            publish_file(final, dest)  # fsync, rename, fsync the folder
            return FetchResult(dest, actual, downloaded=True, changed=changed, url=location,
                               size=dest.stat().st_size, bytes_fetched=nbytes)
        except _NotFound:
            tried.append(location)
        finally:
            for p in (tmp, member_tmp):
                if p.exists():
                    p.unlink()
    raise FileNotFoundError(f"source '{source.name}': not found at {', '.join(tried)}")


# ------------------------------------------------------------------------------------ the stage

def run_download(cfg: DownloadConfig, raw_dir: Path, progress: bool = True, log: Optional[MetricLogger] = None,
                 sources_path: str | Path | None = None, backoff: float = 1.0) -> StageResult:
    """Fetch cfg.sources into raw_dir and write raw_dir/download_manifest.json.

    outputs: {source name: path of its file}. metrics: files_downloaded, files_skipped,
    bytes_downloaded, sources_changed.
    """
    log = log_or_null(log)
    raw_dir = Path(raw_dir)
    path = Path(sources_path) if sources_path is not None else default_sources_path()
    known = load_sources(path)
    for fld in ("sources", "accept_changed"):
        unknown = [n for n in getattr(cfg, fld) if n not in known]
        if unknown:
            raise ValueError(f"download.{fld}: unknown source {unknown[0]!r} (not in {path}); "
                             f"known sources: {', '.join(known)}")
    raw_dir.mkdir(parents=True, exist_ok=True)
    mirror = cfg.mirror
    if mirror and not _is_url(mirror) and not Path(mirror).is_dir():
        raise FileNotFoundError(f"download.mirror: {mirror!r} is neither a folder nor an http(s)/file URL")
    metrics = {"files_downloaded": 0, "files_skipped": 0, "bytes_downloaded": 0, "sources_changed": 0}
    outputs: dict[str, Path] = {}
    entries: dict[str, dict] = {}
    names = list(dict.fromkeys(cfg.sources))
    for i, name in enumerate(names):
        src = known[name]
        res = fetch(src, raw_dir, mirror=mirror, retries=cfg.retries, timeout=cfg.timeout,
                    accept_changed=name in cfg.accept_changed, progress=progress, backoff=backoff)
        outputs[name] = res.path
        metrics["files_downloaded" if res.downloaded else "files_skipped"] += 1
        metrics["bytes_downloaded"] += res.bytes_fetched
        metrics["sources_changed"] += int(res.changed)
        prev = _recorded_url(raw_dir, name) if not res.downloaded else None
        entries[name] = {
            "url": res.url or prev or src.url, "file": src.file, "sha256": res.sha256,
            "expected_sha256": src.sha256, "changed": res.changed, "size": res.size,
            "kind": src.kind, "downloaded": res.downloaded,
        }
        log({"files_done": i + 1, "bytes_downloaded": metrics["bytes_downloaded"]}, i + 1)
    manifest = raw_dir / MANIFEST_NAME
    atomic_write_text(manifest, json.dumps({"sources_file": str(path), "sources": entries}, indent=2) + "\n")
    changed = {n: e["sha256"] for n, e in entries.items() if e["changed"]}
    params = {"sources": ",".join(names)}
    if changed:
        params["changed_sha256"] = json.dumps(changed)
    return StageResult(metrics={k: float(v) for k, v in metrics.items()}, params=params,
                       artifacts=[manifest], outputs=outputs)


def _recorded_url(raw_dir: Path, name: str) -> Optional[str]:
    try:
        return json.loads((raw_dir / MANIFEST_NAME).read_text())["sources"][name]["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Fetch sources from data/sources.yaml into a raw folder.")
    ap.add_argument("names", nargs="*", help="source names (default: all)")
    ap.add_argument("--mirror", default=None)
    ap.add_argument("--raw-dir", default="data/raw")
    args = ap.parse_args()
    names = args.names or list(load_sources())
    result = run_download(DownloadConfig(sources=names, mirror=args.mirror), Path(args.raw_dir))
    print(json.dumps({k: str(v) for k, v in result.outputs.items()}, indent=2))
    print(result.metrics, file=sys.stderr)

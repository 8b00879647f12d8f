"""Atomic file and folder writes with no heavy imports (no torch), for every stage that writes files.

    from llm.fsutil import atomic_write_text, atomic_write_via, atomic_dir
    atomic_write_text(Path("out/manifest.json"), json.dumps(manifest))
    atomic_write_via(Path("out/scores.parquet"), lambda tmp: df.to_parquet(tmp))   # a writer that wants a path
    with atomic_dir(Path("out/ckpt")) as tmp:                                       # a folder of files
        save_file(sd, str(tmp / "model.safetensors"))

The one rule: a write goes to a temp file (or folder) next to the target, its bytes are fsynced, it is
renamed over the target, and then the containing folder is fsynced so the rename itself survives a
crash. A reader sees the old file or the new one, never half of one. `publish_file`/`publish_dir` are
the last two steps alone, for writers that already stream into a temp path of their own (a parquet
shard writer, a stage's `<key>.partial/` folder).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def fsync_dir(directory: Path) -> None:
    """fsync a folder, so that a rename or a new file in it is on disk (not supported everywhere:
    a filesystem that refuses it is skipped)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: Path, path: Path) -> Path:
    """The end of every atomic write: fsync the finished temp file `tmp`, rename it over `path`
    (same folder), fsync the folder."""
    path = Path(path)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def publish_dir(tmp: Path, directory: Path, replace: bool = True) -> Path:
    """Publish a finished folder `tmp` as `directory` (a sibling): fsync every file and folder in it,
    rename it into place (an existing `directory` is moved aside first and removed after, so a reader
    sees the old folder or the new one), fsync the parent. replace=False: an existing non-empty
    `directory` is kept and the rename's OSError raised (someone else published it first)."""
    tmp, directory = Path(tmp), Path(directory)
    for root, dirs, files in os.walk(tmp):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                fsync_file(Path(p))
        fsync_dir(Path(root))
    if replace and directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
    return directory


def temp_file(directory: Path, prefix: str, suffix: str = ".tmp") -> Path:
    """A new empty temp file in `directory` (for a write-then-rename) with normal permissions
    (mkstemp alone gives 0600, which the final file would keep)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return Path(name)


def atomic_write_via(path: Path, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Atomically create `path` with a writer that wants a file name (parquet, csv, safetensors,
    matplotlib): `write(tmp)` fills a temp file in the same folder, which is then published
    (fsync, rename, fsync folder). `suffix` ends the temp name, for writers that go by the extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        write(tmp)
        publish_file(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    atomic_write_via(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(directory: Path) -> Iterator[Path]:
    """Build a folder atomically: the body fills the yielded temp folder (a sibling of `directory`,
    normal permissions); on success it is published as `directory` (publish_dir), on an exception
    it is removed and `directory` is left as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        publish_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_umask() -> int:
    try:  # Linux: read it without changing it (os.umask(0) would briefly affect every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import


def _umask() -> int:
    return _UMASK


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically (atomic_write_via) and close it."""
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only the plotting stages need it

    try:
        return atomic_write_via(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), suffix=".tmp.png")
    finally:
        plt.close(fig)

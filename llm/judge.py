"""Model-judged scoring stage (the book's section 7.8): an LLM scores each response 0-100.

    from llm.judge import run_judge
    result = run_judge(cfg.judge, Path("out/instruct/responses.parquet"), Path("out/judge"),
                       cache_path=Path("data/judge_cache.sqlite"))
    result.metrics["judge_mean_score"], result.metrics["judge_reference_score"]

    python -m llm.judge --responses out/instruct/responses.parquet --out out/judge \
        [--cache data/judge_cache.sqlite] [--set url=http://localhost:11434/v1 --set model=llama3]

The judge is any OpenAI-compatible chat-completions server (``POST {url}/chat/completions``):
Ollama's ``/v1``, llama.cpp's ``llama-server``, vLLM, OpenAI. With ``judge.url`` unset the stage
starts the embedded judge (llm/judge_server.py: Qwen2.5-Coder-1.5B-Instruct on 127.0.0.1, installed
by scripts/install_judge.sh), scores, and always stops it again.

The book's judge (Llama 3 8B through Ollama):

    ollama pull llama3 && ollama serve            # listens on localhost:11434
    llmpipe run judge --set judge.url=http://localhost:11434/v1 --set judge.model=llama3 \
                      --set judge.prompt=book
    # a hosted API: --set judge.url=https://api.openai.com/v1 --set judge.model=gpt-4o-mini
    #               --set judge.api_key_env=OPENAI_API_KEY   (the key is read from that variable)

Requests: temperature cfg.temperature (0) and cfg.seed are always sent (Ollama's /v1 would otherwise
sample at temperature 1). Prompts (cfg.prompt):
  book   -- the book's, verbatim: "Given the input `{format_input(entry)}` and correct output
            `{output}`, score the model response `{response}` on a scale from 0 to 100, where 100 is
            the best score. Respond with the integer number only."
  rubric -- the default: task, reference answer (labelled correct) and the candidate answer in
            triple quotes, with a rubric (wrong / off-topic / empty = 0-20, partly right = 21-79,
            right = 80-100, "an answer about something else is wrong, however well written").
The answer is forced to an integer where the server allows it (cfg.constrain): "grammar" sends
llama.cpp's GBNF ``root ::= "100" | [1-9]? [0-9]`` (llama-server, the embedded judge);
"json_schema" sends ``response_format`` with a {"score": integer 0..100} schema (Ollama, vLLM,
OpenAI, llama-server); "auto" uses grammar for the embedded judge and json_schema for judge.url,
and drops the constraint for the rest of the run if the server answers 400 to it.

Parsing (`parse_score`) is strict: the whole answer, after trimming whitespace and one trailing
period, must be an integer 0..100 ("85", " 85.\\n"), or exactly "N/100", or a JSON object
{"score": N}. Anything else -- "Score: 85", "85.5", "eighty", "101", "-3", "" -- is unparseable:
the judge is asked once more (the conversation continued with "Respond with the integer number
only."), and if that answer is unparseable too, the item is recorded as unscored (None), never
guessed. "Score: 85" is deliberately not accepted: a judge told to answer with the number only
that adds words is not following the protocol, and the retry shows whether it can.

Connection errors, HTTP 5xx and 429 are retried cfg.retries times with exponential backoff
(0.5 s, 1 s, 2 s, ... capped at 20 s; Retry-After honoured). The API key (cfg.api_key_env names
the environment variable) goes only into the Authorization header; it is never logged or written.

Cache: every judgement is stored in an SQLite file (cache_path; the orchestrator passes one that
persists across runs, e.g. data/judge_cache.sqlite) keyed by sha256 of (judge model, exact
messages, parameters), so a re-run asks the server nothing it has answered before. Each entry is
committed in its own transaction (WAL journal): a killed run leaves a valid cache.

Calibration (every run): for the first cfg.calibration_sample records the reference output itself,
an empty answer and a fluent but wrong answer (the next calibration record's reference) are scored
too. A useful judge gives the references a high score and the other two a low one;
`judge_reference_score`, `judge_empty_score` and `judge_wrong_score` are reported beside
`judge_mean_score` so a run shows how far its judge can be trusted: a high wrong score means the
judge rewards well-formed answers to a different question, and judge_mean_score is inflated.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import pandas as pd

from llm.config import JudgeConfig
from llm.fsutil import save_figure
from llm.result import MetricLogger, StageResult, log_or_null

INTEGER_GRAMMAR = 'root ::= "100" | [1-9]? [0-9]'
SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
                "required": ["score"], "additionalProperties": False}
RETRY_MESSAGE = "Respond with the integer number only (0 to 100), nothing else."
FIELDS = ("instruction", "input", "output", "response")
_INT_RE = re.compile(r"(0|[1-9][0-9]?|100)")
_FRACTION_RE = re.compile(r"(0|[1-9][0-9]?|100)\s*/\s*100")


class JudgeError(RuntimeError):
    """The judge server failed in a way retries do not fix (bad URL, auth, 4xx, persistent 5xx)."""


# --------------------------------------------------------------------------------------------
# Prompts and parsing
# --------------------------------------------------------------------------------------------

def format_input(entry: dict) -> str:
    """The book's Alpaca-style instruction + input text (as in llm.instruct)."""
    from llm.instruct import format_input as fmt

    return fmt(entry, "alpaca")


def book_prompt(entry: dict, response: str) -> str:
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{response}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def rubric_prompt(entry: dict, response: str) -> str:
    """The default prompt: labelled task / reference / candidate and a score rubric. Chosen among five
    wordings by how Qwen2.5-Coder-1.5B scored 8 records of the book's test set given their reference,
    the gpt2-medium response, another record's reference (wrong) and an empty answer: 85 / 70 / 42.5 / 0
    (the first rubric wording tried gave 100 / 75 / 60 / 42.5, the book's prompt is in the README)."""
    task = entry["instruction"] + (f"\n\nInput:\n{entry['input']}" if entry["input"] else "")
    return ("Compare a candidate answer with a reference answer to the same task.\n\n"
            f"Task:\n{task}\n\n"
            f"Reference answer (correct):\n{entry['output']}\n\n"
            f'Candidate answer:\n"""{response}"""\n\n'
            "Does the candidate answer complete the task as well as the reference answer? "
            "An answer about something else is wrong, however well written. "
            "Score it from 0 to 100: 0-20 if it is wrong, off-topic, empty or missing; 21-79 if it is partly right; "
            "80-100 if it is right (wording may differ). Respond with the integer number only.")


PROMPTS: dict[str, Callable[[dict, str], str]] = {"book": book_prompt, "rubric": rubric_prompt}


def parse_score(text: Optional[str]) -> Optional[int]:
    """Strict: an integer 0..100 (optional surrounding whitespace and one trailing period), "N/100",
    or a JSON object {"score": N}; anything else is None (see the module docstring)."""
    if text is None:
        return None
    s = text.strip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            return None
        v = obj.get("score") if isinstance(obj, dict) and len(obj) == 1 else None
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100 else None
    if s.endswith("."):
        s = s[:-1].rstrip()
    m = _INT_RE.fullmatch(s) or _FRACTION_RE.fullmatch(s)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

class JudgeCache:
    """SQLite store of judgements keyed by sha256(model, messages, params); safe across threads."""

    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path is not None else None
        self.lock = threading.Lock()
        self.conn = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, model TEXT, "
                                  "prompt TEXT, params TEXT, answer TEXT, score INTEGER, created REAL)")
                self.conn.commit()
            except sqlite3.DatabaseError as e:
                raise ValueError(f"{self.path}: not a usable judge cache ({e}); delete it or pass another path") from None

    @staticmethod
    def key(model: str, messages: list[dict], params: dict) -> str:
        blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> Optional[tuple[Optional[str], Optional[int]]]:
        if self.conn is None:
            return None
        with self.lock:
            row = self.conn.execute("SELECT answer, score FROM judgements WHERE key = ?", (key,)).fetchone()
        return (row[0], row[1]) if row else None

    def put(self, key: str, model: str, prompt: str, params: dict, answer: Optional[str], score: Optional[int]) -> None:
        if self.conn is None:
            return
        with self.lock, self.conn:  # one transaction per entry
            self.conn.execute("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (key, model, prompt, json.dumps(params, sort_keys=True), answer, score, time.time()))

    def close(self) -> None:
        if self.conn is not None:
            with self.lock:
                self.conn.close()
            self.conn = None


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------

@dataclass
class JudgeClient:
    """Minimal OpenAI-compatible chat-completions client (standard library only)."""

    base_url: str
    model: str
    api_key: Optional[str] = field(default=None, repr=False)
    temperature: float = 0.0
    seed: Optional[int] = 123
    max_tokens: int = 16
    constrain: str = "none"  # grammar | json_schema | none
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 0.5
    requests: int = 0  # HTTP requests made (for reporting)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _constraint_dropped: bool = False

    def params(self) -> dict:
        """The generation parameters that, with the model and messages, determine an answer."""
        return {"temperature": self.temperature, "seed": self.seed, "max_tokens": self.max_tokens,
                "constrain": self.constrain}  # as requested: a server that rejects it answers the same way again

    def _body(self, messages: list[dict]) -> dict:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "stream": False}
        if self.seed is not None:
            body["seed"] = self.seed
        if not self._constraint_dropped:
            if self.constrain == "grammar":
                body["grammar"] = INTEGER_GRAMMAR
            elif self.constrain == "json_schema":
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "score", "strict": True, "schema": SCORE_SCHEMA}}
        return body

    def _post(self, body: dict) -> tuple[int, dict, dict]:
        url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with self._lock:
            self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, json.loads(r.read() or b"{}"), dict(r.headers)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                payload = {"error": {"message": raw[:300].decode(errors="replace")}}
            return e.code, payload if isinstance(payload, dict) else {}, dict(e.headers or {})

    def chat(self, messages: list[dict]) -> str:
        """The assistant's answer text; retries transient failures, raises JudgeError otherwise."""
        last = ""
        for attempt in range(self.retries + 1):
            delay = min(20.0, self.backoff * (2 ** attempt))
            try:
                status, payload, headers = self._post(self._body(messages))
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = f"cannot reach {self.base_url} ({getattr(e, 'reason', e)})"
            else:
                if status == 200:
                    try:
                        content = payload["choices"][0]["message"]["content"]
                    except (KeyError, IndexError, TypeError):
                        raise JudgeError(f"{self.base_url}: response without choices[0].message.content: "
                                         f"{json.dumps(payload)[:300]}") from None
                    return content if isinstance(content, str) else ""
                msg = str((payload.get("error") or {}).get("message", "") if isinstance(payload.get("error"), dict)
                          else payload.get("error", ""))[:300]
                if status == 400 and self.constrain != "none" and not self._constraint_dropped:
                    # the server does not understand the constraint: parse strictly instead
                    self._constraint_dropped = True
                    sys.stderr.write(f"judge: {self.base_url} rejected the {self.constrain} constraint ({msg}); "
                                     "continuing without it\n")
                    return self.chat(messages)
                if status == 429 or status >= 500:
                    last = f"HTTP {status} from {self.base_url} ({msg})"
                    ra = headers.get("Retry-After") or headers.get("retry-after")
                    if ra:
                        with contextlib.suppress(ValueError):
                            delay = min(60.0, float(ra))
                else:
                    hint = " (check judge.api_key_env)" if status in (401, 403) else ""
                    hint = hint or (f" (check judge.model: {self.model!r})" if status == 404 else "")
                    raise JudgeError(f"HTTP {status} from {self.base_url}/chat/completions{hint}: {msg}")
            if attempt < self.retries:
                time.sleep(delay)
        raise JudgeError(f"judge failed after {self.retries + 1} attempts: {last}")


@dataclass
class Judgement:
    score: Optional[int]
    answer: Optional[str]
    cached: bool
    seconds: float


def judge_one(client: JudgeClient, cache: JudgeCache, prompt: str) -> Judgement:
    """Score one prompt: cache, then ask; an unparseable answer is asked once more, then unscored."""
    messages = [{"role": "user", "content": prompt}]
    params = client.params()
    key = cache.key(client.model, messages, params)
    hit = cache.get(key)
    if hit is not None:
        return Judgement(hit[1], hit[0], True, 0.0)
    t = time.monotonic()
    answer = client.chat(messages)
    score = parse_score(answer)
    answers = [answer]
    if score is None:
        retry = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": RETRY_MESSAGE}]
        answer2 = client.chat(retry)
        answers.append(answer2)
        score = parse_score(answer2)
    shown = answers[0] if len(answers) == 1 else json.dumps(answers, ensure_ascii=False)
    cache.put(key, client.model, prompt, params, shown, score)
    return Judgement(score, shown, False, time.monotonic() - t)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_responses(path: str | Path) -> list[dict]:
    """Records with instruction, input, output, response (strings) from Parquet, JSON or JSONL.
    A "model_response" column (the book's instruction-data-with-response.json) counts as response."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: responses file not found")
    if path.suffix.lower() == ".parquet":
        try:
            rows = pd.read_parquet(path).to_dict("records")
        except Exception as e:
            raise ValueError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
        where = lambda i: f"{path}: row {i}"  # noqa: E731
    else:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            rows, lines = [], []
            for ln, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {ln}: invalid JSON ({e.msg})") from None
                    lines.append(ln)
            where = lambda i: f"{path}: line {lines[i]}: record {i}"  # noqa: E731
        else:
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
            if not isinstance(rows, list):
                raise ValueError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
            where = lambda i: f"{path}: record {i}"  # noqa: E731
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{where(i)}: expected an object with {', '.join(FIELDS)}; got {type(r).__name__}")
        if "response" not in r and "model_response" in r:
            r = {**r, "response": r["model_response"]}
        for f in FIELDS:
            if f not in r:
                raise ValueError(f"{where(i)}: missing field '{f}' (expected a string)")
            if not isinstance(r[f], str):
                raise ValueError(f"{where(i)}: field '{f}' must be a string, got {type(r[f]).__name__}")
        out.append({f: r[f] for f in FIELDS})
    if not out:
        raise ValueError(f"{path}: no responses to judge")
    return out


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

def judge_identity(cfg: JudgeConfig) -> tuple[str, str]:
    """(model name, constraint) the stage will use: known before any server starts (cache lookups)."""
    if cfg.url:
        if not cfg.model:
            raise ValueError("judge.model must name the server's model when judge.url is set "
                             "(e.g. --set judge.model=llama3 for Ollama)")
        return cfg.model, "json_schema" if cfg.constrain == "auto" else cfg.constrain
    from llm.judge_server import model_name, resolve_backend

    return model_name(resolve_backend(cfg.backend)), "grammar" if cfg.constrain == "auto" else cfg.constrain


@contextlib.contextmanager
def judge_endpoint(cfg: JudgeConfig, out_dir: Path, needed: bool = True) -> Iterator[str]:
    """Base URL of cfg.url, or of the embedded judge started for the block (not started if not needed)."""
    if cfg.url or not needed:
        yield cfg.url or ""
        return
    from llm.judge_server import EmbeddedJudge

    with EmbeddedJudge(backend=cfg.backend, threads=cfg.threads, log_file=out_dir / "judge_server.log") as j:
        yield j.base_url


def _api_key(cfg: JudgeConfig) -> Optional[str]:
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ValueError(f"judge.api_key_env: environment variable {cfg.api_key_env} is not set or empty")
    return key


def _mean(xs: list[Optional[int]]) -> Optional[float]:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def plot_histogram(df: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = list(range(0, 101, 10))
    bins[-1] = 100.001
    for kind, color in (("model", "tab:blue"), ("reference", "tab:green"), ("wrong", "tab:orange"),
                        ("empty", "tab:red")):
        s = df.loc[(df["kind"] == kind) & df["score"].notna(), "score"].astype(float)
        if len(s):
            ax.hist(s, bins=bins, alpha=0.55, color=color, label=f"{kind} (n={len(s)}, mean {s.mean():.1f})",
                    density=True)
    ax.set_xlim(0, 100)
    ax.set_xlabel("judge score")
    ax.set_ylabel("fraction per point")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _write_table(df: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    pq, csv = out_dir / "scores.parquet", out_dir / "scores.csv"
    tmp = out_dir / ".scores.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, pq)
    tmp = out_dir / ".scores.csv.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    return pq, csv


def run_judge(cfg: JudgeConfig, responses: Path, out_dir: Path, cache_path: Optional[Path] = None,
              progress: bool = True, log: Optional[MetricLogger] = None) -> StageResult:
    """Score every response (cfg.limit first ones) plus the calibration items; see the module docstring.

    Metrics: judge_mean_score (0-100, over scored model responses), judge_scored, judge_unscored,
    judge_reference_score, judge_empty_score, judge_wrong_score, judge_calibration_gap (reference - empty),
    judge_requests (HTTP requests made: 0 on a fully cached re-run), judge_cache_hits, judge_seconds.
    Artifacts: scores.parquet, scores.csv (one row per judged item), scores_hist.png."""
    from tqdm import tqdm

    log = log_or_null(log)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    records = load_responses(responses)
    if cfg.limit is not None:
        records = records[:cfg.limit]
    prompt_fn = PROMPTS[cfg.prompt]
    items = [("model", i, r, r["response"]) for i, r in enumerate(records)]
    n_cal = min(cfg.calibration_sample, len(records))
    items += [("reference", i, records[i], records[i]["output"]) for i in range(n_cal)]
    items += [("empty", i, records[i], "") for i in range(n_cal)]
    # a fluent but wrong answer: the next calibration record's reference (needs two different outputs)
    wrong = [(i, records[(i + 1) % n_cal]["output"]) for i in range(n_cal) if n_cal > 1]
    items += [("wrong", i, records[i], out) for i, out in wrong if out.strip() != records[i]["output"].strip()]
    api_key = _api_key(cfg)
    model, constrain = judge_identity(cfg)
    client = JudgeClient(cfg.url or "", model, api_key=api_key, temperature=cfg.temperature, seed=cfg.seed,
                         max_tokens=cfg.max_tokens, constrain=constrain, timeout=cfg.timeout, retries=cfg.retries)
    cache = JudgeCache(cache_path)
    startup = None
    try:
        misses = sum(cache.get(cache.key(model, [{"role": "user", "content": prompt_fn(e, r)}], client.params())) is None
                     for _, _, e, r in items)
        t_up = time.monotonic()
        with judge_endpoint(cfg, out_dir, needed=misses > 0) as base_url:
            client.base_url = base_url
            startup = time.monotonic() - t_up
            results: list[Optional[Judgement]] = [None] * len(items)
            bar = tqdm(total=len(items), desc="judge", unit="item", disable=not progress, dynamic_ncols=True)
            done_scores: list[int] = []

            def work(k: int) -> None:
                kind, _, entry, resp = items[k]
                results[k] = judge_one(client, cache, prompt_fn(entry, resp))

            with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
                futures = [pool.submit(work, k) for k in range(len(items))]
                for n, f in enumerate(futures, start=1):
                    f.result()  # re-raises JudgeError
                    j = results[n - 1]
                    if items[n - 1][0] == "model" and j.score is not None:
                        done_scores.append(j.score)
                    bar.update(1)
                    if done_scores:
                        bar.set_postfix(mean=f"{sum(done_scores) / len(done_scores):.1f}")
                    if n % 10 == 0 or n == len(items):
                        log({"judge_items_done": n, **({"judge_running_mean": sum(done_scores) / len(done_scores)}
                                                       if done_scores else {})}, n)
            bar.close()
    finally:
        cache.close()
    requests = client.requests

    rows = []
    for (kind, i, entry, resp), j in zip(items, results):
        rows.append({"kind": kind, "index": i, "instruction": entry["instruction"], "input": entry["input"],
                     "output": entry["output"], "response": resp, "score": j.score, "answer": j.answer,
                     "cached": j.cached, "seconds": round(j.seconds, 3)})
    df = pd.DataFrame(rows)
    df["score"] = df["score"].astype("Int64")
    pq, csv = _write_table(df, out_dir)
    model_scores = [r["score"] for r in rows if r["kind"] == "model"]
    mean = _mean(model_scores)
    ref = _mean([r["score"] for r in rows if r["kind"] == "reference"])
    empty = _mean([r["score"] for r in rows if r["kind"] == "empty"])
    wrong_s = _mean([r["score"] for r in rows if r["kind"] == "wrong"])
    title = f"{model} ({cfg.prompt} prompt)"
    hist = plot_histogram(df, out_dir / "scores_hist.png", title)
    metrics = {"judge_mean_score": mean, "judge_scored": sum(s is not None for s in model_scores),
               "judge_unscored": sum(s is None for s in model_scores), "judge_reference_score": ref,
               "judge_empty_score": empty, "judge_wrong_score": wrong_s,
               "judge_calibration_gap": (ref - empty) if ref is not None and empty is not None else None,
               "judge_requests": requests, "judge_cache_hits": sum(r["cached"] for r in rows),
               "judge_items": len(rows), "judge_seconds": time.monotonic() - t0,
               "judge_startup_seconds": startup}
    return StageResult(
        metrics={k: float(v) for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))},
        params={"judge_model": model, "judge_url": cfg.url or "embedded", "judge_prompt": cfg.prompt,
                "judge_constrain": "none" if client._constraint_dropped else constrain,
                "judge_temperature": cfg.temperature, "judge_seed": cfg.seed},
        artifacts=[pq, csv, hist],
        outputs={"scores": pq},
    )


def main(argv: Optional[list[str]] = None) -> None:
    from llm.config import parse_overrides

    ap = argparse.ArgumentParser(prog="python -m llm.judge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--responses", required=True, help="responses.parquet / .json / .jsonl")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--cache", help="SQLite cache file (persists across runs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="JudgeConfig field")
    a = ap.parse_args(argv)
    fields = parse_overrides(a.set)
    try:
        cfg = JudgeConfig(**fields)
        res = run_judge(cfg, Path(a.responses), Path(a.out), Path(a.cache) if a.cache else None)
    except (ValueError, FileNotFoundError, JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"metrics": res.metrics, "params": res.params}, indent=2))


if __name__ == "__main__":
    main()
